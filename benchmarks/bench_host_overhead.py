"""Host (CPU) time per call of spft's training ops, on shapes too small for the GPU to matter.

    python benchmarks/bench_host_overhead.py

A 7B model calls these ops 224 times per forward and again in backward, so the host time per
call decides whether a training step is GPU- or CPU-bound. Each row: wall time of forward +
backward, averaged over many iterations after warm-up, with one synchronise at the end.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import spft.ops as ops


def host_us(fn, iters: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> None:
    dev = "cuda"
    out_f, in_f, tokens = 256, 128, 16
    w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16)
    k = w.numel() // 100
    idx = torch.randperm(w.numel(), device=dev)[:k].sort().values.int()
    dv = torch.zeros(k, device=dev, requires_grad=True)
    x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, out_f, device=dev, dtype=torch.bfloat16)
    q = ops.nf4_quantize(w, 64, double_quant=True)
    lin_w = w.clone().requires_grad_()

    def step(y):
        y.backward(dy)
        x.grad = dv.grad = lin_w.grad = None

    rows = [
        ("F.linear (trainable weight)", lambda: step(F.linear(x, lin_w))),
        ("published: clone + scatter_add + linear",
         lambda: step(F.linear(x, w.view(-1).clone().scatter_add(
             0, idx.long(), dv.to(w.dtype)).view(out_f, in_f)))),
        ("spft sparse_delta_linear", lambda: step(ops.sparse_delta_linear(
            x, w, dv, idx, check_indices=False))),
        ("spft sparse_delta_linear_nf4", lambda: step(ops.sparse_delta_linear_nf4(
            x, q, dv, idx, check_indices=False))),
        ("spft nf4_linear_small_batch (no grad)", lambda: ops.nf4_linear_small_batch(
            x.detach(), q, dv.detach(), idx, check_indices=False)),
    ]
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| op (fwd+bwd unless noted) | host µs per call |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {host_us(fn):.0f} |", flush=True)
    if "--profile" in sys.argv:  # where the host time of the spft ops goes
        import cProfile
        import pstats
        for name, fn in rows[2:4]:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                fn()
            prof.disable()
            print(f"--- {name}: 100 calls")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main()
