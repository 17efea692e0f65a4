"""Fused multi-tensor optimizer steps on SpIEL sparse deltas, as torch.library custom ops.

Ops (namespace `spft`), both in place and declaring what they mutate:
* `fused_sparse_sm3_(dvs, grads, idxs, row_accs, col_accs, momentum_buffers, weights,
  base_values, n_cols, parities, lrs, weight_decays, epss, momentums)` — mutates dvs,
  row_accs, col_accs, momentum_buffers, weights.
* `fused_sparse_adamw_(dvs, grads, exp_avgs, exp_avg_sqs, steps, idxs, weights, base_values,
  lrs, beta1s, beta2s, epss, weight_decays)` — mutates dvs, exp_avgs, exp_avg_sqs, steps,
  weights.

One Triton launch serves every tensor of the call (see `sparse_kernels/optim.py` for the
pointer-table layout); other devices (and `SPFT_BACKEND=torch`) loop over the references in
`spft.reference.optim`. The public wrappers call the op through the dispatcher under
`torch.compile`; in eager mode they call its implementation directly, because the dispatcher's
per-tensor argument handling of ~1,800 list entries (224 matrices) costs more host time than the
whole GPU step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spft import _backend
from spft.reference import optim as reference
from spft.reference import sparse_delta as reference_delta

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _present(ts: list) -> list[Tensor | None]:
    """Optional entries: None or an empty tensor mean "absent" (the op schema takes `Tensor[]`
    with empty placeholders, because torch's functionalization of mutable `Tensor?[]` lists
    fails on None entries)."""
    return [None if t is None or t.numel() == 0 else t for t in ts]


def _placeholders(ts: list, like: Tensor) -> list[Tensor]:
    return [like.new_empty(0) if t is None else t for t in ts]


def _use_triton(tensors: list[Tensor], op: str) -> bool:
    if not tensors:
        return False
    return _backend.use_triton(tensors[0], op=op, supported_dtypes=_TRITON_DTYPES)


def _sm3_impl(dvs: list[Tensor], grads: list[Tensor], idxs: list[Tensor],
              row_accs: list[Tensor], col_accs: list[Tensor], momentum_buffers: list[Tensor],
              weights: list[Tensor], base_values: list[Tensor], n_cols: list[int],
              parities: list[int], lrs: list[float], weight_decays: list[float],
              epss: list[float], momentums: list[float]) -> None:
    col_accs, momentum_buffers = _present(col_accs), _present(momentum_buffers)
    weights, base_values = _present(weights), _present(base_values)
    if _use_triton(dvs, "fused_sparse_sm3_"):
        from sparse_kernels.optim import fused_sparse_sm3_
        fused_sparse_sm3_(dvs, grads, idxs, row_accs, col_accs, momentum_buffers, weights,
                          base_values, n_cols, parities, lrs, weight_decays, epss, momentums)
        return
    for t, dv in enumerate(dvs):
        par = parities[t] & 1
        row_new = row_accs[t][1 - par]
        row_new.copy_(row_accs[t][par])
        col_new = None
        if col_accs[t] is not None:
            col_new = col_accs[t][1 - par]
            col_new.copy_(col_accs[t][par])
        reference.sm3_sparse_step_(dv, grads[t], idxs[t], n_cols[t], row_new, col_new,
                                   lr=lrs[t], eps=epss[t], momentum=momentums[t],
                                   momentum_buffer=momentum_buffers[t],
                                   weight_decay=weight_decays[t])
        if weights[t] is not None:
            reference_delta.sparse_delta_refresh_(weights[t], base_values[t], dv, idxs[t])


def _adamw_impl(dvs: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], steps: list[Tensor], idxs: list[Tensor],
                weights: list[Tensor], base_values: list[Tensor], lrs: list[float],
                beta1s: list[float], beta2s: list[float], epss: list[float],
                weight_decays: list[float]) -> None:
    weights, base_values = _present(weights), _present(base_values)
    if _use_triton(dvs, "fused_sparse_adamw_"):
        from sparse_kernels.optim import fused_sparse_adamw_
        fused_sparse_adamw_(dvs, grads, exp_avgs, exp_avg_sqs, steps, idxs, weights,
                            base_values, lrs, beta1s, beta2s, epss, weight_decays)
        return
    for t, dv in enumerate(dvs):
        reference.adamw_sparse_step_(dv, grads[t], exp_avgs[t], exp_avg_sqs[t], steps[t],
                                     lr=lrs[t], beta1=beta1s[t], beta2=beta2s[t], eps=epss[t],
                                     weight_decay=weight_decays[t])
        if weights[t] is not None:
            reference_delta.sparse_delta_refresh_(weights[t], base_values[t], dv, idxs[t])


_sm3_op = torch.library.custom_op(
    "spft::fused_sparse_sm3_",
    mutates_args=("dvs", "row_accs", "col_accs", "momentum_buffers", "weights"))(_sm3_impl)
_adamw_op = torch.library.custom_op(
    "spft::fused_sparse_adamw_",
    mutates_args=("dvs", "exp_avgs", "exp_avg_sqs", "steps", "weights"))(_adamw_impl)


@_sm3_op.register_fake
def _(*args) -> None:
    return None


@_adamw_op.register_fake
def _(*args) -> None:
    return None


def fused_sparse_sm3_(dvs: list[Tensor], grads: list[Tensor], idxs: list[Tensor],
                      row_accs: list[Tensor], col_accs: list[Tensor | None],
                      momentum_buffers: list[Tensor | None], weights: list[Tensor | None],
                      base_values: list[Tensor | None], n_cols: list[int], parities: list[int],
                      lrs: list[float], weight_decays: list[float], epss: list[float],
                      momentums: list[float]) -> None:
    """Sparse SM3 step on every tensor t, in place (see `spft.reference.optim.sm3_sparse_step_`).

    dvs[t], grads[t]: [k_t]; idxs[t]: [k_t] int32/int64 sorted unique flat indices into an
    [m_t, n_cols[t]] weight; row_accs[t]: [2, m_t] fp32 ping-pong accumulators (read half
    parities[t], the other half receives the new values); col_accs[t]: [2, n_cols[t]] fp32 or
    None (row cover only); momentum_buffers[t]: [k_t] fp32 or None; weights[t]: merged weight
    to refresh with base_values[t] ([k_t] fp32 W0[idx]), or None.
    """
    args = (dvs, grads, idxs, row_accs, col_accs, momentum_buffers, weights, base_values,
            [int(v) for v in n_cols], [int(v) for v in parities], [float(v) for v in lrs],
            [float(v) for v in weight_decays], [float(v) for v in epss],
            [float(v) for v in momentums])
    if torch.compiler.is_compiling():
        like = dvs[0] if dvs else torch.empty(0)
        args = (*args[:4], *(_placeholders(a, like) for a in args[4:8]), *args[8:])
        torch.ops.spft.fused_sparse_sm3_(*args)
    else:
        _sm3_impl(*args)


def fused_sparse_adamw_(dvs: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], steps: list[Tensor], idxs: list[Tensor],
                        weights: list[Tensor | None], base_values: list[Tensor | None],
                        lrs: list[float], beta1s: list[float], beta2s: list[float],
                        epss: list[float], weight_decays: list[float]) -> None:
    """Sparse AdamW step with per-index step counts on every tensor t, in place (see
    `spft.reference.optim.adamw_sparse_step_`). exp_avgs/exp_avg_sqs: [k_t] fp32 or bf16;
    steps: [k_t] int32; idxs/weights/base_values only for the merged refresh."""
    args = (dvs, grads, exp_avgs, exp_avg_sqs, steps, idxs, weights, base_values,
            [float(v) for v in lrs], [float(v) for v in beta1s], [float(v) for v in beta2s],
            [float(v) for v in epss], [float(v) for v in weight_decays])
    if torch.compiler.is_compiling():
        like = dvs[0] if dvs else torch.empty(0)
        args = (*args[:6], *(_placeholders(a, like) for a in args[6:8]), *args[8:])
        torch.ops.spft.fused_sparse_adamw_(*args)
    else:
        _adamw_impl(*args)


def sm3_dense_step_(param: Tensor, grad: Tensor, accumulators: list[Tensor], *, lr: float,
                    eps: float, momentum: float, momentum_buffer: Tensor | None,
                    weight_decay: float, row_cover_only: bool) -> None:
    """SM3-II step on a dense tensor (plain torch on every device: SpIEL's dense trainables are
    few and small, e.g. biases and norms). See `spft.reference.optim.sm3_dense_step_`."""
    reference.sm3_dense_step_(param, grad, accumulators, lr=lr, eps=eps, momentum=momentum,
                              momentum_buffer=momentum_buffer, weight_decay=weight_decay,
                              row_cover_only=row_cover_only)


# --------------------------------------------------------------------------- cached plans
def plan_fused_sparse_sm3(dvs: list[Tensor], grads: list[Tensor], idxs: list[Tensor],
                          row_accs: list[Tensor], col_accs: list[Tensor | None],
                          momentum_buffers: list[Tensor | None], weights: list[Tensor | None],
                          base_values: list[Tensor | None], n_cols: list[int],
                          parities: list[int], lrs: list[float], weight_decays: list[float],
                          epss: list[float], momentums: list[float]) -> list | None:
    """Eager Triton path only: validate and upload the launch tables of `fused_sparse_sm3_`
    once, for reuse by `run_plan_sm3_` while no tensor is replaced (the optimizers cache it
    keyed by the data pointers; state changes such as a regrowth invalidate it). None when the
    call would not run on Triton; then call `fused_sparse_sm3_`."""
    if torch.compiler.is_compiling() or not _use_triton(dvs, "fused_sparse_sm3_"):
        return None
    from sparse_kernels.optim import prepare_fused_sparse_sm3
    return prepare_fused_sparse_sm3(dvs, grads, idxs, row_accs, _present(col_accs),
                                    _present(momentum_buffers), _present(weights),
                                    _present(base_values), n_cols, parities, lrs,
                                    weight_decays, epss, momentums)


def run_plan_sm3_(plan: list, flip: int) -> None:
    """One SM3 step from a cached plan; flip = (steps since the plan was made) % 2."""
    from sparse_kernels.optim import launch_fused_sparse_sm3
    launch_fused_sparse_sm3(plan, flip)


#: let the optimizers replay cached plans as CUDA graphs (off: plain Triton launches)
USE_CUDA_GRAPHS = True


def capture_plan_sm3(plan: list, flip: int) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph of `run_plan_sm3_(plan, flip)`, or None where graphs do not apply (see
    `sparse_kernels.optim.capture_fused_sparse_sm3`). Launch the plan with this flip once
    before capturing it."""
    from sparse_kernels.optim import capture_fused_sparse_sm3
    return capture_fused_sparse_sm3(plan, flip)


