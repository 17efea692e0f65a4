"""SpIEL drop-and-grow: MA/AG selection vs brute force, controller invariants, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spft.nn import SparseDeltaLinear, apply_sparse_deltas
from spft.ops import grow as grow_ops
from spft.optim import SM3, AdamW
from spft.reference import grow as R
from spft.spiel import CandidateTracker, SpIELController


# --------------------------------------------------------------------------- MA selection
def _acc_case(m, n, ties, seed):
    g = torch.Generator().manual_seed(seed)
    row, col = torch.rand(m, generator=g), torch.rand(n, generator=g)
    if ties:
        row[::3] = row[0]            # repeated values: tied products
        col[::4] = 0.0               # zero columns: a large tie at 0
        row[min(5, m - 1)] = 0.0
        col[1::5] = col[1]
    return row, col


@pytest.mark.parametrize("m,n,k,grow,ties", [
    pytest.param(7, 13, 20, 15, False, id="7x13-k20-g15"),
    pytest.param(7, 13, 20, 15, True, id="7x13-k20-g15-ties"),
    pytest.param(37, 50, 300, 100, True, id="37x50-k300-g100-ties"),
    pytest.param(64, 40, 100, 2000, True, id="64x40-k100-g2000-ties-into-zeros"),
    pytest.param(5, 3, 0, 15, False, id="5x3-k0-all"),
    pytest.param(9, 11, 30, 0, False, id="grow0"),
])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_ma_select_equals_brute_force(triton_backend, device, m, n, k, grow, ties, idx_dtype):
    row, col = _acc_case(m, n, ties, seed=m * n + k)
    active = torch.randperm(m * n, generator=torch.Generator().manual_seed(k))[:k].sort().values
    got = grow_ops.ma_select(row.to(device), col.to(device), active.to(device, idx_dtype), grow)
    want = R.ma_select(row, col, active, grow)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), want)


def test_ma_select_all_zero_accumulators_picks_smallest_indices(triton_backend, device):
    row, col = torch.zeros(6, device=device), torch.zeros(7, device=device)
    active = torch.tensor([0, 2, 3], device=device)
    got = grow_ops.ma_select(row, col, active, 4).cpu()
    assert got.tolist() == [1, 4, 5, 6]


def test_ma_select_bad_input():
    row, col = torch.rand(4), torch.rand(5)
    with pytest.raises(ValueError, match="num_grow"):
        grow_ops.ma_select(row, col, torch.arange(3), 18)
    with pytest.raises(ValueError, match="sorted"):
        grow_ops.ma_select(row, col, torch.tensor([3, 1]), 2)
    with pytest.raises(TypeError, match="row_acc"):
        grow_ops.ma_select(row.double(), col, torch.arange(3), 2)
    with pytest.raises(ValueError, match="active_idx"):
        grow_ops.ma_select(row, col, torch.tensor([1, 25]), 2)


# --------------------------------------------------------------------------- AG candidates
@pytest.mark.parametrize("T,out_f,in_f,c,dtype", [
    pytest.param(19, 37, 150, 30, torch.float32, id="T19-out37-in150-c30-fp32"),
    pytest.param(8, 5, 7, 35, torch.float32, id="T8-out5-in7-all-fp32"),
    pytest.param(33, 20, 70, 12, torch.bfloat16, id="T33-out20-in70-c12-bf16"),
])
def test_ag_candidates_equal_brute_force(triton_backend, device, T, out_f, in_f, c, dtype):
    g = torch.Generator().manual_seed(T + out_f)
    dy = torch.randn(T, out_f, generator=g).to(device, dtype)
    x = torch.randn(T, in_f, generator=g).to(device, dtype)
    idx, vals, exact = grow_ops.grad_topk_candidates(dy, x, c, per_segment=c)
    want_idx, want_vals = R.ag_candidates(dy.cpu(), x.cpu(), c)
    assert exact
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(vals.cpu(), want_vals, atol=1e-4, rtol=1e-4)


def test_ag_candidates_report_inexact_when_segments_saturate(triton_backend, device):
    # One dominant row: all its values are in the global top-c, far more than 2 per segment.
    dy = torch.zeros(4, 6, device=device)
    dy[:, 2] = 10.0
    dy += 0.01 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(device)
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(1)).to(device)
    _, _, exact = grow_ops.grad_topk_candidates(dy, x, 10, per_segment=2)
    assert not exact


def test_ag_candidates_bad_input():
    with pytest.raises(ValueError, match="num_candidates"):
        grow_ops.grad_topk_candidates(torch.randn(3, 4), torch.randn(3, 5), 21)
    with pytest.raises(ValueError, match="equal T"):
        grow_ops.grad_topk_candidates(torch.randn(3, 4), torch.randn(2, 5), 2)


# --------------------------------------------------------------------------- controller
class _Tiny(nn.Module):
    def __init__(self, ckpt: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(12, 24)
        self.down_proj = nn.Linear(24, 6)
        self.ckpt = ckpt

    def _body(self, x):
        return self.down_proj(torch.tanh(self.up_proj(x)))

    def forward(self, x):
        if self.ckpt:
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


def _task(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    teacher = _Tiny()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(n, 12, generator=g)
    with torch.no_grad():
        y = teacher(x)
    return x, y


def _student(device, density=0.1, ckpt=False, merged=False, seed=1):
    torch.manual_seed(seed)
    model = _Tiny(ckpt=ckpt)
    apply_sparse_deltas(model, target_modules=("up_proj", "down_proj"), density=density,
                        merged=merged, seed=seed)
    return model.to(device)


def test_drop_grow_cycle_invariants(triton_backend, device):
    model = _student(device, density=0.2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    opt = AdamW([m.dv for m in layers.values()], lr=1e-2, modules=model)
    ctl = SpIELController(model, opt, "ag", total_steps=100, reselect_every=4,
                          accumulation_steps=2, initial_fraction=0.3)
    x, y = _task()
    x, y = x.to(device)[:32], y.to(device)[:32]
    before = {}
    for step in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == 3:
            before = {n: (m.idx.clone(), m.dv.detach().clone(),
                          opt.state[m.dv]["exp_avg"].clone()) for n, m in layers.items()}
        stats = ctl.step()
    assert stats is not None
    for name, layer in layers.items():
        old_idx, old_dv, old_m = before[name]
        idx = layer.idx.long()
        k = old_idx.numel()
        assert idx.numel() == k and layer.dv.numel() == k
        assert bool((idx[1:] > idx[:-1]).all()), "sorted and unique"
        st = stats[name]
        g = st["grown"]
        assert g == round(0.3 * (1 - 4 / 100) * k) and g > 0
        dropped, grown = st["dropped_positions"].long(), st["grown_positions"].long()
        # dropped = the g smallest |dv|
        thresh = old_dv.abs().sort().values[g - 1]
        drop_mask = torch.isin(old_idx.long(), dropped)
        assert bool((old_dv[drop_mask].abs() <= thresh).all())
        assert bool((old_dv[~drop_mask].abs() >= thresh).all())
        survivors = old_idx.long()[~drop_mask]
        assert not bool(torch.isin(grown, survivors).any())
        assert not bool(torch.isin(grown, old_idx.long()).any())
        assert torch.equal(idx, torch.cat([survivors, grown]).sort().values)
        # optimizer state follows the indices
        st_new = opt.state[layer.dv]
        pos_surv = torch.searchsorted(idx, survivors)
        assert torch.equal(st_new["exp_avg"][pos_surv], old_m[~drop_mask])
        assert torch.equal(layer.dv.detach()[pos_surv], old_dv[~drop_mask])
        pos_grown = torch.searchsorted(idx, grown.sort().values)
        assert bool((layer.dv.detach()[pos_grown] == 0).all())
        assert bool((st_new["step"][pos_grown] == 2).all())  # a = 2 samples / 1
        assert layer.ag_tracker is None


def test_ma_cycle_and_sm3_state_remap(device):
    model = _student(device, density=0.2)
    opt = SM3([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.5,
              modules=model)
    ctl = SpIELController(model, opt, "ma", total_steps=40, reselect_every=3)
    x, y = (t.to(device) for t in _task())
    layer = model.up_proj
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        row, col = opt.accumulators(layer.dv)
        old_idx = layer.idx.long().clone()
        stats = ctl.step()
    grown = stats["up_proj"]["grown_positions"]
    n = stats["up_proj"]["grown"]
    assert torch.equal(grown.cpu(), R.ma_select(row.cpu(), col.cpu(), old_idx.cpu(), n))
    pos = torch.searchsorted(layer.idx.long(), grown)
    assert bool((opt.state[layer.dv]["momentum_buffer"][pos] == 0).all())


def test_ag_statistics_with_checkpointing_and_grad_accumulation(device):
    """Recomputed forwards must not double count; samples count micro-batches."""
    x, y = (t.to(device) for t in _task())
    trackers = []
    for ckpt in (False, True):
        model = _student(device, ckpt=ckpt)
        model.up_proj.ag_tracker = CandidateTracker(10)
        for mb in range(3):
            sl = slice(mb * 32, (mb + 1) * 32)
            nn.functional.mse_loss(model(x[sl].to(device)), y[sl].to(device)).backward()
        trackers.append(model.up_proj.ag_tracker)
    a, b = trackers
    assert a.samples == b.samples == 3
    assert torch.equal(a.cand_idx, b.cand_idx)
    torch.testing.assert_close(a.grad_sum, b.grad_sum)
    torch.testing.assert_close(a.grad_sq_sum, b.grad_sq_sum)
    # the accumulated sum equals the brute-force gradient sum at the candidates
    model = _student(device)
    w = model.up_proj
    dense = torch.zeros(w.out_features * w.in_features, device=device)
    for mb in range(3):
        sl = slice(mb * 32, (mb + 1) * 32)
        wt = w.merged_weight().detach().requires_grad_(True)
        h = torch.tanh(nn.functional.linear(x[sl], wt, w.bias))
        nn.functional.mse_loss(model.down_proj(h), y[sl]).backward()
        dense += wt.grad.reshape(-1)
    torch.testing.assert_close(a.grad_sum, dense[a.cand_idx], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,opt_name", [("ag", "adamw"), ("ag", "sm3"), ("ma", "sm3")])
def test_tiny_model_trains_with_spiel(method, opt_name):
    x, y = _task(n=256)
    model = _student("cpu", density=0.15)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt_name == "adamw":
        opt = AdamW(params, lr=3e-2, modules=model)
    else:
        opt = SM3(params, lr=0.05, momentum=0.5, modules=model)
    ctl = SpIELController(model, opt, method, total_steps=60, reselect_every=6,
                          accumulation_steps=2, grad_accum_steps=2, first_fraction=0.5)
    with torch.no_grad():
        start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        for half in (slice(0, 128), slice(128, 256)):
            (nn.functional.mse_loss(model(x[half]), y[half]) / 2).backward()
        opt.step()
        ctl.step()
    with torch.no_grad():
        end = nn.functional.mse_loss(model(x), y).item()
    assert ctl.reselections >= 8
    assert end < 0.6 * start, (start, end)


def test_controller_state_dict_mid_accumulation(device):
    x, y = (t.to(device) for t in _task())
    model = _student(device)
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, modules=model)
    ctl = SpIELController(model, opt, "ag", total_steps=50, reselect_every=5,
                          accumulation_steps=3)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ctl.step()
    sd = ctl.state_dict()
    assert sd["trackers"] and sd["t"] == 3
    ctl2 = SpIELController(model, opt, "ag", total_steps=50, reselect_every=5,
                           accumulation_steps=3)
    ctl2.load_state_dict(sd)
    t_old = sd["trackers"]["up_proj"]
    t_new = model.up_proj.ag_tracker
    assert t_new.samples == t_old["samples"]
    assert torch.equal(t_new.cand_idx, t_old["cand_idx"])
    assert torch.equal(t_new.grad_sum, t_old["grad_sum"])


def test_controller_bad_input():
    model = _student("cpu")
    opt = AdamW([model.up_proj.dv], modules=model)
    with pytest.raises(ValueError, match="method"):
        SpIELController(model, opt, "xx", total_steps=10)
    with pytest.raises(TypeError, match="SM3"):
        SpIELController(model, opt, "ma", total_steps=10)
    with pytest.raises(ValueError, match="row_cover_only"):
        SpIELController(model, SM3([model.up_proj.dv], row_cover_only=True), "ma",
                        total_steps=10)
    with pytest.raises(ValueError, match="initial_fraction"):
        SpIELController(model, opt, "ag", total_steps=10, initial_fraction=2.0)
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        SpIELController(nn.Linear(2, 2), opt, "ag", total_steps=10)


def test_ag_statistics_on_nf4_base_match_its_dequantised_base():
    """qSpIEL-AG: the tracker sees the same candidates and gradients through the 4-bit forward
    as through a 16-bit layer holding the dequantised weight."""
    from spft.nn.nf4_linear import NF4Linear
    from spft.ops.nf4 import nf4_dequantize

    torch.manual_seed(0)
    quantised = SparseDeltaLinear(NF4Linear.from_linear(nn.Linear(64, 40, bias=False)),
                                  num_deltas=60)
    dense_lin = nn.Linear(64, 40, bias=False)
    with torch.no_grad():
        dense_lin.weight.copy_(nf4_dequantize(quantised.base_4bit.weight, torch.float32))
    dense = SparseDeltaLinear(dense_lin, num_deltas=60)
    dense.set_indices(quantised.idx.clone())
    with torch.no_grad():
        quantised.dv.normal_()
        dense.dv.copy_(quantised.dv)
    for layer in (quantised, dense):
        layer.ag_tracker = CandidateTracker(30)
    for _ in range(2):  # "find", then one "accumulate" step
        x = torch.randn(7, 64)
        dy = torch.randn(7, 40)
        grads = []
        for layer in (quantised, dense):
            xs = x.clone().requires_grad_()
            layer.dv.grad = None
            layer(xs).backward(dy)
            grads.append((xs.grad, layer.dv.grad.clone()))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tq, td = quantised.ag_tracker, dense.ag_tracker
    assert tq.samples == td.samples == 2
    assert torch.equal(tq.cand_idx, td.cand_idx)
    torch.testing.assert_close(tq.grad_sum, td.grad_sum, rtol=1e-5, atol=1e-5)
