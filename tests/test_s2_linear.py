"""spft.ops.s2_linear / S2Linear / split-weight kernels vs the references."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, poison_

from spft.nn import S2Linear
from spft.ops import s2_adapter_linear, s2_linear
from spft.reference import s2 as ref

CASES = [
    pytest.param(37, 70, 53, 9, "input", id="T37-in70-out53-s9-input"),
    pytest.param(37, 70, 53, 5, "output", id="T37-in70-out53-s5-output"),
    pytest.param(16, 64, 48, 0, "input", id="s0-input"),
    pytest.param(16, 64, 48, 48, "output", id="sfull-output"),
    pytest.param(5, 33, 17, 33, "input", id="sfull-input"),
]


def _parts(n_in, n_out, s, axis, dtype, device, adjacent=False):
    w = torch.randn(n_out, n_in, dtype=dtype, device=device) / n_in ** 0.5
    if adjacent:
        return w, (w[:s], w[s:]) if axis == "output" else (w[:, :s], w[:, s:])
    if axis == "output":
        return w, (w[:s].clone(), w[s:].clone())
    return w, (w[:, :s].clone(), w[:, s:].clone())


def _check_fwd_bwd(T, n_in, n_out, s, axis, dtype, device, adjacent=False, bias=True):
    w, (t, f) = _parts(n_in, n_out, s, axis, dtype, device, adjacent)
    b = torch.randn(n_out, dtype=dtype, device=device) if bias else None
    x = torch.randn(2, T, n_in, dtype=dtype, device=device)
    dy = torch.randn(2, T, n_out, dtype=dtype, device=device)
    xs, ts = x.clone().requires_grad_(), t.detach().clone().requires_grad_()
    bs = b.clone().requires_grad_() if bias else None
    y = s2_linear(xs, ts, f, axis, bs)
    y.backward(dy)
    # oracle: a dense trainable weight with a gradient mask, float64
    wr = w.double().requires_grad_()
    xr = x.double().requires_grad_()
    br = b.double().requires_grad_() if bias else None
    yr = ref.s2_linear_masked(xr, wr, s, axis, br)
    yr.backward(dy.double())
    assert_close(y, yr, dtype)
    assert_close(xs.grad, xr.grad, dtype)
    gt = wr.grad[:s] if axis == "output" else wr.grad[:, :s]
    assert_close(ts.grad, gt, dtype, scale=2.0)
    if bias:
        assert_close(bs.grad, br.grad, dtype)


@pytest.mark.parametrize("T,n_in,n_out,s,axis", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_s2_linear_reference_backend(T, n_in, n_out, s, axis, dtype):
    _check_fwd_bwd(T, n_in, n_out, s, axis, dtype, "cpu")


@pytest.mark.parametrize("T,n_in,n_out,s,axis", CASES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("adjacent", [False, True], ids=["split", "adjacent"])
def test_s2_linear_triton(triton_backend, device, T, n_in, n_out, s, axis, dtype, adjacent):
    _check_fwd_bwd(T, n_in, n_out, s, axis, dtype, device, adjacent)


@pytest.mark.parametrize("split,s", [("n", 0), ("n", 13), ("n", 53), ("k", 0), ("k", 29),
                                     ("k", 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_mm_kernel(device, split, s, dtype):
    pytest.importorskip("triton")
    import os
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    from sparse_kernels.s2_linear import split_mm
    a = torch.randn(37, 70, dtype=dtype, device=device)
    b = torch.randn(70, 53, dtype=dtype, device=device)
    if split == "n":
        s = min(s, 53)
        b0, b1 = b[:, :s], b[:, s:]
    else:
        b0, b1 = b[:s], b[s:]
    out = poison_(torch.empty(37, 53, dtype=dtype, device=device))
    split_mm(a, b0, b1, split, out=out)
    assert_close(out, a.double() @ b.double(), dtype)
    # transposed operands (the weight parts arrive as .t() views)
    bt = b.t().contiguous().t()
    b0, b1 = (bt[:, :s], bt[:, s:]) if split == "n" else (bt[:s], bt[s:])
    assert_close(split_mm(a, b0, b1, split), a.double() @ b.double(), dtype)


def test_only_slice_saved_input_axis():
    n_in, n_out, s, T = 64, 32, 8, 20
    _, (t, f) = _parts(n_in, n_out, s, "input", torch.float32, "cpu")
    t.requires_grad_()
    x = torch.randn(T, n_in, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        y = s2_linear(x, t, f, "input")
    shapes = [tuple(v.shape) for v in saved]
    assert (T, s) in shapes
    assert (T, n_in) not in shapes, shapes
    assert sum(v.numel() for v in saved if v.shape[0] == T) == T * s
    y.sum().backward()
    # only trainable requires grad: x slice is still saved, no full x
    x2 = torch.randn(T, n_in)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        s2_linear(x2, t, f, "input")
    assert [tuple(v.shape) for v in saved if v.shape[0] == T] == [(T, s)]


def test_output_axis_saves_x_uses_dy_slice():
    n_in, n_out, s, T = 24, 40, 6, 10
    _, (t, f) = _parts(n_in, n_out, s, "output", torch.float64, "cpu")
    t.requires_grad_()
    x = torch.randn(T, n_in, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        y = s2_linear(x, t, f, "output")
    assert any(v is x or v.data_ptr() == x.data_ptr() for v in saved)
    dy = torch.randn(T, n_out, dtype=torch.float64)
    dy[:, s:] = float("nan")  # must never be read for the block's gradient
    y.backward(dy)
    assert torch.isfinite(t.grad).all()
    torch.testing.assert_close(t.grad, dy[:, :s].t() @ x)


def test_no_grad_saves_nothing():
    _, (t, f) = _parts(16, 8, 4, "input", torch.float32, "cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        s2_linear(torch.randn(3, 16), t, f, "input")
    assert saved == []


@pytest.mark.parametrize("axis", ["input", "output"])
def test_opcheck(axis):
    _, (t, f) = _parts(12, 10, 3, axis, torch.float32, "cpu")
    x = torch.randn(2, 5, 12)
    b = torch.randn(10)
    for args in [(x, t.requires_grad_(), f, axis, b), (x.requires_grad_(), t, f, axis, None)]:
        torch.library.opcheck(torch.ops.spft.s2_linear.default, args)
    torch.library.opcheck(torch.ops.spft.s2_linear_dx.default, (torch.randn(4, 10), t.detach(), f,
                                                                axis))


def test_opcheck_adapter_linear():
    x, w = torch.randn(6, 12), torch.randn(10, 12)
    ids = torch.tensor([0, 1, -1, 1, 0, 0])
    idx = [torch.tensor([1, 4]), torch.tensor([7])]
    d = [torch.randn(2, 12), torch.randn(1, 12)]
    torch.library.opcheck(torch.ops.spft.s2_adapter_linear.default,
                          (x, w, None, ids, idx, d, "output"))


def test_compile():
    _, (t, f) = _parts(16, 12, 4, "input", torch.float32, "cpu")
    t.requires_grad_()
    x = torch.randn(5, 16)

    def fn(x, t):
        return s2_linear(x, t, f, "input").relu().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    g1 = torch.autograd.grad(compiled(x, t), t)[0]
    g2 = torch.autograd.grad(fn(x, t), t)[0]
    torch.testing.assert_close(g1, g2)


def test_bad_inputs():
    t, f = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="axis"):
        s2_linear(torch.randn(2, 8), t, f, "rows")
    with pytest.raises(ValueError, match="in_features"):
        s2_linear(torch.randn(2, 9), t, f, "output")
    with pytest.raises(ValueError, match="trainable"):
        s2_linear(torch.randn(2, 8), torch.randn(3, 7), f, "output")
    with pytest.raises(TypeError, match="frozen"):
        s2_linear(torch.randn(2, 8), t, f.double(), "output")
    with pytest.raises(ValueError, match="bias"):
        s2_linear(torch.randn(2, 8), t, f, "output", torch.randn(7))
    with pytest.raises(ValueError, match="s must be"):
        S2Linear(torch.randn(4, 6), 7, "input")
    with pytest.raises(ValueError, match="indices out of range"):
        s2_adapter_linear(torch.randn(2, 8), torch.randn(5, 8), None, torch.tensor([0, 0]),
                          [torch.tensor([5])], [torch.randn(1, 8)], "output")


@pytest.mark.parametrize("axis", ["input", "output"])
def test_module_grad_accumulation_and_checkpoint(axis):
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 12, bias=False).double()
    m = S2Linear.from_linear(lin, 5, axis)
    assert m.trainable.data_ptr() == m.weight.data_ptr()
    x = torch.randn(8, 20, dtype=torch.float64)
    m(x).pow(2).sum().backward()
    full = m.trainable.grad.clone()
    m.trainable.grad = None
    for part in x.split(3):  # gradient accumulation over micro-batches
        m(part).pow(2).sum().backward()
    torch.testing.assert_close(m.trainable.grad, full)
    m.trainable.grad = None
    from torch.utils.checkpoint import checkpoint
    checkpoint(lambda v: m(v).pow(2).sum(), x, use_reentrant=False).backward()
    torch.testing.assert_close(m.trainable.grad, full)
    # an optimizer step updates the weight in place (the trainable block is a view of it)
    with torch.no_grad():
        m.trainable -= 0.1 * m.trainable.grad
    block = m.weight[:5] if axis == "output" else m.weight[:, :5]
    torch.testing.assert_close(block, m.trainable.detach())
    assert m.delta().abs().sum() > 0
    # a copying .to() re-ties the view
    m = m.float()
    assert m.trainable.data_ptr() == m.weight.data_ptr()


@pytest.mark.parametrize("axis", ["input", "output"])
def test_adapter_linear_reference(axis):
    T, n_in, n_out = 11, 24, 18
    x, w, b = torch.randn(T, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
    ids = torch.randint(-1, 3, (T,))
    n = n_out if axis == "output" else n_in
    idx = [torch.randperm(n)[:k] for k in (3, 5, 1)]
    d = [torch.randn(len(i), n_in) if axis == "output" else torch.randn(n_out, len(i))
         for i in idx]
    y = s2_adapter_linear(x, w, b, ids, idx, d, axis)
    for t in range(T):
        wt = w.clone()
        if ids[t] >= 0:
            a = int(ids[t])
            if axis == "output":
                wt[idx[a]] += d[a]
            else:
                wt[:, idx[a]] += d[a]
        torch.testing.assert_close(y[t], x[t] @ wt.t() + b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adapter_linear_triton(triton_backend, device, axis, dtype):
    T, n_in, n_out = 70, 40, 36
    x = torch.randn(T, n_in, dtype=dtype, device=device)
    w = torch.randn(n_out, n_in, dtype=dtype, device=device)
    ids = torch.randint(-1, 3, (T,), device=device)
    n = n_out if axis == "output" else n_in
    idx = [torch.randperm(n)[:k].to(device) for k in (3, 9, 1)]
    d = [torch.randn(len(i), n_in, device=device) if axis == "output"
         else torch.randn(n_out, len(i), device=device) for i in idx]
    y = s2_adapter_linear(x, w, None, ids, idx, d, axis)
    expect = ref.multi_adapter_linear(x.double(), w.double(), None, ids.cpu().to(device), idx,
                                      [v.double() for v in d], axis)
    assert_close(y, expect, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("impl", ["cublas", "triton"])
def test_gpu_split_impls(axis, impl, monkeypatch):
    monkeypatch.setenv("SPFT_S2_SPLIT", impl)
    _check_fwd_bwd(300, 520, 260, 37, axis, torch.bfloat16, "cuda")
    _check_fwd_bwd(64, 520, 260, 37, axis, torch.float32, "cuda", adjacent=True)
