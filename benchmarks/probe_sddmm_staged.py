"""The sparse-delta gradient (SDDMM) strategies against the dense dW GEMM they replace.

    python benchmarks/probe_sddmm_staged.py [--tokens 4096] [--densities 0.001 0.01 ...]
                                            [--splits 1 2 3 4] [--chunked-mib 4 8 16]

For each shape (LLaMA-2-7B up/down projections and a square one) and density: the compiled
kernel (`spft._C.sddmm_staged`, strategy "staged"), the Triton tensor-core tiles, the
`chunked` gradient (cuBLAS dW in row blocks of at most 32 MiB, gathered; what `auto` takes
above 1 % for 16-bit inputs) and the dense `dyᵀ @ x` GEMM, in ms (`triton.testing.do_bench`
medians, bf16 inputs). Every strategy's output is first compared with a float64 reference on
4096 sampled indices. `--splits` adds the staged kernel with a forced number of blocks along
the tokens, `--chunked-mib` the chunked gradient with other block budgets (MiB of fp32).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import spft._C as C
from sparse_kernels.sddmm import sparse_delta_grad
from spft.ops.sparse_delta import grad_chunked

SHAPES = {"up 11008x4096": (11008, 4096), "down 4096x11008": (4096, 11008),
          "square 4096x4096": (4096, 4096)}


def check(name, got, dy, x, idx, sample):
    rows, cols = idx[sample] // x.shape[1], idx[sample] % x.shape[1]
    ref = (dy[:, rows].double() * x[:, cols].double()).sum(0)
    err = ((got[sample].double() - ref).abs().max() / ref.abs().max()).item()
    if not err < 1e-4:
        raise SystemExit(f"{name}: max error {err:.2e} relative to the largest gradient")
    return err


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.001, 0.005, 0.01, 0.02, 0.03, 0.05])
    parser.add_argument("--splits", type=int, nargs="*", default=[])
    parser.add_argument("--chunked-mib", type=int, nargs="*", default=[])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {args.tokens} tokens, bf16; ms (do_bench median)")
    header = (f"{'shape':18} {'density':>7} {'dense dW':>9} {'tiles':>7} {'chunked':>7} "
              f"{'staged':>7}")
    header += "".join(f" {'s=' + str(s):>7}" for s in args.splits)
    header += "".join(f" {str(m) + ' MiB':>7}" for m in args.chunked_mib)
    print(header + "  staged/dW  staged/tiles  max rel err")
    for name in args.shapes:
        rows, cols = SHAPES[name]
        dy = torch.randn(args.tokens, rows, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, cols, device="cuda", dtype=torch.bfloat16)
        dense = do_bench(lambda: dy.t() @ x)
        for density in args.densities:
            k = int(density * rows * cols)
            idx = torch.randperm(rows * cols, device="cuda")[:k].sort().values.int()
            sample = torch.randint(0, k, (4096,), device="cuda")
            tiles_out = sparse_delta_grad(dy, x, idx, cols, strategy="tiles")
            staged_out = C.sddmm_staged(dy, x, idx, cols)
            chunked_out = grad_chunked(dy, x, idx, cols)
            err = max(check("tiles", tiles_out, dy, x, idx, sample),
                      check("staged", staged_out, dy, x, idx, sample),
                      check("chunked", chunked_out, dy, x, idx, sample))
            tiles = do_bench(lambda: sparse_delta_grad(dy, x, idx, cols, strategy="tiles"))
            chunked = do_bench(lambda: grad_chunked(dy, x, idx, cols))
            staged = do_bench(lambda: C.sddmm_staged(dy, x, idx, cols))
            forced = []
            for s in args.splits:
                check(f"staged splits={s}", C.sddmm_staged(dy, x, idx, cols, s), dy, x, idx,
                      sample)
                forced.append(do_bench(lambda s=s: C.sddmm_staged(dy, x, idx, cols, s)))
            for mib in args.chunked_mib:
                elems = mib << 18  # fp32 elements in `mib` MiB
                check(f"chunked {mib} MiB", grad_chunked(dy, x, idx, cols, elems), dy, x, idx,
                      sample)
                forced.append(do_bench(lambda e=elems: grad_chunked(dy, x, idx, cols, e)))
            line = (f"{name:18} {density:7.3%} {dense:9.3f} {tiles:7.3f} {chunked:7.3f} "
                    f"{staged:7.3f}")
            line += "".join(f" {f:7.3f}" for f in forced)
            print(line + f"  {staged / dense:9.3f}  {staged / tiles:12.3f}  {err:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
