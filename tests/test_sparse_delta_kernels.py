"""Triton launchers in sparse_kernels vs the reference (TRITON_INTERPRET=1 on CPU, or CUDA)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, poison_, random_unique_indices

from spft.reference import sparse_delta as ref

triton = pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _need_triton_device(triton_backend):
    """Skip where Triton cannot run (no CUDA and no interpreter)."""


KERNEL_CASES = [
    pytest.param(37, 150, 300, 256, id="out37-in150-k300-block256"),
    pytest.param(5, 3, 15, 4, id="out5-in3-full-block4"),
    pytest.param(64, 64, 1, 1024, id="out64-in64-k1"),
    pytest.param(33, 70, 0, 128, id="out33-in70-k0"),
]


@pytest.mark.parametrize("n_out, n_in, k, block", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_materialize(device, n_out, n_in, k, block, dtype, idx_dtype):
    from sparse_kernels.sparse_delta import sparse_delta_materialize
    w = torch.randn(n_out, n_in, device=device, dtype=dtype)
    idx = random_unique_indices(n_out * n_in, k, dtype=idx_dtype, device=device)
    dv = torch.randn(k, device=device)
    out = poison_(torch.empty_like(w))
    sparse_delta_materialize(w, dv, idx, out=out, block=block)
    expected = ref.sparse_delta_materialize(w, dv, idx)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 instead of rounding: 1 ulp.
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_refresh(device, dtype):
    from sparse_kernels.sparse_delta import sparse_delta_refresh_
    w = torch.randn(21, 34, device=device, dtype=dtype)
    idx = random_unique_indices(w.numel(), 77, device=device)
    base = torch.randn(77, device=device)
    dv = torch.randn(77, device=device)
    expected = w.clone()
    ref.sparse_delta_refresh_(expected, base, dv, idx)
    sparse_delta_refresh_(w, base, dv, idx)
    tol = 2**-7 if (device.type == "cpu" and dtype == torch.bfloat16) else 0
    torch.testing.assert_close(w, expected, rtol=tol, atol=0)


GRAD_CASES = [
    pytest.param(70, 37, 150, 300, id="T70-out37-in150-k300"),
    pytest.param(45, 136, 264, 700, id="T45-out136-in264-k700-aligned"),
    pytest.param(1, 130, 129, 500, id="T1-out130-in129-k500"),
    pytest.param(65, 3, 5, 15, id="T65-out3-in5-full"),
    pytest.param(9, 200, 140, 2, id="T9-out200-in140-k2"),
]


@pytest.mark.parametrize("T, n_out, n_in, k", GRAD_CASES)
@pytest.mark.parametrize("strategy", ["tiles", "tiles-tma", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_grad(device, T, n_out, n_in, k, strategy, dtype, idx_dtype):
    from sparse_kernels.sddmm import sparse_delta_grad
    dy = torch.randn(T, n_out, device=device, dtype=dtype)
    x = torch.randn(T, n_in, device=device, dtype=dtype)
    idx = random_unique_indices(n_out * n_in, k, dtype=idx_dtype, device=device)
    out = poison_(torch.empty(k, device=device))
    use_tma = strategy == "tiles-tma"
    if use_tma and ((n_in * dy.element_size()) % 16 or (n_out * dy.element_size()) % 16
                    or dtype == torch.float32):
        use_tma = False  # TMA: 16-bit, 16-byte aligned rows; the pointer kernel covers the rest
    sparse_delta_grad(dy, x, idx, n_in, strategy=strategy.removesuffix("-tma"), out=out,
                      use_tma=use_tma)
    expected = ref.sparse_delta_grad(dy.double(), x.double(), idx, n_in)
    assert_close(out, expected, torch.float32, scale=max(1.0, T**0.5 / 4))


@pytest.mark.parametrize("strategy", ["tiles", "sampled"])
def test_grad_reads_strided_inputs(device, strategy):
    """dy and x in transposed storage (e.g. a .t() view) are read in place, not copied."""
    from sparse_kernels.sddmm import sparse_delta_grad
    dy = torch.randn(40, 23, device=device).t().contiguous().t()
    x = torch.randn(77, 40, device=device)[:, :].t()
    assert not x.is_contiguous()
    idx = random_unique_indices(23 * 77, 99, device=device)
    out = poison_(torch.empty(99, device=device))
    sparse_delta_grad(dy, x, idx, 77, strategy=strategy, out=out)
    assert_close(out, ref.sparse_delta_grad(dy.double(), x.double(), idx, 77), torch.float32)


def test_launcher_rejects_bad_input(device):
    from sparse_kernels.sddmm import sparse_delta_grad
    from sparse_kernels.sparse_delta import sparse_delta_materialize
    w = torch.randn(4, 5, device=device)
    with pytest.raises(TypeError, match="idx"):
        sparse_delta_materialize(w, torch.randn(2, device=device),
                                 torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(ValueError, match="contiguous"):
        sparse_delta_materialize(w.t(), torch.randn(2, device=device),
                                 torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="in_features"):
        sparse_delta_grad(torch.randn(3, 4, device=device), torch.randn(3, 5, device=device),
                          torch.tensor([1], device=device), 6)


@pytest.mark.parametrize("n_rows, n_cols, first_row, k", [(7, 13, 5, 60), (1, 1000, 0, 300),
                                                           (3, 5, 0, 0)])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
def test_gather_row_block(device, n_rows, n_cols, first_row, k, idx_dtype, sort):
    from sparse_kernels.sddmm import gather_row_block
    total_rows = first_row + n_rows + 4
    full = torch.randn(total_rows, n_cols, device=device)
    lo, hi = first_row * n_cols, (first_row + n_rows) * n_cols
    edges = torch.tensor([e for e in (lo - 1, lo, hi - 1, hi) if e >= 0])
    idx = torch.cat([edges, random_unique_indices(total_rows * n_cols, k)]).unique()
    if not sort:
        idx = idx[torch.randperm(idx.numel())]
    idx = idx.to(device=device, dtype=idx_dtype)
    out = poison_(torch.empty(idx.numel(), device=device))
    gather_row_block(full[first_row:first_row + n_rows].contiguous(), idx, out, first_row,
                     n_cols)
    rows = idx.long() // n_cols
    inside = (rows >= first_row) & (rows < first_row + n_rows)
    torch.testing.assert_close(out[inside], full.view(-1)[idx.long()][inside], rtol=0, atol=0)
    assert out[~inside].isnan().all()  # left as it was


def test_gather_row_block_rejects_bad_input(device):
    from sparse_kernels.sddmm import gather_row_block
    block = torch.randn(2, 6, device=device)
    idx = torch.tensor([1, 2], device=device)
    out = torch.empty(2, device=device)
    with pytest.raises(ValueError, match="block"):
        gather_row_block(block.t(), idx, out, 0, 2)
    with pytest.raises(TypeError, match="idx"):
        gather_row_block(block, idx.float(), out, 0, 6)
    with pytest.raises(ValueError, match="out"):
        gather_row_block(block, idx, torch.empty(3, device=device), 0, 6)
    with pytest.raises(ValueError, match="first_row"):
        gather_row_block(block, idx, out, -1, 6)
