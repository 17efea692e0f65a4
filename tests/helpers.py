"""One tolerance policy and small utilities shared by the tests."""

from __future__ import annotations

import torch

# (atol, rtol) for comparing a kernel against a float64 reference, by the kernel's output dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """Compare `actual` to a (higher-precision) `expected` at `dtype`'s tolerance.

    The absolute tolerance grows with the magnitude of `expected` (GEMM outputs over long
    reductions); `scale` widens both tolerances for computations with known extra rounding.
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCES[dtype]
    expected = expected.to(torch.float64)
    magnitude = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(torch.float64), expected,
        atol=scale * atol * max(1.0, magnitude), rtol=scale * rtol, msg=msg or None,
    )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor a kernel is about to write with NaN so skipped elements fail the test."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-1)
    return t


def random_unique_indices(numel: int, k: int, dtype: torch.dtype = torch.int64,
                          device="cpu", generator: torch.Generator | None = None,
                          sort: bool = True) -> torch.Tensor:
    """k distinct flat indices in [0, numel), sorted unless `sort=False`."""
    perm = torch.randperm(numel, generator=generator)[:k]
    if sort:
        perm = perm.sort().values
    return perm.to(dtype=dtype, device=device)


def nf4_gemv_case(out_f, in_f, blocksize, *, tokens, dtype=torch.bfloat16, double_quant=True,
                  quant_type="nf4", density=0.05, idx_dtype=torch.int32,
                  dv_dtype=torch.float32, seed=0, device="cuda"):
    """A small-batch GEMV case: (q, idx, dv, x, bias, w_ref) with q the 4-bit weight [out, in],
    sorted unique idx, x [tokens, in], and w_ref the float64 dequantised weight + deltas."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype=dtype, device=device)
    import spft.ops as ops
    from spft.reference import nf4 as R

    q = ops.nf4_quantize(w, blocksize, double_quant, quant_type=quant_type)
    k = int(w.numel() * density)
    idx = random_unique_indices(w.numel(), k, idx_dtype, device, generator=g)
    dv = (torch.randn(k, generator=g) * 0.02).to(dtype=dv_dtype, device=device)
    x = torch.randn(tokens, in_f, generator=g).to(dtype=dtype, device=device)
    bias = torch.randn(out_f, generator=g).to(dtype=dtype, device=device)
    w_ref = R.dequantize_scatter(q.packed, q.absmax_fp32(), q.code, blocksize, (out_f, in_f),
                                 torch.float64, dv.double(), idx)
    return q, idx, dv, x, bias, w_ref
