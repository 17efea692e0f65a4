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
        self._plan: dict | None = None

    def accumulators(self, p: Tensor) -> tuple[Tensor, Tensor | None]:
        """The current (row_acc [m], col_acc [n] or None) of a sparse parameter (views)."""
        state = self.state[p]
        par = state["step"] % 2
        col = state.get("col_acc")
        return state["row_acc"][par], (col[par] if col is not None else None)

    def _init_sparse(self, p: Tensor, owner: nn.Module, group: dict) -> dict:
        state = self.state[p]
        if not state:
            m, n = owner.out_features, owner.in_features  # also for 4-bit bases
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

    def step(self, closure=None):
        # no_grad only where torch ops run: the cached fused step runs none (saves host time)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = []  # (p, owner, group) of the sparse params with a gradient
        key = []
        owners = self._owners
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError("SM3 takes dense .grad tensors (sparse deltas carry dense "
                                    "[k] gradients)")
                owner = owners.get(id(p))
                if owner is None:
                    with torch.no_grad():
                        self._dense_step(p, group)
                    continue
                if grad.shape != p.shape or p.dim() != 1:
                    raise ValueError("a sparse delta and its gradient must be 1-D [k]")
                sparse.append((p, owner, group))
                bv = owner.base_values
                key.append((id(p), p.data_ptr(), grad.data_ptr(), owner.idx.data_ptr(),
                            0 if bv is None else bv.data_ptr()))
        if sparse:
            states = self._sparse_step(sparse, tuple(key))
            for state in states:
                state["step"] += 1
        return loss

    def _dense_step(self, p: Tensor, group: dict) -> None:
        state = self._init_dense(p, group)
        accs = [state[k] for k in sorted(state) if k.startswith("acc_")]
        optim_ops.sm3_dense_step_(
            p, p.grad, accs, lr=group["lr"], eps=group["eps"], momentum=group["momentum"],
            momentum_buffer=state.get("momentum_buffer"), weight_decay=group["weight_decay"],
            row_cover_only=group["row_cover_only"])
        state["step"] += 1

    @staticmethod
    def _hyper(sparse: list) -> list[list[float]]:
        return [[g["lr"] for *_, g in sparse], [g["weight_decay"] for *_, g in sparse],
                [g["eps"] for *_, g in sparse], [g["momentum"] for *_, g in sparse]]

    def _sparse_step(self, sparse: list, key: tuple) -> list[dict]:
        """Step the sparse params (p, owner, group) in one fused launch; returns their states."""
        groups = tuple((g["lr"], g["weight_decay"], g["eps"], g["momentum"])
                       for g in self.param_groups)
        cached = self._plan
        if cached is not None and cached["key"] == key:
            # Same tensors as when the plan was made: reuse its uploaded tables.
            if cached["groups"] != groups:
                optim_ops.refresh_plan_hyperparameters(cached["plan"], *self._hyper(sparse))
                cached["groups"] = groups
            states = cached["states"]
            self._run_cached(cached, (states[0]["step"] - cached["step"]) & 1)
            return states
        with torch.no_grad():
            return self._new_plan(sparse, key, groups)

    def _new_plan(self, sparse: list, key: tuple, groups: tuple) -> list[dict]:
        states = [self._init_sparse(p, o, g) for p, o, g in sparse]
        args = ([p for p, *_ in sparse], [p.grad for p, *_ in sparse],
                [o.idx for _, o, _ in sparse], [s["row_acc"] for s in states],
                [s.get("col_acc") for s in states], [s.get("momentum_buffer") for s in states],
                [o.weight if o.base_values is not None else None for _, o, _ in sparse],
                [o.base_values for _, o, _ in sparse], [o.in_features for _, o, _ in sparse],
                [s["step"] % 2 for s in states], *self._hyper(sparse))
        plan = optim_ops.plan_fused_sparse_sm3(*args)
        if plan is None:
            self._plan = None
            optim_ops.fused_sparse_sm3_(*args)
            return states
        self._plan = {"key": key, "plan": plan, "groups": groups, "states": states,
                      "step": states[0]["step"], "graphs": [None, None], "eager": [0, 0]}
        self._run_cached(self._plan, 0)
        return states

    @staticmethod
    def _run_cached(cached: dict, flip: int) -> None:
        # The first launch of each flip runs eagerly (it may compile the kernel); later ones
        # replay a CUDA graph of it, which costs far less host time than a Triton launch.
        graph = cached["graphs"][flip]
        if graph is None and cached["eager"][flip] and optim_ops.USE_CUDA_GRAPHS:
            graph = cached["graphs"][flip] = optim_ops.capture_plan_sm3(cached["plan"], flip)
        if graph is not None and not torch.cuda.is_current_stream_capturing():
            graph.replay()
        else:
            cached["eager"][flip] = 1
            optim_ops.run_plan_sm3_(cached["plan"], flip)
