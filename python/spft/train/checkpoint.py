"""Checkpoints: adapter + optimizer + method/controller state + RNG + step, written atomically.

Layout: `<output_dir>/checkpoint-<step>/{adapter.safetensors, trainer_state.pt}` and
`<output_dir>/latest` (the name of the newest complete checkpoint). A checkpoint directory is
built under a temporary name and renamed into place, then `latest` is replaced atomically: a crash
at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter.safetensors"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str, step: int, *, write_adapter, state: dict[str, Any],
                    keep: int = 2) -> str:
    """Write checkpoint-<step> atomically; `write_adapter(path)` writes the adapter file.
    Keeps the newest `keep` checkpoints. Returns the checkpoint directory."""
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-checkpoint-{step}-", dir=output_dir)
    try:
        write_adapter(os.path.join(tmp, ADAPTER_FILE))
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(os.path.join(output_dir, LATEST), os.path.basename(final))
    done = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint-")),
                  key=lambda d: int(d.rsplit("-", 1)[1]))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(output_dir, old), ignore_errors=True)
    return final


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from itself or from an output directory (its `latest`)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            ckpt = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(ckpt, STATE_FILE)):
            return ckpt
    raise FileNotFoundError(f"no checkpoint found at {path!r} (expected {STATE_FILE} or a "
                            f"'{LATEST}' file)")


def load_checkpoint_state(ckpt_dir: str) -> dict[str, Any]:
    return torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location="cpu", weights_only=False)
