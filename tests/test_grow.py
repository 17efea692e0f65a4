"""SpIEL-MA growth selection (`sparse_kernels.grow.ma_select`) against the brute force:
heavy ties, zero / denormal / infinite products, active positions at the threshold, several
column blocks, degenerate shapes; larger shapes on the GPU."""

from __future__ import annotations

import pytest
import torch

from spft.ops import grow as grow_ops
from spft.reference import grow as R


def _case(kind: str, m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "rand":
        return torch.rand(m, generator=g), torch.rand(n, generator=g)
    if kind == "levels":  # few distinct values: most products tie with many others
        lv = torch.tensor([0.0, 0.25, 0.5, 1.0])
        return (lv[torch.randint(0, 4, (m,), generator=g)],
                lv[torch.randint(0, 4, (n,), generator=g)])
    if kind == "extreme":  # inf products, denormal products, underflow to zero, exact zeros
        row = torch.rand(m, generator=g)
        col = torch.rand(n, generator=g)
        row[::4] = 3e38
        col[::5] = 2.0
        row[1::4] = 1e-20
        col[1::5] = 1e-21
        row[2::7] = 0.0
        return row, col
    raise ValueError(kind)


def _active(m: int, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(m * n, generator=g)[:k].sort().values


def _check(row, col, active, grow, device, idx_dtype=torch.int64):
    got = grow_ops.ma_select(row.to(device), col.to(device), active.to(device, idx_dtype), grow)
    want = R.ma_select(row, col, active, grow)
    assert got.dtype == torch.int64 and got.shape == (grow,)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.filterwarnings("ignore:overflow encountered")  # inf products, on purpose
@pytest.mark.parametrize("kind,m,n,k,grow", [
    pytest.param("levels", 23, 37, 200, 1, id="levels-g1"),
    pytest.param("levels", 23, 37, 200, 90, id="levels-g90"),
    pytest.param("levels", 23, 37, 200, 23 * 37 - 200, id="levels-all"),
    pytest.param("extreme", 16, 35, 60, 10, id="extreme-threshold-inf"),
    pytest.param("extreme", 16, 35, 60, 40, id="extreme"),
    pytest.param("extreme", 16, 35, 60, 300, id="extreme-into-zeros"),
    pytest.param("rand", 17, 1, 5, 6, id="n1"),
    pytest.param("rand", 1, 29, 7, 10, id="m1"),
    pytest.param("levels", 3, 1100, 500, 700, id="two-column-blocks"),
    pytest.param("levels", 100, 200, 9000, 3000, id="several-blocks-per-program"),
])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_ma_select_equals_brute_force(triton_backend, device, kind, m, n, k, grow, idx_dtype):
    row, col = _case(kind, m, n, seed=m * n + grow)
    _check(row, col, _active(m, n, k, seed=k), grow, device, idx_dtype)


@pytest.mark.parametrize("grow", [1, 5, 12, 40])
def test_ma_select_active_at_the_threshold(triton_backend, device, grow):
    """Active positions among (and tied with) the largest products must be skipped."""
    row, col = _case("levels", 19, 21, seed=7)
    score = torch.outer(row, col).reshape(-1)
    top = torch.sort(score, descending=True, stable=True).indices
    active = torch.cat([top[:30:2], top[60:90]]).unique()
    _check(row, col, active, grow, device)


def test_ma_select_kernel_rejects_bad_arguments():
    pytest.importorskip("triton")
    from sparse_kernels.grow import ma_select
    row, col = torch.rand(4), torch.rand(5)
    with pytest.raises(TypeError, match="active_idx"):
        ma_select(row, col, torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="num_grow"):
        ma_select(row, col, torch.arange(3), 18)
    with pytest.raises(ValueError, match="1-D"):
        ma_select(row[None], col, torch.arange(3), 1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,m,n,density,frac", [
    pytest.param("rand", 1000, 3000, 0.01, 0.2, id="rand-1000x3000"),
    pytest.param("levels", 700, 2500, 0.05, 0.5, id="levels-700x2500"),
    pytest.param("extreme", 500, 1500, 0.02, 0.3, id="extreme-500x1500"),
    pytest.param("levels", 9000, 3, 0.1, 0.5, id="levels-9000x3"),
    pytest.param("rand", 11008, 4096, 0.01, 0.2, id="rand-11008x4096"),
])
def test_ma_select_equals_brute_force_large(triton_backend, kind, m, n, density, frac):
    row, col = _case(kind, m, n, seed=m + n)
    k = round(density * m * n)
    active = _active(m, n, k, seed=1)
    _check(row.cuda(), col.cuda(), active.cuda(), round(frac * k), "cuda", torch.int32)
