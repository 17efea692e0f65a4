"""`python -m spft.info`: versions, backends found, GPU and extension build info."""

from __future__ import annotations

import importlib
import platform

import spft
from spft import _backend


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        return "not installed"


def report() -> str:
    import torch
    lines = [
        f"spft {spft.__version__} (distribution spft-kernels)",
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"triton: {_version('triton')}",
        f"bitsandbytes: {_version('bitsandbytes')}",
        f"transformers: {_version('transformers')}, peft: {_version('peft')}",
        f"compiled extension spft._C: "
        f"{'available' if _backend.extension_available() else 'not built'}",
        f"SPFT_BACKEND: {_backend.requested_backend() or 'auto'}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs")
    else:
        lines.append("GPU: none visible (CPU reference path)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
