"""Metrics: one JSON object per line, and a loss / memory plot at the end of a run."""

from __future__ import annotations

import json
import math
import os
from typing import Any


class MetricsLog:
    """Appends rows to `path` (JSONL). On resume from `resume_step`, rows of later steps (written
    by the interrupted run after its checkpoint) are dropped so the file matches the run."""

    def __init__(self, path: str | None, resume_step: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                self.rows = [r for r in map(json.loads, filter(str.strip, f))
                             if r.get("step", 0) <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        elif os.path.exists(path):
            os.unlink(path)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_metrics(rows: list[dict[str, Any]], path: str, title: str = "") -> str | None:
    """Loss (train and eval) and peak memory against the step, saved as PNG. Returns the path,
    or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    mem = [(r["step"], r["peak_mem_gib"]) for r in rows if r.get("peak_mem_gib") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        axes[0].plot(*zip(*train), label="train", lw=1)
    if evals:
        axes[0].plot(*zip(*evals), "o-", label="eval", ms=3)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    resel = [r["step"] for r in rows if r.get("reselection")]
    for s in resel:
        axes[0].axvline(s, color="gray", alpha=0.15, lw=0.8)
    if mem:
        axes[1].plot(*zip(*mem), lw=1)
        axes[1].set_ylabel("peak GPU memory (GiB)")
    else:
        axes[1].text(0.5, 0.5, "no GPU: memory not tracked", ha="center", va="center")
        axes[1].set_axis_off()
    axes[1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
