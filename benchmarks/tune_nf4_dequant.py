"""Dequantise (and dequantise + scatter of 1% deltas) on the GPU, LLaMA-2-7B up_proj
(4096 -> 11008, NF4, double quant, blocksize 64), per launch configuration of both dequantise
kernels, against the device copy and bitsandbytes, all in one run:

    python benchmarks/tune_nf4_dequant.py

Every configuration's output is checked bit-exact against the reference first. Times are GPU
µs per call from one CUDA graph replaying the call on distinct weights in turn (a launch costs
the host more than the kernel takes the GPU, so eager timing measures Python), in three
interleaved rounds, median reported. Minimal bytes: the 4-bit codes, the absmax in its stored
form and the 16-bit output (plus 8 B per delta).
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_nf4 import BLOCKSIZE, HAS_BNB, IN, OUT, _setup
from tune_nf4_gemv import _graph_us

import spft.ops as ops
from sparse_kernels.nf4 import DEQUANT_DEFAULTS, dequantize_4bit
from spft.reference import nf4 as R

COPIES = 3
ROUNDS = 3


def main() -> None:
    setups = [_setup(double_quant=True, seed=s) for s in range(COPIES)]
    w, q, idx, dv = setups[0]
    n = w.numel()
    outs = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in range(COPIES)]
    ref = R.dequantize_4bit(q.packed, q.absmax_fp32(), q.code, BLOCKSIZE, n, torch.bfloat16)
    ref_s = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, BLOCKSIZE, (OUT, IN),
                                 torch.bfloat16, dv, idx).view(-1)
    bytes_dq = n // 2 + q.absmax.numel() + q.absmax2.numel() * 4 + n * 2
    bytes_s = bytes_dq + idx.numel() * 8
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bnb {HAS_BNB}; "
          f"defaults {DEQUANT_DEFAULTS}")

    def kernel(c, pairs, elems, warps, deltas, fused=True):
        _, qc, ic, dc = setups[c]
        extra = dict(dv=dc, idx=ic, idx_sorted=fused) if deltas else {}
        return lambda: dequantize_4bit(qc.packed, qc.absmax, qc.code, BLOCKSIZE, n,
                                       torch.bfloat16, absmax2=qc.absmax2, code2=qc.code2,
                                       offset=qc.offset, out=outs[c], elems_per_program=elems,
                                       num_warps=warps, pair_store=pairs, **extra)

    contenders: dict[str, tuple[list, float, torch.Tensor | None]] = {}
    for pairs, elems, warps in [(False, 8192, 4), (False, 4096, 4)] + [
            (True, e, wp) for e in (2048, 4096, 8192, 16384) for wp in (2, 4, 8)]:
        name = f"{'pairs' if pairs else 'elements'} e={elems} w={warps}"
        contenders[name] = ([kernel(c, pairs, elems, warps, False) for c in range(COPIES)],
                            bytes_dq, ref)
        contenders[name + " +1% deltas"] = (
            [kernel(c, pairs, elems, warps, True, fused=pairs) for c in range(COPIES)],
            bytes_s, ref_s)
    contenders["ops.nf4_dequantize"] = (
        [lambda qc=s[1]: ops.nf4_dequantize(qc) for s in setups], bytes_dq, ref)
    contenders["ops.nf4_dequantize_scatter 1%"] = (
        [lambda s=s: ops.nf4_dequantize_scatter(s[1], s[3], s[2], check_indices=False)
         for s in setups], bytes_s, ref_s)
    from sparse_kernels.nf4 import program_starts
    n_prog = -(-n // DEQUANT_DEFAULTS["pairs"][0])
    gaps = program_starts(idx, DEQUANT_DEFAULTS["pairs"][0], n_prog, method="gaps")
    for method in ("gaps", "searchsorted"):
        contenders[f"program_starts alone ({method})"] = (
            [lambda s=s, m=method: program_starts(s[2], DEQUANT_DEFAULTS["pairs"][0], n_prog,
                                                  method=m) for s in setups], 0, gaps)
    bf16 = [s[0] for s in setups]
    contenders["device copy of the bf16 weight"] = ([lambda b=b: b.clone() for b in bf16],
                                                    n * 4, None)
    if HAS_BNB:
        import bitsandbytes.functional as bnbf
        bnb_w = [bnbf.quantize_4bit(b, blocksize=BLOCKSIZE, compress_statistics=True,
                                    quant_type="nf4") for b in bf16]
        contenders["bnb dequantize_4bit"] = (
            [lambda p=p, st=st: bnbf.dequantize_4bit(p, st) for p, st in bnb_w], bytes_dq, None)

        def published(c):
            p, st = bnb_w[c]
            _, _, ic, dc = setups[c]
            return lambda: bnbf.dequantize_4bit(p, st).view(-1).clone().scatter_add_(
                0, ic.long(), dc.to(torch.bfloat16))
        contenders["published: bnb dequantize, clone, scatter_add"] = (
            [published(c) for c in range(COPIES)], bytes_s, None)

    for name, (fns, _, expect) in contenders.items():
        if expect is not None:
            got = fns[0]().view(-1)
            assert torch.equal(got, expect), f"{name}: output differs from the reference"
    print("checks: every spft configuration bit-exact vs the reference")

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, (fns, _, _) in contenders.items():
            times[name].append(_graph_us(fns))
    copy_us = statistics.median(times["device copy of the bf16 weight"])
    copy_tbps = n * 4 / copy_us / 1e6
    print(f"\n| kernel / config | GPU µs (median of {ROUNDS}) | spread | TB/s | % of copy |")
    print("|---|---|---|---|---|")
    for name, (_, nbytes, _) in contenders.items():
        us = statistics.median(times[name])
        tbps = nbytes / us / 1e6
        spread = max(times[name]) - min(times[name])
        print(f"| {name} | {us:.1f} | ±{spread / 2:.1f} | {tbps:.2f} | {tbps / copy_tbps:.0%} |")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    main()
