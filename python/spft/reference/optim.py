"""Plain-torch references for the spft optimizers: the test oracle and the CPU path.

Sparse tensors are SpIEL deltas: `dv[i]` sits at flat row-major index `idx[i]` of an
`[m, n]` weight (row `idx // n`, column `idx % n`). All functions update their arguments in
place, compute in float64 when given float64 and in float32 otherwise, and mirror the fused
kernels in `sparse_kernels/optim.py` step for step.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def sm3_sparse_step_(dv: Tensor, grad: Tensor, idx: Tensor, n_cols: int, row_acc: Tensor,
                     col_acc: Tensor | None, *, lr: float, eps: float = 1e-30,
                     momentum: float = 0.0, momentum_buffer: Tensor | None = None,
                     weight_decay: float = 0.0) -> None:
    """One SM3 step on sparse deltas (in place on dv, row_acc, col_acc, momentum_buffer).

    dv, grad: [k]; idx: [k] flat indices into an [m, n_cols] weight; row_acc: [m]; col_acc: [n]
    or None (row cover only). Semantics (all nu from the accumulators *before* the step):
        nu_i = min(row_acc[r_i], col_acc[c_i]) + g_i²      (row_acc[r_i] + g_i² when row only)
        row_acc[r] = max(row_acc[r], max_{i in row r} nu_i), likewise col_acc
        u_i = g_i · rsqrt(nu_i + eps); m = (1-β)·u + β·m, u = m (if momentum β > 0)
        dv = dv·(1 - lr·wd) - lr·u
    """
    acc = _acc(dv)
    idx = idx.long()
    r, c = idx // n_cols, idx % n_cols
    g = grad.to(acc)
    if col_acc is None:
        nu = row_acc.to(acc)[r] + g * g
    else:
        nu = torch.minimum(row_acc.to(acc)[r], col_acc.to(acc)[c]) + g * g
    row_acc.copy_(row_acc.to(acc).scatter_reduce(0, r, nu, "amax", include_self=True))
    if col_acc is not None:
        col_acc.copy_(col_acc.to(acc).scatter_reduce(0, c, nu, "amax", include_self=True))
    u = g * torch.rsqrt(nu + eps)
    if momentum > 0:
        m = (1 - momentum) * u + momentum * momentum_buffer.to(acc)
        momentum_buffer.copy_(m)
        u = m
    dv.copy_(dv.to(acc) * (1 - lr * weight_decay) - lr * u)


@torch.no_grad()
def sm3_dense_step_(param: Tensor, grad: Tensor, accumulators: list[Tensor], *, lr: float,
                    eps: float = 1e-30, momentum: float = 0.0,
                    momentum_buffer: Tensor | None = None, weight_decay: float = 0.0,
                    row_cover_only: bool = False) -> None:
    """One SM3-II step on a dense tensor (cover by slices: one accumulator per dimension).

    accumulators: one [shape[d]] tensor per dimension d (just [shape[0]] when row_cover_only;
    a 0-d tensor gets one [1] accumulator). nu = min_d acc_d[broadcast] + g²; acc_d = max of nu
    over all other dimensions; then the update as in `sm3_sparse_step_`.
    """
    acc = _acc(param)
    g = grad.to(acc)
    shape = g.shape if g.dim() > 0 else (1,)
    g = g.reshape(shape)
    dims = [0] if row_cover_only else list(range(len(shape)))
    nu = None
    for d, a in zip(dims, accumulators):
        view = [1] * len(shape)
        view[d] = shape[d]
        term = a.to(acc).view(view)
        nu = term if nu is None else torch.minimum(nu, term)
    nu = nu + g * g
    for d, a in zip(dims, accumulators):
        others = [e for e in range(len(shape)) if e != d]
        a.copy_(nu.amax(dim=others) if others else nu)
    u = g * torch.rsqrt(nu + eps)
    if momentum > 0:
        m = (1 - momentum) * u + momentum * momentum_buffer.to(acc).reshape(shape)
        momentum_buffer.copy_(m.reshape(momentum_buffer.shape))
        u = m
    param.copy_((param.to(acc).reshape(shape) * (1 - lr * weight_decay) - lr * u)
                .reshape(param.shape))


@torch.no_grad()
def adamw_sparse_step_(dv: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                       step: Tensor, *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                       eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One AdamW step with a per-index step count (in place on dv, exp_avg, exp_avg_sq, step).

    dv, grad, exp_avg, exp_avg_sq: [k] (state fp32 or bf16: rounded once after the update);
    step: [k] int32, incremented first. Bias corrections use each index's own step, so
    regrown entries start their own schedule:
        dv = dv·(1 - lr·wd) - lr · (m / (1-β1^s)) / (sqrt(v / (1-β2^s)) + eps)
    """
    acc = _acc(dv)
    step += 1
    s = step.to(acc)
    g = grad.to(acc)
    m = beta1 * exp_avg.to(acc) + (1 - beta1) * g
    v = beta2 * exp_avg_sq.to(acc) + (1 - beta2) * g * g
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    # The kernel computes from the rounded (possibly bf16) state, so does the reference.
    m, v = exp_avg.to(acc), exp_avg_sq.to(acc)
    bc1 = 1 - beta1 ** s
    bc2 = 1 - beta2 ** s
    upd = (m / bc1) / (torch.sqrt(v / bc2) + eps)
    dv.copy_(dv.to(acc) * (1 - lr * weight_decay) - lr * upd)


def sm3_sparse_step_published_(dv: Tensor, grad: Tensor, idx: Tensor, n_cols: int,
                               row_acc: Tensor, col_acc: Tensor, *, lr: float,
                               eps: float = 1e-30) -> None:
    """The sparse SM3 step as the published code runs it (gather, min, addcmul, two
    scatter_reduce, rsqrt, ...: a dozen small torch ops per matrix). Benchmark baseline."""
    rows = torch.div(idx, n_cols, rounding_mode="floor")
    cols = idx - rows * n_cols
    nu = torch.minimum(row_acc[rows], col_acc[cols])
    nu.addcmul_(grad, grad)
    row_acc.scatter_reduce_(0, rows, nu, "amax")
    col_acc.scatter_reduce_(0, cols, nu, "amax")
    update = grad * torch.rsqrt(nu.add_(eps))
    dv.add_(update, alpha=-lr)
