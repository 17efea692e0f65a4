"""The staged SDDMM's two ways of handing token stages between warps, and its token splits.

    PYTHONPATH=$PWD/python:$PWD python benchmarks/probes/sddmm_fill.py [--splits -1 1 2 3 4 6]

`spft._C.sddmm_staged(..., fill=0)` copies three stages ahead and meets at a block barrier
every stage; `fill=1` (the default) copies two stages ahead and hands stages over through
per-stage full / empty barriers. For each shape and density both outputs are checked against
a float64 reference on 4096 sampled indices and against each other (bit for bit), then timed
as CUDA-graph replays (GPU time only; `triton.testing.do_bench`, the median of three medians,
the two fills taking turns). `--splits` then times the default fill with forced token splits.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import spft._C as C
from benchmarks.common import capture_graph

CASES = ((11008, 4096, 0.01, 4096), (4096, 11008, 0.01, 4096), (4096, 4096, 0.01, 4096),
         (11008, 4096, 0.005, 4096), (11008, 4096, 0.001, 4096), (11008, 4096, 0.01, 1000))


def inputs(rows: int, cols: int, density: float, tokens: int):
    dy = torch.randn(tokens, rows, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
    k = int(density * rows * cols)
    idx = torch.randperm(rows * cols, device="cuda")[:k].sort().values.int()
    return dy, x, idx


def max_error(out, dy, x, idx) -> float:
    cols = x.shape[1]
    sample = torch.randint(0, idx.numel(), (4096,), device="cuda")
    r, c = idx[sample].long() // cols, idx[sample].long() % cols
    ref = (dy[:, r].double() * x[:, c].double()).sum(0)
    return ((out[sample].double() - ref).abs().max() / ref.abs().max()).item()


def median_us(graphs: list[torch.cuda.CUDAGraph], rounds: int = 3) -> list[float]:
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for i, graph in enumerate(graphs):
            times[i].append(do_bench(graph.replay, rep=200) * 1e3)
    return [sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, nargs="*", default=[])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, bf16; µs per call (CUDA graph)")
    print(f"{'shape':>12} {'density':>7} {'T':>5} {'fill=0':>8} {'fill=1':>8} {'1/0':>6} "
          f"{'max rel err':>11}")
    for rows, cols, density, tokens in CASES:
        dy, x, idx = inputs(rows, cols, density, tokens)
        outs = [C.sddmm_staged(dy, x, idx, cols, -1, fill) for fill in (0, 1)]
        if not torch.equal(outs[0], outs[1]):
            raise SystemExit(f"{rows}x{cols} {density}: the two fills differ")
        err = max(max_error(out, dy, x, idx) for out in outs)
        if not err < 1e-4:
            raise SystemExit(f"{rows}x{cols} {density}: max error {err:.1e}")
        t0, t1 = median_us([capture_graph(lambda f=fill: C.sddmm_staged(dy, x, idx, cols, -1, f))
                            for fill in (0, 1)])
        print(f"{rows}x{cols:<5} {density:7.3%} {tokens:5d} {t0:8.1f} {t1:8.1f} {t1 / t0:6.3f} "
              f"{err:11.1e}", flush=True)
    if not args.splits:
        return
    print("\nfill=1 with forced splits along the tokens (-1: the default rule), µs")
    print(f"{'shape':>12} {'density':>7} " + " ".join(f"{'s=' + str(s):>7}" for s in args.splits))
    for rows, cols, density, tokens in CASES[:4]:
        dy, x, idx = inputs(rows, cols, density, tokens)
        ref = C.sddmm_staged(dy, x, idx, cols, -1, 0)
        for s in args.splits:
            out = C.sddmm_staged(dy, x, idx, cols, s, 1)
            if not ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5:
                raise SystemExit(f"{rows}x{cols} splits={s}: differs from the default")
        times = median_us([capture_graph(lambda s=s: C.sddmm_staged(dy, x, idx, cols, s, 1))
                           for s in args.splits])
        print(f"{rows}x{cols:<5} {density:7.3%} " + " ".join(f"{t:7.1f}" for t in times),
              flush=True)


if __name__ == "__main__":
    main()
