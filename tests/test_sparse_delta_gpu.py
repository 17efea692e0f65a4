"""GPU-only checks at realistic sizes: Triton kernels, strategies, compile with inductor."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, poison_, random_unique_indices

import spft.nn as snn
import spft.ops as ops
from spft.reference import sparse_delta as ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n_out, n_in, T", [(1100, 409, 513), (4096, 1024, 256)])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_linear_gpu(n_out, n_in, T, density, dtype, idx_dtype):
    dev = "cuda"
    k = max(1, int(density * n_out * n_in))
    x = torch.randn(2, T // 2 + 1, n_in, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(n_out, n_in, device=dev) / n_in**0.5).to(dtype)
    idx = random_unique_indices(n_out * n_in, k, dtype=idx_dtype, device=dev)
    dv = (0.1 * torch.randn(k, device=dev)).requires_grad_()
    b = torch.randn(n_out, device=dev, dtype=dtype, requires_grad=True)
    y = ops.sparse_delta_linear(x, w, dv, idx, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    dvd = dv.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_()
    yd = ref.sparse_delta_linear(xd, w.double(), dvd, idx, bd)
    yd.backward(dy.double())
    assert_close(y, yd, dtype, scale=2)
    assert_close(x.grad, xd.grad, dtype, scale=2)
    assert_close(b.grad, bd.grad, dtype, scale=2)
    assert_close(dv.grad, dvd.grad, dtype if dtype != torch.float32 else torch.float32,
                 scale=4)


@pytest.mark.parametrize("strategy", ["tiles", "sampled"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_grad_strategies_gpu(strategy, idx_dtype):
    from sparse_kernels.sddmm import sparse_delta_grad
    dy = torch.randn(1000, 777, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1000, 555, device="cuda", dtype=torch.bfloat16)
    idx = random_unique_indices(777 * 555, 9000, dtype=idx_dtype, device="cuda")
    out = poison_(torch.empty(9000, device="cuda"))
    sparse_delta_grad(dy, x, idx, 555, strategy=strategy, out=out)
    assert_close(out, ref.sparse_delta_grad(dy.double(), x.double(), idx, 555), torch.float32,
                 scale=8)


def _staged(dy, x, idx, splits=-1, fill=-1, schedule=-1, blocks=-1):
    import spft._C as C
    return C.sddmm_staged(dy, x, idx, x.shape[1], splits, fill, schedule, blocks)


# How the blocks share the work: the default rule; fixed splits of each tile's tokens
# (schedule 0: the default count, one, three); or equal segments of all tiles' stages
# (schedule 1: one block per SM; 7 blocks, each through several tiles; 300 blocks, several
# pieces per tile, so more than two planes). (schedule, splits, blocks):
SCHEDULES = {"default": (-1, -1, -1), "splits": (0, -1, -1), "splits1": (0, 1, -1),
             "splits3": (0, 3, -1), "segments": (1, -1, -1), "segments7": (1, -1, 7),
             "segments300": (1, -1, 300)}


def _grad_reference(dy, x, idx):
    return ref.sparse_delta_grad(dy.double(), x.double(), idx, x.shape[1])


# Tiles of 512 × 512: shapes with partial tiles in both directions, token counts that are not
# multiples of the 16-token stage, densities that need one and several passes over the tokens
# (3072 entries per pass), and every schedule.
@pytest.mark.parametrize("n_out, n_in, T", [(1032, 2056, 37), (3000, 1024, 1000),
                                            (2048, 4104, 300)])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("fill", [0, 1], ids=["block_barrier", "stage_barriers"])
def test_grad_staged_gpu(n_out, n_in, T, density, dtype, idx_dtype, schedule, fill):
    pytest.importorskip("spft._C")
    dy = torch.randn(T, n_out, device="cuda", dtype=dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    k = max(1, int(density * n_out * n_in))
    idx = random_unique_indices(n_out * n_in, k, dtype=idx_dtype, device="cuda")
    which, splits, blocks = SCHEDULES[schedule]
    out = _staged(dy, x, idx, splits, fill, which, blocks)
    assert out.dtype == torch.float32 and out.shape == (k,)
    assert_close(out, _grad_reference(dy, x, idx), torch.float32, scale=8)
    # The partial sums are added in a fixed order: a repeated call gives the same bits.
    assert torch.equal(_staged(dy, x, idx, splits, fill, which, blocks), out)


@pytest.mark.parametrize("fill", [0, 1], ids=["block_barrier", "stage_barriers"])
@pytest.mark.parametrize("schedule", ["splits", "segments", "segments300"])
def test_grad_staged_dense_rows_and_edges_gpu(fill, schedule):
    """Whole rows of a tile filled (runs longer than a lane pair's share), duplicates, indices
    outside the weight (gradient 0, in every plane), strided-but-aligned rows, an empty idx,
    and tiles without entries."""
    pytest.importorskip("spft._C")
    which, splits, blocks = SCHEDULES[schedule]
    n_out, n_in, T = 1040, 2048, 64
    base = torch.randn(T, n_out + 8, device="cuda", dtype=torch.bfloat16)
    dy = base[:, :n_out]  # row stride n_out + 8: contiguous, 16-byte aligned rows
    x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16)
    full_rows = torch.arange(5 * n_in, 9 * n_in, device="cuda")
    some = random_unique_indices(n_out * n_in, 20_000, device="cuda")
    idx = torch.cat([full_rows, some, some[:100]]).sort().values
    def run(idx):
        return _staged(dy, x, idx, splits, fill, which, blocks)

    out = run(idx)
    assert_close(out, _grad_reference(dy, x, idx), torch.float32, scale=8)
    outside = torch.tensor([-3, 0, n_out * n_in - 1, n_out * n_in, n_out * n_in + 5],
                           device="cuda")
    got = run(outside)
    assert got[0] == 0 and got[3] == 0 and got[4] == 0
    assert_close(got[1:3], _grad_reference(dy, x, outside[1:3]), torch.float32, scale=8)
    assert run(idx[:0]).shape == (0,)


def test_grad_staged_blocks_ask_for_segments_gpu():
    """An explicit block count with the default schedule runs segments (the same bits as
    schedule 1 with that count), also on a weight whose default rule alone picks splits."""
    pytest.importorskip("spft._C")
    n_out, n_in, T = 1024, 1024, 1000  # 4 tiles: the default splits fit in one wave
    dy = torch.randn(T, n_out, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16)
    idx = random_unique_indices(n_out * n_in, 10_000, device="cuda")
    asked = _staged(dy, x, idx, blocks=7)
    segments = _staged(dy, x, idx, schedule=1, blocks=7)
    splits = _staged(dy, x, idx, schedule=0)
    assert_close(asked, _grad_reference(dy, x, idx), torch.float32, scale=8)
    assert torch.equal(asked, segments)
    assert not torch.equal(splits, segments)  # the two schedules round differently here


def test_grad_staged_bad_input_gpu():
    C = pytest.importorskip("spft._C")
    dy = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 32, device="cuda", dtype=torch.bfloat16)
    idx = torch.arange(10, device="cuda")
    with pytest.raises(TypeError, match="dy must be bfloat16"):
        C.sddmm_staged(dy.float(), x.float(), idx, 32)
    with pytest.raises(TypeError, match="x must have dy's dtype"):
        C.sddmm_staged(dy, x.half(), idx, 32)
    with pytest.raises(ValueError, match="multiples of 8"):
        C.sddmm_staged(dy[:, :60], x, idx, 32)
    with pytest.raises(ValueError, match="x rows"):
        C.sddmm_staged(dy, x[:, 1:25], idx, 24)
    with pytest.raises(ValueError, match="in_features"):
        C.sddmm_staged(dy, x, idx, 16)
    with pytest.raises(TypeError, match="idx must be int32 or int64"):
        C.sddmm_staged(dy, x, idx.float(), 32)
    # A row stride the kernel's 32-bit copy steps cannot hold is refused, not mis-addressed.
    wide_rows = dy[:1].clone().as_strided((1, 64), (2**27, 1))
    with pytest.raises(ValueError, match="row strides must be below 2\\^27"):
        C.sddmm_staged(wide_rows, x[:1], idx, 32)
    with pytest.raises(ValueError, match="fill must be -1, 0 or 1"):
        C.sddmm_staged(dy, x, idx, 32, -1, 2)
    with pytest.raises(ValueError, match="schedule must be -1, 0 or 1"):
        C.sddmm_staged(dy, x, idx, 32, schedule=2)
    with pytest.raises(ValueError, match="splits applies to schedule 0"):
        C.sddmm_staged(dy, x, idx, 32, splits=2, schedule=1)
    with pytest.raises(ValueError, match="blocks applies to schedule 1"):
        C.sddmm_staged(dy, x, idx, 32, schedule=0, blocks=4)
    with pytest.raises(ValueError, match="not both"):
        C.sddmm_staged(dy, x, idx, 32, splits=2, blocks=4)
    with pytest.raises(ValueError, match="blocks must be -1 or in"):
        C.sddmm_staged(dy, x, idx, 32, blocks=0)
    with pytest.raises(ValueError, match="splits must be -1 or in"):
        C.sddmm_staged(dy, x, idx, 32, splits=0)


def test_grad_staged_through_op_gpu():
    """`auto` takes the staged kernel at 1 % and returns what `tiles` returns."""
    pytest.importorskip("spft._C")
    dy = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    idx = random_unique_indices(2048 * 1024, 20_000, dtype=torch.int32, device="cuda")
    auto = ops.sparse_delta_grad(dy, x, idx, 1024, check_indices=False)
    staged = _staged(dy, x, idx)
    torch.testing.assert_close(auto, staged, rtol=0, atol=0)
    assert_close(ops.sparse_delta_grad(dy, x, idx, 1024, "tiles"), staged, torch.float32,
                 scale=8)


@pytest.mark.parametrize("n_out, n_in, T", [(1031, 2057, 37), (3000, 1024, 1000)])
@pytest.mark.parametrize("block_elems", [None, 300_000, 2057])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_grad_chunked_gpu(n_out, n_in, T, block_elems, dtype, idx_dtype):
    """dW a block of rows at a time (one block, several with a partial last one, one row each):
    the float64 reference's values at every index, whatever the order of idx."""
    from spft.ops.sparse_delta import grad_chunked
    dy = torch.randn(T, n_out, device="cuda", dtype=dtype)
    x = torch.randn(T, n_in, device="cuda", dtype=dtype)
    k = int(0.03 * n_out * n_in)
    idx = random_unique_indices(n_out * n_in, k, dtype=idx_dtype, device="cuda")
    out = grad_chunked(dy, x, idx, n_in, block_elems)
    assert out.dtype == torch.float32 and out.shape == (k,)
    expected = _grad_reference(dy, x, idx)
    assert_close(out, expected, torch.float32, scale=8)
    perm = torch.randperm(k, device="cuda")
    torch.testing.assert_close(grad_chunked(dy, x, idx[perm], n_in, block_elems), out[perm],
                               rtol=0, atol=0)
    # through the op, on strided inputs
    x_wide = torch.zeros(T, n_in + 5, device="cuda", dtype=dtype)
    x_wide[:, :n_in] = x
    via_op = ops.sparse_delta_grad(dy, x_wide[:, :n_in], idx, n_in, "chunked",
                                   check_indices=False)
    assert_close(via_op, expected, torch.float32, scale=8)


def test_grad_auto_above_one_percent_is_chunked_gpu():
    from spft.ops.sparse_delta import grad_chunked
    dy = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16)
    idx = random_unique_indices(2048 * 1024, 50_000, dtype=torch.int32, device="cuda")
    auto = ops.sparse_delta_grad(dy, x, idx, 1024, check_indices=False)
    torch.testing.assert_close(auto, grad_chunked(dy, x, idx, 1024), rtol=0, atol=0)
    # fp32 keeps the tiles
    tiles = ops.sparse_delta_grad(dy.float(), x.float(), idx, 1024, "tiles", check_indices=False)
    torch.testing.assert_close(ops.sparse_delta_grad(dy.float(), x.float(), idx, 1024,
                                                     check_indices=False), tiles, rtol=0, atol=0)


