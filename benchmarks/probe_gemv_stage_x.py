"""The packed GEMV's automatic choices on several projection shapes: times the default
`spft._C.nf4_gemv_tiled` with 1% deltas against the same launch with x for the deltas staged
transposed in shared memory (stage_x=1) and gathered from global memory (stage_x=0), with the
deltas summed apart by a kernel of their own that the GEMV overlaps (deltas_apart=1), without
deltas, and, where
the row tiles are more than six per SM (the default then takes one tile per block), against the
six-tile block forced; bf16 `F.linear` on the dequantised weight for scale. LLaMA-2-7B's up and
down projections, a square 4096 and LLaMA-2-13B's up projection, at 1, 2, 4, 8 and 16 tokens.

    python benchmarks/probe_gemv_stage_x.py [--tokens 1 2 4 8 16]
    SPFT_GEMV_NO_PDL=1 python benchmarks/probe_gemv_stage_x.py   # deltas apart, no overlap
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from tune_nf4_gemv import _graph_us

import spft.ops as ops
from spft import _backend

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096), (5120, 13824)]
SIX_TILES = (4, 2, 2, 2, 0, 6)
DENSITY = 0.01


def _probe_shape(ext, in_f: int, out_f: int, copies: int, token_counts: list[int]) -> None:
    packed, deltas, dense = [], [], []
    for c in range(copies):
        gen = torch.Generator(device="cuda").manual_seed(c)
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        q = ops.nf4_quantize(w, 64, True)
        k = int(DENSITY * out_f * in_f)
        idx = torch.randperm(out_f * in_f, device="cuda", generator=gen)[:k].sort().values
        idx = idx.to(torch.int32)
        dv = torch.randn(k, device="cuda", generator=gen) * 0.01
        packed.append(ops.nf4_gemv_pack(q))
        deltas.append((dv, idx, ops.nf4_row_pointers(idx, out_f, in_f)))
        dense.append(ops.nf4_dequantize(q))
    dv0, idx0, _ = deltas[0]
    w_full = dense[0].double().flatten().index_add(0, idx0.long(), dv0.double())
    w_full = w_full.view(out_f, in_f)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    auto = (0,) * 6
    variants = {"default": (auto, -1, -1), "staged": (auto, 1, 0), "gathered": (auto, 0, 0),
                "apart": (auto, -1, 1), "none": (auto, -1, -1)}
    if -(-out_f // 16) > 6 * sms:
        variants["six-tile"] = (SIX_TILES, -1, -1)
    for tokens in token_counts:
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
        expected = x.double() @ w_full.t()
        times = {}
        for name, (config, stage_x, apart) in variants.items():
            def call(c, config=config, stage_x=stage_x, apart=apart, x=x, on=name != "none"):
                p, (dv, idx, rp) = packed[c], deltas[c] if on else (None, None, None)
                return lambda: ext.nf4_gemv_tiled(x, p.codes, p.absmax, p.code, dv, idx, rp,
                                                  None, out_f, *config, stage_x=stage_x,
                                                  deltas_apart=apart)
            y = call(0)()
            ref = expected if name != "none" else x.double() @ dense[0].double().t()
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (in_f, out_f, tokens, name, err)
            times[name] = _graph_us([call(c) for c in range(copies)])
        t_lin = _graph_us([lambda c=c, x=x: F.linear(x, dense[c]) for c in range(copies)])
        cells = "  ".join(f"{name} {us:5.1f}" for name, us in times.items())
        print(f"{in_f:6d} {out_f:6d} {tokens:2d}  F.linear {t_lin:5.1f}  {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    ext = _backend.extension()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}; µs per call in a CUDA graph, 1% deltas")
    print(f"{'in':>6} {'out':>6} {'T':>2}")
    for in_f, out_f in SHAPES:
        _probe_shape(ext, in_f, out_f, max(4, -(-3 * l2 // (in_f * out_f // 2))), args.tokens)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
