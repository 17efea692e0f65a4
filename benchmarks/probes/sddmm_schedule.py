"""The staged SDDMM's two ways of sharing tiles and tokens between blocks.

    PYTHONPATH=$PWD/python:$PWD python benchmarks/probes/sddmm_schedule.py [--blocks 132 264]

`schedule=0` gives every tile `splits` blocks, each a fixed share of the tokens (tiles · splits
blocks, in waves); `schedule=1` (the default) lays all tiles' 16-token stages end to end and
cuts them into one segment per SM, so one wave of blocks each works through the tiles its
segment touches. For each case both outputs are checked against a float64 reference on 4096
sampled indices and against each other, then timed as CUDA-graph replays (GPU time only;
`triton.testing.do_bench`, the median of three medians, the schedules taking turns).
`--blocks` adds segment schedules with that many blocks.
"""

from __future__ import annotations

import argparse

import torch
from sddmm_fill import CASES, inputs, max_error, median_us

import spft._C as C
from benchmarks.common import capture_graph

EXTRA = ((4096, 4096, 0.001, 4096), (14336, 4096, 0.01, 4096), (4096, 14336, 0.01, 4096))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, nargs="*", default=[])
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = [("splits", 0, -1), ("segments", 1, -1)]
    variants += [(f"seg b={b}", 1, b) for b in args.blocks]
    print(f"{torch.cuda.get_device_name()}, bf16, fill=1; µs per call (CUDA graph)")
    print(f"{'shape':>12} {'density':>7} {'T':>5} " + " ".join(f"{v[0]:>10}" for v in variants)
          + f" {'seg/splits':>10} {'max rel err':>11}")
    for rows, cols, density, tokens in CASES + EXTRA:
        dy, x, idx = inputs(rows, cols, density, tokens)
        outs = [C.sddmm_staged(dy, x, idx, cols, -1, 1, schedule, blocks)
                for _, schedule, blocks in variants]
        err = max(max_error(out, dy, x, idx) for out in outs)
        spread = max(((out - outs[0]).abs().max() / outs[0].abs().max()).item() for out in outs)
        if not (err < 1e-4 and spread < 1e-5):
            raise SystemExit(f"{rows}x{cols} {density}: max error {err:.1e}, spread {spread:.1e}")
        times = median_us([capture_graph(
            lambda s=schedule, b=blocks: C.sddmm_staged(dy, x, idx, cols, -1, 1, s, b))
            for _, schedule, blocks in variants])
        print(f"{rows}x{cols:<5} {density:7.3%} {tokens:5d} "
              + " ".join(f"{t:10.1f}" for t in times)
              + f" {times[1] / times[0]:10.3f} {err:11.1e}", flush=True)


if __name__ == "__main__":
    main()
