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
