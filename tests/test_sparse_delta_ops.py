"""spft.ops.sparse_delta_linear and its building blocks vs the float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, random_unique_indices

import spft.ops as ops
from spft.reference import sparse_delta as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDX_DTYPES = [torch.int32, torch.int64]


def _case(lead, n_in, n_out, k, dtype, idx_dtype, device="cpu", bias=True, dv_dtype=None):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(*lead, n_in, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(device=device, dtype=dtype)
    idx = random_unique_indices(n_in * n_out, k, dtype=idx_dtype, device=device, generator=g)
    dv = (0.1 * torch.randn(k, generator=g)).to(device=device, dtype=dv_dtype or torch.float32)
    b = torch.randn(n_out, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, w, dv, idx, b


def _reference_grads(x, w, dv, idx, b, dy):
    """Forward and all gradients of the float64 reference."""
    xd = x.detach().double().requires_grad_()
    dvd = dv.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    y = ref.sparse_delta_linear(xd, w.double(), dvd, idx, bd)
    y.backward(dy.double())
    return y.detach(), xd.grad, dvd.grad, (bd.grad if bd is not None else None)


def _check_op(x, w, dv, idx, b, merged=False, tol_scale=1.0):
    x = x.clone().requires_grad_()
    dv = dv.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    w_run = w
    if merged:
        w_run = ref.sparse_delta_materialize(w, dv.detach(), idx)
    y = ops.sparse_delta_linear(x, w_run, dv, idx, b, merged=merged)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, ddv_ref, db_ref = _reference_grads(x, w, dv, idx, b, dy)
    assert y.dtype == w.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_close(y, y_ref, w.dtype, tol_scale)
    assert_close(x.grad, dx_ref, w.dtype, tol_scale)
    assert dv.grad.dtype == dv.dtype
    # The dv gradient is a long fp32 reduction of products of dtype-rounded inputs.
    assert_close(dv.grad, ddv_ref, w.dtype if w.dtype != torch.float32 else torch.float32,
                 2 * tol_scale)
    if b is not None:
        assert_close(b.grad, db_ref, w.dtype, tol_scale)


CPU_CASES = [
    pytest.param(((5,), 7, 3, 4), id="T5-in7-out3-k4"),
    pytest.param(((2, 9), 33, 17, 60), id="B2xT9-in33-out17-k60"),
    pytest.param(((3, 2, 5), 64, 40, 0), id="3x2x5-in64-out40-k0"),
    pytest.param(((13,), 19, 23, 19 * 23), id="T13-in19-out23-full"),
]


@pytest.mark.parametrize("shape", CPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_torch_backend(shape, dtype, idx_dtype, bias):
    lead, n_in, n_out, k = shape
    _check_op(*_case(lead, n_in, n_out, k, dtype, idx_dtype, bias=bias))


@pytest.mark.parametrize("shape", CPU_CASES[:2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("merged", [False, True], ids=["materialise", "merged"])
def test_linear_triton_backend(triton_backend, device, shape, dtype, merged):
    lead, n_in, n_out, k = shape
    _check_op(*_case(lead, n_in, n_out, k, dtype, torch.int32, device=device), merged=merged,
              tol_scale=2.0)


def test_dv_in_weight_dtype():
    _check_op(*_case((6,), 20, 10, 30, torch.bfloat16, torch.int64, dv_dtype=torch.bfloat16))


def test_k_zero_is_plain_linear():
    x, w, dv, idx, b = _case((4,), 16, 8, 0, torch.float32, torch.int64)
    torch.testing.assert_close(ops.sparse_delta_linear(x, w, dv, idx, b),
                               torch.nn.functional.linear(x, w, b))


def test_unsorted_indices_are_sorted_with_their_deltas():
    x, w, dv, idx, b = _case((5,), 12, 6, 20, torch.float64, torch.int64)
    perm = torch.randperm(20)
    dv_u = dv[perm].clone().requires_grad_()
    y = ops.sparse_delta_linear(x, w, dv_u, idx[perm], b)
    torch.testing.assert_close(y, ref.sparse_delta_linear(x, w, dv, idx, b))
    y.sum().backward()
    dv_s = dv.clone().requires_grad_()
    ref.sparse_delta_linear(x, w, dv_s, idx, b).sum().backward()
    torch.testing.assert_close(dv_u.grad, dv_s.grad[perm])


def test_gradcheck_reference_fp64():
    x, w, dv, idx, b = _case((3, 4), 9, 5, 12, torch.float64, torch.int64)
    inputs = (x.requires_grad_(), dv.double().requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, dv, b: ref.sparse_delta_linear(x, w, dv, idx, b),
                                    inputs)


def test_gradcheck_custom_op_fp64():
    x, w, dv, idx, b = _case((4,), 9, 5, 12, torch.float64, torch.int64)
    inputs = (x.requires_grad_(), dv.double().requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x, dv, b: ops.sparse_delta_linear(x, w, dv, idx, b), inputs)


@pytest.mark.parametrize("merged", [False, True])
def test_eager_path_equals_registered_op(merged):
    """The public function runs the op bodies through an autograd.Function in eager mode;
    the registered op (what torch.compile sees) must give the same values and gradients."""
    x, w, dv, idx, b = _case((2, 3), 9, 5, 12, torch.float64, torch.int64)
    dv = dv.double()
    weight = ref.sparse_delta_materialize(w, dv, idx) if merged else w
    op = torch.ops.spft.sparse_delta_linear_merged if merged else torch.ops.spft.sparse_delta_linear
    results = []
    for fn in (lambda *a: ops.sparse_delta_linear(*a, merged=merged), op):
        xs, dvs, bs = (t.clone().requires_grad_() for t in (x, dv, b))
        y = fn(xs, weight, dvs, idx, bs)
        y.square().sum().backward()
        results.append((y, xs.grad, dvs.grad, bs.grad))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_merged_op_gradients_match_materialising_fp64():
    # The merged op reads the deltas from the weight (refreshed after each step), so its dv
    # gradient is checked against the materialising op rather than by finite differences.
    x, w, dv, idx, b = _case((4,), 9, 5, 12, torch.float64, torch.int64)
    dv = dv.double()
    w_merged = ref.sparse_delta_materialize(w, dv, idx)
    grads = []
    for weight, merged in ((w, False), (w_merged, True)):
        xs, dvs, bs = (t.clone().requires_grad_() for t in (x, dv, b))
        ops.sparse_delta_linear(xs, weight, dvs, idx, bs, merged=merged).square().sum().backward()
        grads.append((xs.grad, dvs.grad, bs.grad))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c)


def test_opcheck_all_ops():
    x, w, dv, idx, b = _case((2, 3), 24, 10, 30, torch.float32, torch.int64)
    x.requires_grad_()
    dv.requires_grad_()
    for op in (torch.ops.spft.sparse_delta_linear, torch.ops.spft.sparse_delta_linear_merged):
        torch.library.opcheck(op, (x, w, dv, idx, b))
        torch.library.opcheck(op, (x, w, dv, idx, None))
    torch.library.opcheck(torch.ops.spft.sparse_delta_materialize, (w, dv.detach(), idx))
    dy = torch.randn(6, 10)
    torch.library.opcheck(torch.ops.spft.sparse_delta_grad,
                          (dy, x.detach().reshape(6, 24), idx, 24, "auto"))
    torch.library.opcheck(torch.ops.spft.sparse_delta_refresh_,
                          (w.clone(), torch.randn(30), dv.detach(), idx))


def test_materialize_and_grad_building_blocks():
    x, w, dv, idx, _ = _case((11,), 21, 13, 50, torch.float32, torch.int32)
    torch.testing.assert_close(ops.sparse_delta_materialize(w, dv, idx),
                               ref.sparse_delta_materialize(w, dv, idx))
    dy = torch.randn(11, 13)
    dense = dy.double().T @ x.double()
    torch.testing.assert_close(ops.sparse_delta_grad(dy, x, idx, 21),
                               dense.view(-1)[idx.long()].float(), rtol=1e-5, atol=1e-5)


def test_grad_checks_and_sorts_indices():
    x, _, _, idx, _ = _case((9,), 12, 10, 40, torch.float32, torch.int64)
    dy = torch.randn(9, 10)
    dense = (dy.double().T @ x.double()).view(-1)
    shuffled = idx[torch.randperm(idx.numel())]
    torch.testing.assert_close(ops.sparse_delta_grad(dy, x, shuffled, 12),
                               dense[shuffled].float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        ops.sparse_delta_grad(dy, x, torch.tensor([0, 120]), 12)
    with pytest.raises(ValueError, match="duplicate"):
        ops.sparse_delta_grad(dy, x, torch.tensor([5, 3, 5]), 12)


def test_grad_staged_strategy_on_cpu_means_auto():
    x, _, _, idx, _ = _case((11,), 24, 16, 50, torch.bfloat16, torch.int64)
    dy = torch.randn(11, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.sparse_delta_grad(dy, x, idx, 24, "staged"),
                               ops.sparse_delta_grad(dy, x, idx, 24, "auto"))


def test_grad_chunked_strategy_on_cpu_means_auto():
    x, _, _, idx, _ = _case((11,), 24, 16, 50, torch.bfloat16, torch.int32)
    dy = torch.randn(11, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.sparse_delta_grad(dy, x, idx, 24, "chunked"),
                               ops.sparse_delta_grad(dy, x, idx, 24, "auto"))


def test_staged_grad_reasons():
    from spft.ops.sparse_delta import staged_grad_reasons
    idx = torch.arange(4)
    ok_dy, ok_x = torch.empty(5, 16, dtype=torch.bfloat16), torch.empty(5, 24, dtype=torch.bfloat16)
    assert staged_grad_reasons(ok_dy, ok_x, idx) == []
    assert any("float32" in r for r in staged_grad_reasons(ok_dy.float(), ok_x.float(), idx))
    assert any("multiples of 8" in r
               for r in staged_grad_reasons(torch.empty(5, 12, dtype=torch.bfloat16), ok_x, idx))
    strided = torch.empty(5, 48, dtype=torch.bfloat16)[:, ::2]
    assert any("x rows" in r for r in staged_grad_reasons(ok_dy, strided, idx))
    assert any("dy rows" in r
               for r in staged_grad_reasons(torch.empty(5, 20, dtype=torch.bfloat16)[:, :16],
                                            ok_x, idx))
    wide_rows = torch.empty(16, dtype=torch.bfloat16).as_strided((1, 16), (2**27, 1))
    assert any("row stride" in r for r in staged_grad_reasons(wide_rows, ok_x[:1], idx))


def test_refresh_is_an_assignment():
    w = torch.randn(8, 9, dtype=torch.bfloat16)
    idx = random_unique_indices(72, 10)
    base = w.view(-1)[idx].float()
    dv = torch.randn(10)
    for _ in range(3):  # repeated refreshes never accumulate
        ops.sparse_delta_refresh_(w, base, dv, idx)
    torch.testing.assert_close(w.view(-1)[idx], (base + dv).bfloat16(), rtol=0, atol=0)


# ------------------------------------------------------------------------ bad input
def _bad(**overrides):
    x, w, dv, idx, b = _case((4,), 16, 8, 10, torch.float32, torch.int64)
    args = {"x": x, "weight": w, "dv": dv, "idx": idx, "bias": b}
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, match", [
    pytest.param({"x": torch.randn(4, 15)}, ValueError, "x must end", id="x-shape"),
    pytest.param({"x": torch.randn(4, 16, dtype=torch.float64)}, TypeError, "x dtype",
                 id="x-dtype"),
    pytest.param({"weight": torch.randn(16)}, ValueError, "weight must be 2-D", id="w-1d"),
    pytest.param({"weight": torch.randn(16, 8).T}, ValueError, "contiguous", id="w-strided"),
    pytest.param({"weight": torch.randint(0, 3, (8, 16))}, TypeError, "weight", id="w-int"),
    pytest.param({"idx": torch.arange(10, dtype=torch.float32)}, TypeError, "idx",
                 id="idx-float"),
    pytest.param({"idx": torch.arange(9)}, ValueError, "equal length", id="len-mismatch"),
    pytest.param({"idx": torch.arange(120, 130)}, ValueError, "outside", id="out-of-range"),
    pytest.param({"idx": torch.tensor([-1, *range(1, 10)])}, ValueError, "outside",
                 id="negative"),
    pytest.param({"idx": torch.tensor([5, 1, 2, 3, 4, 5, 6, 7, 8, 9])}, ValueError,
                 "duplicate", id="duplicates"),
    pytest.param({"dv": torch.randn(10, dtype=torch.float64)}, TypeError, "dv", id="dv-dtype"),
    pytest.param({"bias": torch.randn(7)}, ValueError, "bias", id="bias-shape"),
    pytest.param({"x": "not a tensor"}, TypeError, "x must be a torch.Tensor", id="x-type"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        ops.sparse_delta_linear(**_bad(**overrides))


def test_bad_strategy():
    with pytest.raises(ValueError, match="strategy"):
        ops.sparse_delta_grad(torch.randn(3, 4), torch.randn(3, 5), torch.arange(3), 5, "dense")


def test_forced_triton_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("SPFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: Triton can serve the call")
    with pytest.raises(RuntimeError, match="cannot serve"):
        ops.sparse_delta_linear(**_bad())
