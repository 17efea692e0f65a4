"""Index-distribution-dependent kernels on SpIEL-MA-like indices: the tiles and staged SDDMMs,
the fused NF4 dequantise + scatter and the fused sparse SM3 step.

    python benchmarks/probes/sddmm_clustered.py [--grown 0.2 0.5] [--density 0.01]

SpIEL-MA grows the positions with the largest row_acc[r]·col_acc[c]
(spft.ops.grow.ma_select), so its indices pile up in busy rows and columns, unlike the uniform
random indices of the other benchmarks. Here k = `--density` (1 %) of a 4096 → 11008 weight; a
fraction `--grown` of it is grown by `ma_select` from log-normal accumulators (σ = 1), the rest
is uniform. For each index set: the 512 × 512 tiles' largest entry count (the staged kernel
lists at most 3072 entries per pass); the Triton tiles SDDMM
(`sparse_kernels.sddmm.sparse_delta_grad(strategy="tiles")`), the row-block cuBLAS dW plus
gather (`spft.ops.sparse_delta.grad_chunked`, strategy "chunked") and
the staged SDDMM (`spft._C.sddmm_staged`; skipped without the extension), 4096 tokens, bf16,
outputs checked against float64 on 4096 sampled indices first; the fused dequantise + scatter
(`spft.ops.nf4_dequantize_scatter`; checked against dequantise-then-add first); one sparse SM3
step (`spft.ops.optim.fused_sparse_sm3_`, fresh gradients and alternating accumulator halves;
not checked here, see tests/test_optim.py). Times in µs (`triton.testing.do_bench` medians).
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

import spft.ops as ops
from sparse_kernels.sddmm import sparse_delta_grad
from spft.ops.grow import ma_select
from spft.ops.optim import fused_sparse_sm3_
from spft.ops.sparse_delta import grad_chunked

try:
    import spft._C as C
except ImportError:
    C = None

OUT, IN, TOKENS, TILE = 11008, 4096, 4096, 512


def index_sets(grown_fractions, density, gen):
    k = int(density * OUT * IN)
    sets = {"uniform": torch.randperm(OUT * IN, device="cuda", generator=gen)[:k].sort().values}
    for frac in grown_fractions:
        n_grow = int(frac * k)
        base = torch.randperm(OUT * IN, device="cuda", generator=gen)[: k - n_grow].sort().values
        row = torch.randn(OUT, device="cuda", generator=gen).exp()
        col = torch.randn(IN, device="cuda", generator=gen).exp()
        grown = ma_select(row, col, base, n_grow)
        sets[f"MA-grown {frac:.0%}"] = torch.cat([base, grown]).sort().values
    return {name: idx.int() for name, idx in sets.items()}


def tile_counts(idx):
    rows, cols = idx.long() // IN, idx.long() % IN
    col_tiles = (IN + TILE - 1) // TILE
    return torch.bincount((rows // TILE) * col_tiles + cols // TILE)


def sm3_step_us(idx, gen) -> float:
    """One fused sparse SM3 step on [OUT, IN] with fresh gradients each call (a ring of 8)."""
    k = idx.numel()
    dv = torch.zeros(k, device="cuda")
    grads = [torch.randn(k, device="cuda", generator=gen) for _ in range(8)]
    row = torch.zeros(2, OUT, device="cuda")
    col = torch.zeros(2, IN, device="cuda")
    calls = [0]

    def step():
        t = calls[0]
        calls[0] += 1
        fused_sparse_sm3_([dv], [grads[t % 8]], [idx], [row], [col], [None], [None], [None],
                          [IN], [t % 2], [1e-3], [0.0], [1e-30], [0.0])
    for _ in range(16):  # the accumulators settle as in training
        step()
    return do_bench(step) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grown", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--sddmm-only", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TOKENS, IN, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(TOKENS, OUT, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(OUT, IN, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    q = ops.nf4_quantize(w, 64, True)
    print(f"{torch.cuda.get_device_name()}, {TOKENS} tokens, bf16, {args.density:.2%} of "
          f"{OUT}x{IN}; µs")
    print(f"{'indices':16} {'max/tile':>9} {'>3072':>6} {'tiles':>8} {'chunked':>8} {'staged':>8} "
          f"{'dequant+scatter':>16} {'sm3 step':>9}")
    for name, idx in index_sets(args.grown, args.density, gen).items():
        counts = tile_counts(idx)
        sample = torch.randint(0, idx.numel(), (4096,), device="cuda", generator=gen)
        r, c = idx[sample].long() // IN, idx[sample].long() % IN
        ref = (dy[:, r].double() * x[:, c].double()).sum(0)

        def grad_us(what, fn):
            err = ((fn()[sample].double() - ref).abs().max() / ref.abs().max()).item()
            if not err < 1e-4:
                raise SystemExit(f"{name}: {what} max error {err:.2e}")
            return do_bench(fn) * 1e3
        tiles_us = grad_us("tiles", lambda: sparse_delta_grad(dy, x, idx, IN, strategy="tiles"))
        chunked_us = grad_us("chunked", lambda: grad_chunked(dy, x, idx, IN))
        staged_us = float("nan")
        if C is not None:
            staged_us = grad_us("staged", lambda: C.sddmm_staged(dy, x, idx, IN, -1))
        deq_us = sm3_us = float("nan")
        if not args.sddmm_only:
            dv = torch.randn(idx.numel(), device="cuda", generator=gen) * 1e-3
            deq = ops.nf4_dequantize_scatter(q, dv, idx, check_indices=False).view(-1).float()
            w_ref = ops.nf4_dequantize(q).view(-1).float().index_add(0, idx.long(), dv)
            # The reference rounds the dequantised weight to bf16 before adding: one bf16 ulp.
            err = ((deq - w_ref).abs().max() / w_ref.abs().max()).item()
            if not err <= 2.0**-7:
                raise SystemExit(f"{name}: dequantise + scatter max error {err:.2e} (relative)")
            deq_us = do_bench(
                lambda: ops.nf4_dequantize_scatter(q, dv, idx, check_indices=False)) * 1e3
            sm3_us = sm3_step_us(idx, gen)
        print(f"{name:16} {int(counts.max()):9d} {int((counts > 3072).sum()):6d} "
              f"{tiles_us:8.1f} {chunked_us:8.1f} {staged_us:8.1f} {deq_us:16.1f} {sm3_us:9.1f}")


if __name__ == "__main__":
    main()
