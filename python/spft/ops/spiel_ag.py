"""The sparse-delta linear with SpIEL-AG candidate statistics gathered in its backward.

`sparse_delta_linear_ag(x, weight, dv, idx, bias, merged=..., tracker=...)` computes the same
forward as `spft.ops.sparse_delta_linear`. Its backward feeds a `CandidateTracker`:

* phase "find" (first backward after arming): the candidates are the top-|dW| positions of the
  full weight gradient, found inside a tile-GEMM kernel that never writes dW
  (`grad_topk_candidates`); active positions are removed; their gradients are sample 1.
* phase "accumulate": one `sparse_delta_grad` call over the merged sorted list idx ∪ candidates
  gives the deltas' gradient and the candidates' gradients in the same sampled pass; the
  candidates' sum and sum of squares and the sample count grow by one.

Statistics change only in backward, which autograd runs once per micro-batch, so activation
checkpointing (forward recomputed inside backward) never double-counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spft.ops import grow as grow_ops
from spft.ops.sparse_delta import _validate_linear, eager_grad, eager_materialize


class CandidateTracker:
    """Per-layer SpIEL-AG state.

    Args:
        num_candidates: how many top-|grad| positions to look for in the "find" backward
            (active ones are then dropped, so slightly fewer may remain).
        per_segment: slots per (row, 128-column segment) of the fused top-k (exactness knob).
    Attributes after the first backward: `cand_idx` [c] int64 sorted (derived on access),
    `grad_sum` and `grad_sq_sum` [c] fp32, `samples` (python int: backward passes seen),
    `exact`. Held per layer: the sorted union of active and candidate indices in idx's dtype
    and the int32 positions of both sets in it (one SDDMM over the union serves both), plus the
    two sums: 8 B per active delta + 16 B per candidate.
    """

    def __init__(self, num_candidates: int, per_segment: int = 4) -> None:
        if num_candidates < 0:
            raise ValueError(f"num_candidates must be >= 0, got {num_candidates}")
        self.num_candidates = int(num_candidates)
        self.per_segment = int(per_segment)
        self.phase = "find"
        self.samples = 0
        self.exact = True
        self.grad_sum: Tensor | None = None
        self.grad_sq_sum: Tensor | None = None
        self._union: Tensor | None = None
        self._active_pos: Tensor | None = None
        self._cand_pos: Tensor | None = None

    @property
    def cand_idx(self) -> Tensor | None:
        """[c] int64 sorted candidate indices (None before the first backward)."""
        if self._union is None:
            return None
        return self._union[self._cand_pos].long()

    @property
    def num_tracked(self) -> int:
        return 0 if self._cand_pos is None else self._cand_pos.numel()

    @torch.no_grad()
    def set_candidates(self, cand_idx: Tensor, values: Tensor | None, idx: Tensor) -> None:
        """Adopt candidates (any order, may overlap idx: overlaps are removed)."""
        cand = cand_idx.to(device=idx.device, dtype=torch.long).unique()
        active = idx.long()
        if active.numel() and cand.numel():
            at = torch.searchsorted(active, cand).clamp_(max=active.numel() - 1)
            keep = active[at] != cand
        else:
            keep = torch.ones_like(cand, dtype=torch.bool)
        if values is not None:
            order = torch.argsort(cand_idx.to(device=idx.device, dtype=torch.long))
            values = values.to(idx.device, torch.float32)[order][keep]
        cand = cand[keep]
        merged = torch.cat([active, cand])
        order = torch.argsort(merged)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        self._union = merged[order].to(idx.dtype)
        # int32 positions: a layer never holds 2**31 deltas
        self._active_pos = inverse[:active.numel()].to(torch.int32)
        self._cand_pos = inverse[active.numel():].to(torch.int32)
        del merged, order, inverse
        if values is None:
            self.grad_sum = torch.zeros(cand.numel(), dtype=torch.float32, device=idx.device)
            self.grad_sq_sum = torch.zeros_like(self.grad_sum)
        else:
            self.grad_sum = values.clone()
            self.grad_sq_sum = values * values
        self.samples = 0 if values is None else 1
        self.phase = "accumulate"

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("num_candidates", "per_segment", "phase", "samples",
                                              "exact", "cand_idx", "grad_sum", "grad_sq_sum")}

    def load_state_dict(self, state: dict, idx: Tensor) -> None:
        self.num_candidates = state["num_candidates"]
        self.per_segment = state["per_segment"]
        self.exact = state["exact"]
        if state["phase"] == "accumulate":
            self.set_candidates(state["cand_idx"], None, idx)
            self.grad_sum.copy_(state["grad_sum"])
            self.grad_sq_sum.copy_(state["grad_sq_sum"])
        self.phase = state["phase"]
        self.samples = state["samples"]


class _SparseDeltaLinearAG(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, dv, idx, bias, merged, tracker):
        if isinstance(weight, Tensor):
            y = F.linear(x, weight if merged else eager_materialize(weight, dv, idx), bias)
            ctx.save_for_backward(x, weight, dv, idx)
            ctx.base_4bit = None
        else:  # an NF4Weight (qSpIEL): same maths, the base is dequantised where it is used
            from spft.ops.nf4 import sparse_delta_linear_nf4
            y = sparse_delta_linear_nf4(x, weight, dv, idx, bias, check_indices=False)
            ctx.save_for_backward(x, dv, idx)
            # A frozen container of the module's own 4-bit buffers (no copy, no grad).
            ctx.base_4bit = weight
        ctx.merged = merged
        ctx.tracker = tracker
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.base_4bit is None:
            x, weight, dv, idx = ctx.saved_tensors
            out_f, in_f = weight.shape
        else:
            x, dv, idx = ctx.saved_tensors
            out_f, in_f = ctx.base_4bit.shape
        tracker: CandidateTracker = ctx.tracker
        dy2 = dy.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f)
        dx = ddv = dbias = None
        if ctx.needs_input_grad[0]:
            if ctx.base_4bit is not None:
                from spft.ops.nf4 import nf4_dequantize_scatter
                w = nf4_dequantize_scatter(ctx.base_4bit, dv, idx, dtype=dy.dtype,
                                           check_indices=False)
            elif ctx.merged:
                w = weight
            else:
                w = eager_materialize(weight, dv, idx)
            dx = (dy2 @ w).view(x.shape)
        if tracker.phase == "find":
            cand, vals, exact = grow_ops.grad_topk_candidates(
                dy2, x2, min(tracker.num_candidates, out_f * in_f),
                per_segment=tracker.per_segment)
            tracker.exact = exact
            tracker.set_candidates(cand, vals, idx)
            g = eager_grad(dy2, x2, idx, in_f)
        else:
            full = eager_grad(dy2, x2, tracker._union, in_f)
            g = full[tracker._active_pos]
            c = full[tracker._cand_pos]
            tracker.grad_sum += c
            tracker.grad_sq_sum.addcmul_(c, c)
            tracker.samples += 1
        if ctx.needs_input_grad[2]:
            ddv = g.to(dv.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            dbias = dy2.sum(0, dtype=torch.float32 if dy.dtype != torch.float64 else None
                            ).to(dy.dtype)
        return dx, None, ddv, None, dbias, None, None


def sparse_delta_linear_ag(x: Tensor, weight: Tensor | object, dv: Tensor, idx: Tensor,
                           bias: Tensor | None = None, *, merged: bool = False,
                           tracker: CandidateTracker) -> Tensor:
    """`spft.ops.sparse_delta_linear` (idx sorted unique, as modules keep it) whose backward
    updates `tracker` (see module docstring). Shapes and dtypes as for sparse_delta_linear;
    `weight` may be a 4-bit base (`NF4Weight` / bnb `Params4bit`, qSpIEL-AG)."""
    if isinstance(weight, Tensor):
        _validate_linear(x, weight, dv, idx, bias)
    else:
        from spft.ops.nf4 import as_nf4_weight
        weight = as_nf4_weight(weight)  # TypeError for anything that is not a 4-bit base
        if merged:
            raise ValueError("merged=True is not supported on a 4-bit base weight")
    if not isinstance(tracker, CandidateTracker):
        raise TypeError(f"tracker must be a CandidateTracker, got {type(tracker).__name__}")
    return _SparseDeltaLinearAG.apply(x, weight, dv, idx, bias, merged, tracker)
