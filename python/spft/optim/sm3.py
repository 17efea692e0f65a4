"""`spft.optim.SM3`: memory-efficient adaptive optimizer for sparse deltas and dense tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from spft.ops import optim as optim_ops
from spft.optim._sparse import SparseStateMixin, collect_owners


class SM3(SparseStateMixin, torch.optim.Optimizer):
    """SM3 (Anil et al., 2019) as SpIEL uses it, one fused launch for all sparse deltas.

    Args:
        params: parameters or param groups (as for any torch optimizer).
        lr: learning rate (default 0.1).
        momentum: β of `m = (1-β)·u + β·m` (0 = no momentum buffer).
        weight_decay: decoupled: `p -= lr·wd·p` before the update.
        eps: added to nu under the rsqrt (default 1e-30).
        row_cover_only: keep one accumulator per row only (sparse: `nu = row_acc[r] + g²`;
            dense: one accumulator along dimension 0).
        modules: a model or iterable of sparse-delta modules (`spft.nn.SparseDeltaLinear`);
            each of their `dv` found in `params` is stepped as a sparse [m, n] tensor (one row
            and one column accumulator per weight row/column). Other params are dense.

    Sparse semantics (delta i at row r, col c; all nu from the accumulators before the step):
    `nu_i = min(row_acc[r], col_acc[c]) + g_i²`, `row_acc[r] = max(row_acc[r], max_row nu)`,
    likewise for columns, `u = g·rsqrt(nu + eps)`. Dense tensors use SM3-II with one
    accumulator per dimension. Merged modules get `W[idx] = round(W0[idx] + dv)` in the same
    launch. State per sparse param: `row_acc` [2, m] and `col_acc` [2, n] fp32 ping-pong
    buffers (current half = `step % 2`, see `accumulators()`), `momentum_buffer` [k], `step`.
    """

    per_index_keys = ("momentum_buffer",)

    def __init__(self, params: Iterable, lr: float = 0.1, *, momentum: float = 0.0,
                 weight_decay: float = 0.0, eps: float = 1e-30, row_cover_only: bool = False,
                 modules: nn.Module | Iterable[nn.Module] | None = None) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        row_cover_only=row_cover_only)
        super().__init__(params, defaults)
        self._owners = collect_owners(modules)

    def accumulators(self, p: Tensor) -> tuple[Tensor, Tensor | None]:
        """The current (row_acc [m], col_acc [n] or None) of a sparse parameter (views)."""
        state = self.state[p]
        par = state["step"] % 2
        col = state.get("col_acc")
        return state["row_acc"][par], (col[par] if col is not None else None)

    def _init_sparse(self, p: Tensor, owner: nn.Module, group: dict) -> dict:
        state = self.state[p]
        if not state:
            m, n = owner.weight.shape
            state["step"] = 0
            state["row_acc"] = torch.zeros(2, m, dtype=torch.float32, device=p.device)
            if not group["row_cover_only"]:
                state["col_acc"] = torch.zeros(2, n, dtype=torch.float32, device=p.device)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros(p.numel(), dtype=torch.float32,
                                                       device=p.device)
        return state

    def _init_dense(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            shape = p.shape if p.dim() > 0 else (1,)
            dims = [0] if group["row_cover_only"] else range(len(shape))
            acc_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            for d in dims:
                state[f"acc_{d}"] = torch.zeros(shape[d], dtype=acc_dtype, device=p.device)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=acc_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sp: dict[str, list] = {k: [] for k in (
            "dvs", "grads", "idxs", "row", "col", "mom", "w", "base", "ncols", "par", "lr",
            "wd", "eps", "beta")}
        states = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("SM3 takes dense .grad tensors (sparse deltas carry dense "
                                    "[k] gradients)")
                owner = self.owner(p)
                if owner is None:
                    state = self._init_dense(p, group)
                    accs = [state[k] for k in sorted(state) if k.startswith("acc_")]
                    optim_ops.sm3_dense_step_(
                        p, p.grad, accs, lr=group["lr"], eps=group["eps"],
                        momentum=group["momentum"], momentum_buffer=state.get("momentum_buffer"),
                        weight_decay=group["weight_decay"], row_cover_only=group["row_cover_only"])
                    state["step"] += 1
                    continue
                if p.dim() != 1 or p.grad.shape != p.shape:
                    raise ValueError("a sparse delta and its gradient must be 1-D [k]")
                state = self._init_sparse(p, owner, group)
                sp["dvs"].append(p)
                sp["grads"].append(p.grad)
                sp["idxs"].append(owner.idx)
                sp["row"].append(state["row_acc"])
                sp["col"].append(state.get("col_acc"))
                sp["mom"].append(state.get("momentum_buffer"))
                merged = owner.base_values is not None
                sp["w"].append(owner.weight if merged else None)
                sp["base"].append(owner.base_values if merged else None)
                sp["ncols"].append(owner.in_features)
                sp["par"].append(state["step"] % 2)
                sp["lr"].append(group["lr"])
                sp["wd"].append(group["weight_decay"])
                sp["eps"].append(group["eps"])
                sp["beta"].append(group["momentum"])
                states.append(state)
        if sp["dvs"]:
            optim_ops.fused_sparse_sm3_(
                sp["dvs"], sp["grads"], sp["idxs"], sp["row"], sp["col"], sp["mom"], sp["w"],
                sp["base"], sp["ncols"], sp["par"], sp["lr"], sp["wd"], sp["eps"], sp["beta"])
            for state in states:
                state["step"] += 1
        return loss