def test_grad_chunked_broadcast_dy_gpu():
    """`loss.sum().backward()` hands the linear an expanded dy (stride 0): the chunked gradient
    through the linear's backward equals the float64 reference's."""
    n_out, n_in, T = 200, 136, 50
    x = torch.randn(T, n_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
    idx = random_unique_indices(n_out * n_in, 1000, dtype=torch.int64, device="cuda")
    dv = torch.zeros(1000, device="cuda", requires_grad=True)
    ops.sparse_delta_linear(x, w, dv, idx, check_indices=False).sum().backward()
    dy = torch.ones(1, 1, device="cuda", dtype=torch.bfloat16).expand(T, n_out)
    assert_close(dv.grad, _grad_reference(dy, x, idx), torch.float32, scale=8)


def test_materialize_exact_gpu():
    from sparse_kernels.sparse_delta import sparse_delta_materialize
    w = torch.randn(3001, 1023, device="cuda", dtype=torch.bfloat16)
    idx = random_unique_indices(w.numel(), 30_000, device="cuda")
    dv = torch.randn(30_000, device="cuda")
    out = poison_(torch.empty_like(w))
    sparse_delta_materialize(w, dv, idx, out=out)
    torch.testing.assert_close(out, ref.sparse_delta_materialize(w, dv, idx), rtol=0, atol=0)


def test_compile_inductor_gpu():
    lin = torch.nn.Linear(512, 256, device="cuda", dtype=torch.bfloat16)
    m = snn.SparseDeltaLinear(lin, density=0.01)
    with torch.no_grad():
        m.dv.normal_()
    x = torch.randn(4, 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.float().square().sum().backward()
    g = (x.grad.clone(), m.dv.grad.clone())
    x.grad, m.dv.grad = None, None
    yc = torch.compile(m, fullgraph=True)(x)
    yc.float().square().sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(x.grad, g[0])
    torch.testing.assert_close(m.dv.grad, g[1], rtol=1e-3, atol=1e-3)


def test_merged_mode_gpu_matches_materialising():
    lin = torch.nn.Linear(700, 300, device="cuda", dtype=torch.bfloat16)
    m = snn.SparseDeltaLinear(lin, density=0.02)
    with torch.no_grad():
        m.dv.normal_()
    x = torch.randn(129, 700, device="cuda", dtype=torch.bfloat16)
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)
