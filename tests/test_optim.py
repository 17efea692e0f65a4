"""spft.optim.SM3 / AdamW: fused multi-tensor steps vs plain-torch step-by-step references."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close as _assert_close
from torch import nn

from spft.nn import SparseDeltaLinear
from spft.optim import SM3, AdamW
from spft.reference import optim as R


def assert_close(actual, expected, *args, **kwargs):
    _assert_close(actual.cpu(), expected.cpu(), *args, **kwargs)


SHAPES = [(7, 13, 20), (37, 50, 300), (5, 3, 15)]  # (out, in, k); the last is full density


def _model(device, idx_dtype=None, merged=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = nn.ModuleList()
    for out_f, in_f, k in SHAPES:
        lin = nn.Linear(in_f, out_f, bias=False).to(device=device, dtype=dtype)
        layer = SparseDeltaLinear(lin, num_deltas=k, generator=g)
        if idx_dtype is not None:
            layer.idx = layer.idx.to(idx_dtype)
        layer.dv.data.copy_(torch.randn(k, generator=g) * 0.1)
        if merged:
            layer.merge()
        layers.append(layer)
    return layers


def _set_grads(layers, step):
    g = torch.Generator().manual_seed(1000 + step)
    for layer in layers:
        grad = torch.randn(layer.dv.shape, generator=g)
        grad[::7] *= 0.01  # spread of magnitudes
        layer.dv.grad = grad.to(layer.dv.device)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("momentum,wd,row_only", [
    pytest.param(0.0, 0.0, False, id="plain"),
    pytest.param(0.9, 0.1, False, id="mom-wd"),
    pytest.param(0.5, 0.0, True, id="row-only"),
])
def test_sm3_sparse_matches_reference_20_steps(triton_backend, device, idx_dtype, momentum, wd,
                                                row_only):
    layers = _model(device, idx_dtype)
    opt = SM3([lyr.dv for lyr in layers], lr=0.05, momentum=momentum, weight_decay=wd,
              row_cover_only=row_only, modules=layers)
    refs = []
    for layer in layers:
        m, n = layer.weight.shape
        refs.append(dict(row=torch.zeros(m, dtype=torch.float64),
                         col=torch.zeros(n, dtype=torch.float64),
                         mom=torch.zeros(layer.num_deltas, dtype=torch.float64),
                         dv=layer.dv.detach().double().cpu().clone()))
    for s in range(20):
        _set_grads(layers, s)
        opt.step()
        for layer, st in zip(layers, refs):
            R.sm3_sparse_step_(st["dv"], layer.dv.grad.double().cpu(), layer.idx.cpu(),
                               layer.in_features, st["row"], None if row_only else st["col"],
                               lr=0.05, momentum=momentum, momentum_buffer=st["mom"],
                               weight_decay=wd)
    for layer, st in zip(layers, refs):
        assert_close(layer.dv.detach(), st["dv"], torch.float32)
        row, col = opt.accumulators(layer.dv)
        assert_close(row, st["row"], torch.float32)
        if row_only:
            assert col is None
        else:
            assert_close(col, st["col"], torch.float32)
        if momentum > 0:
            assert_close(opt.state[layer.dv]["momentum_buffer"], st["mom"], torch.float32)


def _loop_sm3_dense(p, g, accs, lr, eps):
    """Independent element-by-element SM3-II for a 2-D tensor (checks the reference itself)."""
    m, n = p.shape
    row, col = accs
    nu = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            nu[i, j] = min(row[i], col[j]) + g[i, j] ** 2
    for i in range(m):
        row[i] = max(nu[i, j] for j in range(n))
    for j in range(n):
        col[j] = max(nu[i, j] for i in range(m))
    p -= lr * g / torch.sqrt(nu + eps)


def test_sm3_dense_matches_loop_reference_20_steps():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = SM3([p, b], lr=0.1)
    ref_p, ref_b = p.detach().clone(), b.detach().clone()
    accs = [torch.zeros(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    acc_b = torch.zeros(6, dtype=torch.float64)
    for _ in range(20):
        gp, gb = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
        p.grad, b.grad = gp.clone(), gb.clone()
        opt.step()
        _loop_sm3_dense(ref_p, gp, accs, 0.1, 1e-30)
        acc_b = acc_b + gb**2  # 1-D SM3 is Adagrad
        ref_b -= 0.1 * gb / torch.sqrt(acc_b + 1e-30)
    assert_close(p.detach(), ref_p)
    assert_close(b.detach(), ref_b)
    assert_close(opt.state[p]["acc_0"], accs[0])
    assert_close(opt.state[p]["acc_1"], accs[1])


def test_sm3_dense_row_cover_and_momentum():
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = SM3([p], lr=0.1, momentum=0.9, weight_decay=0.01, row_cover_only=True)
    ref = p.detach().clone()
    acc = torch.zeros(4, dtype=torch.float64)
    mom = torch.zeros(4, 3, dtype=torch.float64)
    for _ in range(20):
        g = torch.randn(4, 3, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        nu = acc[:, None] + g * g
        acc = nu.amax(1)
        mom = 0.1 * g / torch.sqrt(nu + 1e-30) + 0.9 * mom
        ref = ref * (1 - 0.1 * 0.01) - 0.1 * mom
    assert_close(p.detach(), ref)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_adamw_sparse_matches_torch_adamw_20_steps(triton_backend, device, idx_dtype):
    layers = _model(device, idx_dtype)
    dvs = [nn.Parameter(lyr.dv.detach().double().cpu().clone()) for lyr in layers]
    opt = AdamW([lyr.dv for lyr in layers], lr=0.01, betas=(0.8, 0.95), weight_decay=0.1,
                modules=layers)
    ref = torch.optim.AdamW(dvs, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    for s in range(20):
        _set_grads(layers, s)
        for d, lyr in zip(dvs, layers):
            d.grad = lyr.dv.grad.double().cpu()
        opt.step()
        ref.step()
    for d, lyr in zip(dvs, layers):
        assert_close(lyr.dv.detach(), d.detach(), torch.float32)
        assert_close(opt.state[lyr.dv]["exp_avg"], ref.state[d]["exp_avg"], torch.float32)
        assert_close(opt.state[lyr.dv]["exp_avg_sq"], ref.state[d]["exp_avg_sq"], torch.float32)
        assert (opt.state[lyr.dv]["step"] == 20).all()


def test_adamw_per_index_steps_match_reference(triton_backend, device):
    layers = _model(device)
    opt = AdamW([lyr.dv for lyr in layers], lr=0.01, weight_decay=0.05, modules=layers)
    _set_grads(layers, 0)
    opt.step()
    refs = []
    for lyr in layers:
        st = opt.state[lyr.dv]
        # Uneven per-index step counts, as after a regrowth.
        st["step"].copy_(torch.arange(lyr.num_deltas, dtype=torch.int32) % 5)
        refs.append([lyr.dv.detach().double().cpu().clone(), st["exp_avg"].double().cpu(),
                     st["exp_avg_sq"].double().cpu(), st["step"].cpu().clone()])
    for s in range(1, 20):
        _set_grads(layers, s)
        opt.step()
        for lyr, (dv, m, v, stp) in zip(layers, refs):
            R.adamw_sparse_step_(dv, lyr.dv.grad.double().cpu(), m, v, stp, lr=0.01,
                                 weight_decay=0.05)
    for lyr, (dv, _, _, stp) in zip(layers, refs):
        assert_close(lyr.dv.detach(), dv, torch.float32)
        assert torch.equal(opt.state[lyr.dv]["step"].cpu(), stp)


def test_adamw_bf16_state(triton_backend, device):
    layers = _model(device)
    opt = AdamW([lyr.dv for lyr in layers], lr=0.01, state_dtype=torch.bfloat16, modules=layers)
    refs = [[lyr.dv.detach().double().cpu().clone(),
             torch.zeros(lyr.num_deltas, dtype=torch.bfloat16),
             torch.zeros(lyr.num_deltas, dtype=torch.bfloat16),
             torch.zeros(lyr.num_deltas, dtype=torch.int32)] for lyr in layers]
    for s in range(10):
        _set_grads(layers, s)
        opt.step()
        for lyr, (dv, m, v, stp) in zip(layers, refs):
            R.adamw_sparse_step_(dv, lyr.dv.grad.double().cpu(), m, v, stp, lr=0.01)
    for lyr, (dv, m, _, _) in zip(layers, refs):
        assert opt.state[lyr.dv]["exp_avg"].dtype == torch.bfloat16
        # the CPU interpreter truncates fp32 -> bf16 (1 ulp); compiled kernels round
        assert_close(opt.state[lyr.dv]["exp_avg"].float(), m.double(), torch.bfloat16, scale=2)
        assert_close(lyr.dv.detach(), dv, torch.bfloat16)


@pytest.mark.parametrize("opt_name", ["sm3", "adamw"])
def test_merged_weights_refreshed_in_same_launch(triton_backend, device, opt_name):
    layers = _model(device, merged=True, dtype=torch.bfloat16)
    w0 = [lyr.base_values.clone() for lyr in layers]
    params = [lyr.dv for lyr in layers]
    if opt_name == "sm3":
        opt = SM3(params, lr=0.05, momentum=0.5, modules=layers)
    else:
        opt = AdamW(params, lr=0.05, modules=layers)
    for s in range(3):
        _set_grads(layers, s)
        opt.step()
    for lyr, base in zip(layers, w0):
        got = lyr.weight.view(-1)[lyr.idx.long()]
        want = (base.double() + lyr.dv.detach().double())
        assert_close(got.float(), want, torch.bfloat16)


@pytest.mark.parametrize("opt_name", ["sm3", "adamw"])
def test_state_dict_round_trip_mid_run(triton_backend, device, opt_name):
    def make(layers):
        params = [lyr.dv for lyr in layers]
        if opt_name == "sm3":
            return SM3(params, lr=0.05, momentum=0.9, weight_decay=0.01, modules=layers)
        return AdamW(params, lr=0.01, weight_decay=0.01, state_dtype=torch.bfloat16,
                     modules=layers)

    a = _model(device)
    b = copy.deepcopy(a)
    opt_a = make(a)
    for s in range(7):  # odd: the SM3 ping-pong parity must survive the round trip
        _set_grads(a, s)
        opt_a.step()
    sd = opt_a.state_dict()
    for la, lb in zip(a, b):
        lb.dv.data.copy_(la.dv.data)
    opt_b = make(b)
    opt_b.load_state_dict(copy.deepcopy(sd))
    for la, lb in zip(a, b):
        for key, val in opt_a.state[la.dv].items():
            other = opt_b.state[lb.dv][key]
            if isinstance(val, torch.Tensor):
                assert other.dtype == val.dtype and torch.equal(other, val), key
            else:
                assert other == val, key
    for s in range(7, 14):
        _set_grads(a, s)
        _set_grads(b, s)
        opt_a.step()
        opt_b.step()
    for la, lb in zip(a, b):
        assert torch.equal(la.dv, lb.dv)


def test_remap_sparse_state(triton_backend, device):
    layers = _model(device)
    opt = AdamW([lyr.dv for lyr in layers], lr=0.01, modules=layers)
    _set_grads(layers, 0)
    opt.step()
    lyr = layers[1]
    st = opt.state[lyr.dv]
    old_m = st["exp_avg"].clone()
    source = torch.arange(lyr.num_deltas)
    source[:3] = -1
    opt.remap_sparse_state(lyr.dv, source, {"exp_avg": torch.tensor([1.0, 2.0, 3.0]),
                                            "step": torch.tensor([4, 4, 4])})
    st = opt.state[lyr.dv]
    assert torch.equal(st["exp_avg"][:3].cpu(), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(st["exp_avg"][3:], old_m[3:])
    assert (st["exp_avg_sq"][:3] == 0).all() and (st["step"][:3] == 4).all()


def test_opcheck_fused_ops():
    torch.manual_seed(0)
    k, m, n = 10, 4, 6
    idx = torch.randperm(m * n)[:k].sort().values
    args = ([torch.randn(k)], [torch.randn(k)], [idx], [torch.rand(2, m)], [torch.rand(2, n)],
            [torch.zeros(k)], [torch.empty(0)], [torch.empty(0)], [n], [0], [0.1], [0.0],
            [1e-30], [0.9])
    torch.library.opcheck(torch.ops.spft.fused_sparse_sm3_.default, args)
    args = ([torch.randn(k)], [torch.randn(k)], [torch.zeros(k)], [torch.zeros(k)],
            [torch.zeros(k, dtype=torch.int32)], [idx], [torch.empty(0)], [torch.empty(0)], [0.1],
            [0.9], [0.999], [1e-8], [0.0])
    torch.library.opcheck(torch.ops.spft.fused_sparse_adamw_.default, args)


def test_bad_arguments():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr"):
        SM3([p], lr=-1)
    with pytest.raises(ValueError, match="momentum"):
        SM3([p], momentum=1.5)
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="state_dtype"):
        AdamW([p], state_dtype=torch.float16)
    with pytest.raises(TypeError, match="modules"):
        SM3([p], modules=[nn.Linear(2, 2)])


@pytest.mark.parametrize("opt_name", ["sm3", "adamw"])
def test_cached_plan_path_with_inplace_grads_and_lr_schedule(triton_backend, device, opt_name):
    """Grads updated in place keep their data pointers: the cached launch tables are reused
    (SM3 flips its ping-pong halves), and an lr change re-uploads only the hyperparameters."""
    layers = _model(device)
    params = [lyr.dv for lyr in layers]
    if opt_name == "sm3":
        opt = SM3(params, lr=0.05, momentum=0.5, modules=layers)
    else:
        opt = AdamW(params, lr=0.05, modules=layers)
    refs = [dict(dv=lyr.dv.detach().double().cpu().clone(),
                 row=torch.zeros(lyr.out_features, dtype=torch.float64),
                 col=torch.zeros(lyr.in_features, dtype=torch.float64),
                 mom=torch.zeros(lyr.num_deltas, dtype=torch.float64),
                 m=torch.zeros(lyr.num_deltas, dtype=torch.float64),
                 v=torch.zeros(lyr.num_deltas, dtype=torch.float64),
                 s=torch.zeros(lyr.num_deltas, dtype=torch.int32)) for lyr in layers]
    for lyr in layers:
        lyr.dv.grad = torch.zeros_like(lyr.dv)
    for step in range(12):
        lr = 0.05 if step < 6 else 0.02
        for group in opt.param_groups:
            group["lr"] = lr
        g = torch.Generator().manual_seed(step)
        for lyr in layers:
            lyr.dv.grad.copy_(torch.randn(lyr.num_deltas, generator=g))
        opt.step()
        assert opt._plan is not None
        for lyr, st in zip(layers, refs):
            grad = lyr.dv.grad.double().cpu()
            if opt_name == "sm3":
                R.sm3_sparse_step_(st["dv"], grad, lyr.idx.cpu(), lyr.in_features, st["row"],
                                   st["col"], lr=lr, momentum=0.5, momentum_buffer=st["mom"])
            else:
                R.adamw_sparse_step_(st["dv"], grad, st["m"], st["v"], st["s"], lr=lr)
    for lyr, st in zip(layers, refs):
        assert_close(lyr.dv.detach(), st["dv"], torch.float32)
        if opt_name == "sm3":
            row, col = opt.accumulators(lyr.dv)
            assert_close(row, st["row"], torch.float32)
            assert_close(col, st["col"], torch.float32)


@pytest.mark.parametrize("m,n", [(2**21 - 1, 999), (195_000, 11_008)], ids=["tall", "wide"])
def test_sm3_row_math_at_row_boundaries(triton_backend, device, m, n):
    """int32 index math: indices at the first and last column of rows across the whole range,
    with (m + 2)·n just under 2**31."""
    from spft.ops import optim as ops
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(m, generator=g)[:600].sort().values
    idx = torch.stack([rows * n, rows * n + n - 1], 1).flatten().unique()
    k = idx.numel()
    grad = torch.randn(k, generator=g)
    dv = torch.randn(k, generator=g)
    row_acc = torch.rand(m, generator=g) * torch.tensor([[1.0], [0.5]])  # new half <= old
    col_acc = torch.rand(n, generator=g) * torch.tensor([[1.0], [0.5]])
    want_dv, want_row, want_col = dv.double(), row_acc[0].double(), col_acc[0].double()
    R.sm3_sparse_step_(want_dv, grad.double(), idx, n, want_row, want_col, lr=0.1)
    dv, grad, row_acc, col_acc = (t.to(device) for t in (dv, grad, row_acc, col_acc))
    ops.fused_sparse_sm3_([dv], [grad], [idx.to(device=device, dtype=torch.int32)], [row_acc],
                          [col_acc], [None], [None], [None], [n], [0], [0.1], [0.0], [1e-30],
                          [0.0])
    assert_close(dv, want_dv, torch.float32)
    assert_close(row_acc[1], want_row, torch.float32)
    assert_close(col_acc[1], want_col, torch.float32)
