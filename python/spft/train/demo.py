"""`spft demo`: what sparse fine-tuning buys over LoRA, on a tiny model, with no downloads.

1. Pre-train a tiny LLaMA-style model (byte tokenizer) on an "old" generated task (`sort`).
2. Fine-tune copies of it on a "new" task (`reverse`) with SpIEL-AG, SpIEL-MA, S2FT, LoRA (when
   peft is installed) and full fine-tuning, the sparse methods and LoRA at the same trainable
   count.
3. Print a table — loss on the new task, loss on the old task (forgetting), trainable parameters,
   median step time, peak memory — and save a plot (`demo.png`) plus `demo.json`.

On the CPU, "memory" is the training state (trainable weights, gradients, optimizer state, index
buffers), since the CPU has no peak-allocation counter; on a GPU it is the measured peak.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from spft.models import ByteTokenizer, build_model, tiny_llama_config
from spft.models.tasks import generate_task
from spft.train.config import TrainConfig
from spft.train.data import TokenizedDataset
from spft.train.methods import lora_trainable_count
from spft.train.trainer import Trainer, _state_bytes

OLD_TASK, NEW_TASK = "sort", "reverse"
DEMO_METHODS = ("spiel-ag", "spiel-ma", "s2ft", "lora", "full")
# Per-method learning rates (sparse deltas and LoRA factors take larger steps than full FT;
# spiel-ma runs SM3, whose Adagrad-like steps need a larger rate).
LRS = {"spiel-ag": 2e-2, "spiel-ma": 1e-1, "s2ft": 1e-2, "lora": 1e-2, "full": 2e-3}


@dataclass
class DemoSize:
    hidden: int
    layers: int
    pretrain_steps: int
    finetune_steps: int
    batch: int
    lora_rank: int


FAST = DemoSize(hidden=64, layers=2, pretrain_steps=250, finetune_steps=80, batch=32,
                lora_rank=4)
FULL = DemoSize(hidden=128, layers=4, pretrain_steps=500, finetune_steps=200, batch=32,
                lora_rank=8)


def _datasets(tok: ByteTokenizer, n_train: int, n_eval: int, seed: int = 0):
    out = {}
    for task in (OLD_TASK, NEW_TASK):
        recs = generate_task(task, n_train + n_eval, seed=seed)
        out[task] = (TokenizedDataset(recs[n_eval:], tok, max_length=32, seed=seed),
                     TokenizedDataset(recs[:n_eval], tok, max_length=32))
    return out


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(*, fast: bool = False, device: str = "cpu", output_dir: str | None = "spft-demo",
             methods: tuple[str, ...] | None = None, progress: bool = True,
             size: DemoSize | None = None) -> list[dict[str, Any]]:
    """Run the demo; returns one result row per method (also printed as a table)."""
    size = size or (FAST if fast else FULL)
    methods = methods or DEMO_METHODS
    t_start = time.perf_counter()
    tok = ByteTokenizer()
    data = _datasets(tok, n_train=4000, n_eval=256)
    config = tiny_llama_config(hidden_size=size.hidden, num_layers=size.layers, num_heads=4)
    # On a GPU the models train in bf16 (the dtype spft's kernels are tuned for); on the CPU in
    # fp32.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base = build_model(config, seed=0, device=device, dtype=dtype)

    _say(f"[1/2] pre-training a {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M-param "
         f"model on '{OLD_TASK}' ({size.pretrain_steps} steps, {device})")
    pre_cfg = TrainConfig(method="full", lr=3e-3, max_steps=size.pretrain_steps,
                          batch_size=size.batch, warmup_steps=20, schedule="cosine",
                          progress=progress, eval_batches=4)
    pre = Trainer(base, pre_cfg, train_data=data[OLD_TASK][0], eval_data=data[OLD_TASK][1])
    pre.train()
    base_state = {k: v.detach().clone() for k, v in pre.model.state_dict().items()}
    old_before = pre.evaluate(data[OLD_TASK][1])["eval_loss"]
    new_before = pre.evaluate(data[NEW_TASK][1])["eval_loss"]
    del pre

    budget = lora_trainable_count(base, TrainConfig().target_modules, size.lora_rank)
    _say(f"[2/2] fine-tuning on '{NEW_TASK}' ({size.finetune_steps} steps each); sparse methods "
         f"and LoRA r={size.lora_rank} train {budget:,} parameters")
    results: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[int, float]]] = {}
    for method in methods:
        model = build_model(config, seed=0, device=device, dtype=dtype)
        model.load_state_dict(base_state)
        reselect = 20 if _controller_available() else 0
        if method.startswith("spiel") and not reselect:
            _say(f"  {method}: spft.spiel controller not available, fixed random indices")
        cfg = TrainConfig(method=method, lr=LRS.get(method, 1e-3), num_trainable=budget,
                          density=None, lora_rank=size.lora_rank,
                          max_steps=size.finetune_steps, batch_size=size.batch,
                          warmup_steps=5, schedule="linear", reselect_every=reselect,
                          drop_fraction=0.2, progress=progress, eval_batches=4)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            trainer = Trainer(model, cfg, train_data=data[NEW_TASK][0],
                              eval_data=data[NEW_TASK][1])
        except (NotImplementedError, ImportError) as e:
            _say(f"  {method}: skipped ({e})")
            continue
        rows = trainer.train()
        curves[method] = [(r["step"], r["loss"]) for r in rows]
        times = [r["step_time_s"] for r in rows[len(rows) // 5:]]
        mem = (rows[-1].get("peak_mem_gib", 0.0) * 1024 if device.startswith("cuda")
               else _state_bytes(trainer.model, trainer.optimizer) / 2**20)
        results.append({
            "method": method, "trainable": trainer.num_trainable,
            "new_loss": trainer.evaluate(data[NEW_TASK][1])["eval_loss"],
            "old_loss": trainer.evaluate(data[OLD_TASK][1])["eval_loss"],
            "step_ms": 1e3 * statistics.median(times),
            "mem_mib": mem, "reselections": trainer.reselections,
        })
        del trainer, model
    table = format_table(results, old_before, new_before, gpu=device.startswith("cuda"))
    print(table)
    _say(f"demo finished in {time.perf_counter() - t_start:.0f} s")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "demo.json"), "w") as f:
            json.dump({"results": results, "old_before": old_before, "new_before": new_before,
                       "curves": curves, "size": size.__dict__}, f, indent=1)
        png = plot_demo(results, curves, old_before, os.path.join(output_dir, "demo.png"))
        if png:
            _say(f"plot: {png}")
    return results


def _controller_available() -> bool:
    try:
        import spft.spiel as spiel
    except ImportError:
        return False
    return hasattr(spiel, "SpIELController")


def format_table(results: list[dict[str, Any]], old_before: float, new_before: float, *,
                 gpu: bool) -> str:
    mem_head = "peak MiB" if gpu else "state MiB"
    lines = [f"before fine-tuning: new-task loss {new_before:.3f}, old-task loss "
             f"{old_before:.3f}", "",
             f"| method   | new-task loss | old-task loss (forgetting) | trainable | ms/step |"
             f" {mem_head} |",
             "|----------|---------------|----------------------------|-----------|---------|"
             + "-" * (len(mem_head) + 2) + "|"]
    for r in results:
        forget = f"{r['old_loss']:.3f} ({r['old_loss'] - old_before:+.3f})"
        lines.append(f"| {r['method']:<8} | {r['new_loss']:13.3f} | {forget:>26} | "
                     f"{r['trainable']:>9,} | {r['step_ms']:7.1f} | "
                     f"{r['mem_mib']:{len(mem_head)}.2f} |")
    return "\n".join(lines)


def plot_demo(results, curves, old_before, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, pts in curves.items():
        axes[0].plot(*zip(*pts), label=method, lw=1.2)
    axes[0].set_xlabel("fine-tuning step")
    axes[0].set_ylabel(f"train loss ({NEW_TASK})")
    axes[0].set_yscale("log")
    axes[0].legend()
    names = [r["method"] for r in results]
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [r["new_loss"] for r in results], 0.4,
                label=f"new task ({NEW_TASK})")
    axes[1].bar([i + 0.2 for i in x], [r["old_loss"] for r in results], 0.4,
                label=f"old task ({OLD_TASK})")
    axes[1].axhline(old_before, color="gray", ls="--", lw=0.8, label="old task before")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("eval loss")
    axes[1].legend()
    fig.suptitle("spft demo: sparse fine-tuning vs LoRA vs full fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
