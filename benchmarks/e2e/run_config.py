"""One end-to-end configuration in its own process: time per optimizer step and peak memory.

    python benchmarks/e2e/run_config.py spiel-ag --layers 32 --out spiel-ag.json

A decoder with LLaMA-2-7B dimensions is built directly on the GPU in bf16 from a config (no
download), put in train mode (Hugging Face skips activation checkpointing in eval mode), and
trained on random tokens (batch 4 × 1024) with activation checkpointing through `spft.train.Trainer`
(QLoRA: bitsandbytes NF4 + double quant, then peft). Steps are timed one by one with CUDA
synchronisation; peak memory is `torch.cuda.max_memory_allocated` from just before the first
step (weights resident = allocated memory after setup).

SpIEL configurations run a short schedule so that one timed window holds steady steps, the
AG "find" step (top-|dW| candidates), an AG "accumulate" step and a reselection (AG: reselect
every 8 steps with A = 2; MA: every 4); the reported time is amortised to the default schedule
(reselect every S = 20 steps, AG accumulating over the last A = 5 of them):
    AG: ((S - A)·steady + find + (A - 1)·accumulate + reselection) / S
    MA: (S·steady + reselection) / S.
Peak memory is the maximum over the timed steps (`steady_peak_gib`: over steady steps only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

CONFIGS = ("full", "lora", "qlora", "spiel-ag", "spiel-ag-lean", "spiel-ma", "qspiel", "qspiel-ma",
           "s2ft")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
S_DEFAULT, A_DEFAULT = 20, 5
RESELECT_AG, RESELECT_MA = 8, 4  # timing schedules (see the module docstring)


def build(layers: int, tiny: bool, device: str):
    from spft.models import build_model, llama2_7b_config
    cfg = llama2_7b_config(num_layers=layers)
    if tiny:  # CPU smoke test of this script
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 128, 344, 4
        cfg.num_key_value_heads, cfg.vocab_size, cfg.head_dim = 4, 1000, 32
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_model(cfg, seed=0, dtype=torch.bfloat16, device=device)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def quantize_bnb(model, device: str) -> None:
    """Replace the target linears by bitsandbytes Linear4bit (NF4, double quant, bf16 compute)."""
    import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                  compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True, device="meta")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False,
                                         quant_type="nf4", compress_statistics=True).to(device)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q)
            del mod
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", choices=CONFIGS)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny dimensions")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile one more step and print its CUDA "
                         "kernels, the largest total first")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    from spft.train import TrainConfig, Trainer
    from spft.train.methods import lora_trainable_count

    t_setup = time.perf_counter()
    model = build(args.layers, args.tiny, device)
    budget = lora_trainable_count(model, TARGETS, args.lora_rank)
    name = args.config
    common = dict(max_steps=10_000, schedule="constant", grad_clip=None, bf16=True,
                  activation_checkpointing=True, progress=False, plot=False,
                  batch_size=args.batch, target_modules=TARGETS)
    spiel = name in ("spiel-ag", "spiel-ag-lean", "spiel-ma", "qspiel", "qspiel-ma")
    ag = spiel and name not in ("spiel-ma", "qspiel-ma")
    quant = name.startswith("qspiel")
    if name == "full":
        cfg = TrainConfig(method="full", lr=1e-5, **common)
    elif name in ("lora", "qlora"):
        if name == "qlora":
            quantize_bnb(model, device)
            common["bf16"] = False  # already bf16; .to() would touch the 4-bit params
        cfg = TrainConfig(method="lora", lora_rank=args.lora_rank, lora_alpha=16, lr=1e-4,
                          **common)
    elif name == "s2ft":
        cfg = TrainConfig(method="s2ft", num_trainable=budget, density=None, lr=1e-4, **common)
    else:
        # qSpIEL: AG + AdamW (QLoRA's optimizer) and MA + SM3, both on spft's NF4 + DQ base.
        method = "spiel-ag" if ag else "spiel-ma"
        extra: dict = {"spiel": {"accumulation_steps": 2}} if ag else {}
        if name == "spiel-ag-lean":  # bf16 AdamW moments, candidates = number grown
            extra = {"spiel": {"accumulation_steps": 2, "candidate_factor": 1.0},
                     "adamw": {"state_dtype": "bfloat16"}}
        cfg = TrainConfig(method=method, num_trainable=budget, density=None, lr=1e-4,
                          merged=not quant, quant="nf4" if quant else None,
                          reselect_every=RESELECT_AG if ag else RESELECT_MA, drop_fraction=0.2,
                          extra=extra, **common)
    trainer = Trainer(model, cfg)
    trainer.model.train()
    sync()
    setup_s = time.perf_counter() - t_setup
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0

    resel_times: dict[int, float] = {}
    inner = trainer.method.after_optimizer_step

    def timed_hook(step: int):
        sync()
        t0 = time.perf_counter()
        out = inner(step)
        sync()
        resel_times[step] = time.perf_counter() - t0
        return out
    trainer.method.after_optimizer_step = timed_hook

    g = torch.Generator(device=device).manual_seed(0)
    vocab = trainer.model.config.vocab_size if hasattr(trainer.model, "config") else 32000

    def batch():
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=g)
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    period = (RESELECT_AG if ag else RESELECT_MA) if spiel else 0
    warmup = period if spiel else args.warmup
    steps = period if spiel else args.steps
    rows = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row = trainer.train_step([batch()])
        row["hook_s"] = resel_times.get(trainer.step - 1, 0.0)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        if i >= warmup:
            rows.append(row)
    peak = max(r["peak_gib"] for r in rows)
    times = [r["step_time_s"] for r in rows]
    result = {"config": name, "layers": args.layers, "trainable": trainer.num_trainable,
              "peak_gib": peak, "resident_gib": resident, "setup_s": setup_s,
              "step_times_s": times, "losses": [r["loss"] for r in rows],
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    result["step_peaks_gib"] = [r["peak_gib"] for r in rows]
    if spiel:
        # AG window (reselect every 8, A = 2): 6 steady steps, the "find" step (top-|dW|
        # candidates), the "accumulate" step + reselection. MA window (every 4): 3 steady
        # steps, then one with the reselection.
        resel = rows[-1]["hook_s"]
        if ag:
            steady = statistics.median(times[:-2])
            find, accumulate = times[-2], times[-1] - resel
            total = (S_DEFAULT - A_DEFAULT) * steady + find + (A_DEFAULT - 1) * accumulate
            n_steady = len(times) - 2
        else:
            steady = statistics.median(times[:-1])
            find = accumulate = steady
            total = S_DEFAULT * steady
            n_steady = len(times) - 1
        amortised = (total + resel) / S_DEFAULT
        result.update(ms_per_step=1e3 * amortised, steady_ms=1e3 * steady,
                      find_ms=1e3 * find, accumulate_ms=1e3 * accumulate,
                      reselect_ms=1e3 * resel, reselected=rows[-1].get("reselected", 0),
                      steady_peak_gib=max(r["peak_gib"] for r in rows[:n_steady]))
    else:
        result["ms_per_step"] = 1e3 * statistics.median(times)
    print(json.dumps(result))
    if args.profile and cuda:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from common import print_kernels  # benchmarks/common.py
        print_kernels(lambda: trainer.train_step([batch()]), rows=25)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
