"""Sweep launch parameters of the sparse-delta kernels on the GPU (4096 -> 11008, 4096 tokens).

python benchmarks/tune_sparse_delta.py   — prints ms per configuration; checks outputs first.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sparse_delta import IN, make_case
from common import bench_ms, print_table

from sparse_kernels.sddmm import sparse_delta_grad
from sparse_kernels.sparse_delta import sparse_delta_materialize
from spft.reference import sparse_delta as ref


def main() -> None:
    x, w, dv, idx, dy = make_case(0.01)
    expected = ref.sparse_delta_materialize(w, dv, idx)
    rows = []
    for block in (4096, 8192):
        for warps in (4, 8):
            out = sparse_delta_materialize(w, dv, idx, block=block, num_warps=warps)
            assert torch.equal(out, expected)
            t = bench_ms(lambda b=block, nw=warps: sparse_delta_materialize(
                w, dv, idx, out=out, block=b, num_warps=nw))
            rows.append([f"block={block} warps={warps}", t, 2 * w.numel() * 2 / t / 1e9])
    print_table("materialise, 1%", ["config", "ms", "TB/s (W read+write)"], rows)
    t_dw = bench_ms(lambda: dy.t() @ x)
    for density in (0.001, 0.01, 0.03):
        x, w, dv, idx, dy = make_case(density)
        g_ref = (dy.t().float() @ x.float()).view(-1)[idx.long()]
        rows = [["dense dW GEMM", t_dw, 1.0]]
        for tma, cfg, warps, stages in (
                (False, (256, 128, 64, 8), 8, 3), (True, (128, 128, 64, 8), 8, 3),
                (True, (128, 128, 64, 8), 8, 4), (True, (128, 256, 64, 8), 8, 3),
                (True, (256, 128, 64, 8), 8, 3), (True, (128, 128, 64, 8), 4, 4),
                (True, (128, 256, 64, 8), 8, 4), (True, (256, 128, 64, 8), 8, 4)):
            label = f"tiles{' tma' if tma else ''} {cfg} w{warps} s{stages}"
            try:
                g = sparse_delta_grad(dy, x, idx, IN, strategy="tiles", tile_config=cfg,
                                      num_warps=warps, num_stages=stages, use_tma=tma)
                rel = ((g - g_ref).norm() / g_ref.norm()).item()
                assert rel < 1e-3, rel
                t = bench_ms(lambda c=cfg, nw=warps, ns=stages, u=tma: sparse_delta_grad(
                    dy, x, idx, IN, strategy="tiles", tile_config=c, num_warps=nw,
                    num_stages=ns, use_tma=u))
                rows.append([label, t, t / t_dw])
            except Exception as exc:  # a config that does not fit (shared memory) is skipped
                rows.append([label, float("nan"), f"{type(exc).__name__}: {str(exc)[:60]}"])
        t = bench_ms(lambda: sparse_delta_grad(dy, x, idx, IN, strategy="sampled"))
        rows.append(["sampled", t, t / t_dw])
        print_table(f"dv gradient, density {density:.1%}", ["config", "ms", "x dW"], rows)
    for density in (0.0001, 0.0003):
        x, w, dv, idx, dy = make_case(density)
        t_t = bench_ms(lambda: sparse_delta_grad(dy, x, idx, IN, strategy="tiles"))
        t_s = bench_ms(lambda: sparse_delta_grad(dy, x, idx, IN, strategy="sampled"))
        print(f"density {density:.2%}: tiles {t_t:.3f} ms, sampled {t_s:.3f} ms")


if __name__ == "__main__":
    main()
