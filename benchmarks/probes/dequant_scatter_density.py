"""The fused NF4 dequantise + scatter across delta densities (uniform random indices).

    python benchmarks/probes/dequant_scatter_density.py [--densities 0 0.001 0.01 0.0247 0.05]

4096 → 11008 weight, blocksize 64, double quant, bf16 out. For each density: the fused pass
(`sparse_kernels.nf4.dequantize_4bit(..., idx_sorted=True)`, what spft.ops uses), the same
deltas through the dense pass plus a separate scatter pass (`idx_sorted=False`), and the
program ranges alone (`program_starts`); the dequantisation without deltas as the floor. Both
outputs are checked against dequantise-then-`index_add` first. `triton.testing.do_bench`
medians, µs; the rows take turns over `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
from triton.testing import do_bench

import spft.ops as ops
from sparse_kernels.nf4 import (
    DEQUANT_DEFAULTS,
    _program_blocks,
    dequantize_4bit,
    program_starts,
)

OUT, IN, BLOCKSIZE = 11008, 4096, 64


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.001, 0.005, 0.01, 0.0247, 0.05])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(OUT, IN, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    q = ops.nf4_quantize(w, BLOCKSIZE, True)
    numel = OUT * IN
    args_q = (q.packed, q.absmax, q.code, BLOCKSIZE, numel, torch.bfloat16)
    kw = dict(absmax2=q.absmax2, code2=q.code2, offset=q.offset)
    dense = dequantize_4bit(*args_q, **kw)
    elems = DEQUANT_DEFAULTS["pairs"][0]
    # the launcher's grid for the pair-store kernel
    n_programs = triton.cdiv(triton.cdiv(numel, BLOCKSIZE), _program_blocks(BLOCKSIZE, elems))
    print(f"{torch.cuda.get_device_name()}; {OUT}x{IN} NF4 (double quant) -> bf16; µs")

    cases = {}
    for density in args.densities:
        k = int(density * numel)
        idx = torch.randperm(numel, device="cuda", generator=gen)[:k].sort().values.int()
        dv = torch.randn(k, device="cuda", generator=gen) * 1e-3
        ref = dense.view(-1).float().index_add(0, idx.long(), dv)
        fns = {
            "fused": lambda idx=idx, dv=dv: dequantize_4bit(*args_q, **kw, dv=dv, idx=idx,
                                                            idx_sorted=True),
            "two passes": lambda idx=idx, dv=dv: dequantize_4bit(*args_q, **kw, dv=dv, idx=idx),
            "starts": lambda idx=idx: program_starts(idx, elems, n_programs),
        }
        for name in ("fused", "two passes"):
            got = fns[name]().float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if not err <= 2.0**-7:  # the reference adds to the rounded value: one bf16 ulp
                raise SystemExit(f"{density}: {name} max error {err:.2e} (relative)")
        cases[density] = fns
    floor_fn = lambda: dequantize_4bit(*args_q, **kw)  # noqa: E731
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        times.setdefault(("none", "dequantise"), []).append(do_bench(floor_fn) * 1e3)
        for density, fns in cases.items():
            for name, fn in fns.items():
                times.setdefault((density, name), []).append(do_bench(fn) * 1e3)
    floor = statistics.median(times[("none", "dequantise")])
    print(f"dequantise alone: {floor:.1f}")
    print(f"{'density':>8} {'k':>9} {'fused':>8} {'two passes':>11} {'starts':>8} "
          f"{'fused - floor':>14}")
    for density in cases:
        med = {n: statistics.median(times[(density, n)]) for n in cases[density]}
        print(f"{density:8.2%} {int(density * numel):9d} {med['fused']:8.1f} "
              f"{med['two passes']:11.1f} {med['starts']:8.1f} {med['fused'] - floor:14.1f}")


if __name__ == "__main__":
    main()
