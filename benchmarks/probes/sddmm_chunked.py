"""The `chunked` gradient (row blocks of dW by cuBLAS, gathered) against the Triton tiles SDDMM.

    python benchmarks/probes/sddmm_chunked.py [--density 0.0247]

4096 tokens, bf16, uniform random indices, the three LLaMA-2-7B projection shapes. Outputs are
compared with each other first (the tiles kernel is tested against float64 in tests/); then
`triton.testing.do_bench` medians in µs, with the dense bf16 dW GEMM as the anchor and the
chunked time for several block budgets.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from sparse_kernels.sddmm import sparse_delta_grad
from spft.ops.sparse_delta import grad_chunked


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--density", type=float, default=0.0247)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; 4096 tokens, bf16, {args.density:.2%}; µs")
    for rows, cols in ((11008, 4096), (4096, 11008), (4096, 4096)):
        dy = torch.randn(4096, rows, device="cuda", dtype=torch.bfloat16, generator=g)
        x = torch.randn(4096, cols, device="cuda", dtype=torch.bfloat16, generator=g)
        k = int(args.density * rows * cols)
        idx = torch.randperm(rows * cols, device="cuda", generator=g)[:k].sort().values.int()
        tiles = sparse_delta_grad(dy, x, idx, cols, strategy="tiles")
        chunked = grad_chunked(dy, x, idx, cols)
        err = ((chunked - tiles).abs().max() / tiles.abs().max()).item()
        if not err < 1e-4:
            raise SystemExit(f"{rows}x{cols}: chunked and tiles differ by {err:.1e}")
        line = [f"{rows}x{cols}: dense dW {do_bench(lambda: dy.t() @ x) * 1e3:.1f}",
                f"tiles {do_bench(lambda: sparse_delta_grad(dy, x, idx, cols, 'tiles')) * 1e3:.1f}"]
        for budget in (2**22, 2**23, 2**24, 2**25):
            us = do_bench(lambda: grad_chunked(dy, x, idx, cols, budget)) * 1e3
            line.append(f"chunked {budget >> 20} Mi {us:.1f}")
        print("  ".join(line))


if __name__ == "__main__":
    main()