def plan_fused_sparse_adamw(dvs: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                            exp_avg_sqs: list[Tensor], steps: list[Tensor], idxs: list[Tensor],
                            weights: list[Tensor | None], base_values: list[Tensor | None],
                            lrs: list[float], beta1s: list[float], beta2s: list[float],
                            epss: list[float], weight_decays: list[float]) -> list | None:
    """As `plan_fused_sparse_sm3`, for `fused_sparse_adamw_`."""
    if torch.compiler.is_compiling() or not _use_triton(dvs, "fused_sparse_adamw_"):
        return None
    from sparse_kernels.optim import prepare_fused_sparse_adamw
    return prepare_fused_sparse_adamw(dvs, grads, exp_avgs, exp_avg_sqs, steps, idxs,
                                      _present(weights), _present(base_values), lrs, beta1s,
                                      beta2s, epss, weight_decays)


def run_plan_adamw_(plan: list) -> None:
    from sparse_kernels.optim import launch_fused_sparse_adamw
    launch_fused_sparse_adamw(plan)


def refresh_plan_hyperparameters(plan: list, *columns: list[float]) -> None:
    """Re-upload a cached plan's per-tensor hyperparameters (see sparse_kernels.optim)."""
    from sparse_kernels.optim import refresh_plan_hyperparameters as refresh
    refresh(plan, *columns)
