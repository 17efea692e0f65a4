"""`spft.optim.AdamW` (alias `SparseAdamW`): AdamW with per-index step counts for sparse deltas."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from spft.ops import optim as optim_ops
from spft.optim._sparse import SparseStateMixin, collect_owners
from spft.reference import optim as reference

_STATE_DTYPES = (torch.float32, torch.bfloat16)


class SparseAdamW(SparseStateMixin, torch.optim.Optimizer):
    """AdamW whose bias correction runs per index, so regrown deltas start their own schedule.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-3); betas: (β1, β2) (default (0.9, 0.999)); eps: 1e-8.
        weight_decay: decoupled, `p -= lr·wd·p` (default 0).
        state_dtype: float32 (default) or bfloat16 for `exp_avg`/`exp_avg_sq` (low-precision
            state: rounded to nearest once per step; the update uses the rounded values).
        modules: a model or iterable of sparse-delta modules (`spft.nn.SparseDeltaLinear`);
            their `dv` params are updated by one fused launch, merged weights are refreshed in
            the same launch. Other params get the same per-element algorithm in plain torch.

    State per param: `exp_avg`, `exp_avg_sq` ([numel], state_dtype), `step` ([numel] int32).
    The SpIEL controller seeds these for grown indices through `remap_sparse_state`.
    """

    per_index_keys = ("exp_avg", "exp_avg_sq", "step")

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *,
                 state_dtype: torch.dtype = torch.float32,
                 modules: nn.Module | Iterable[nn.Module] | None = None) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if state_dtype not in _STATE_DTYPES:
            raise TypeError(f"state_dtype must be float32 or bfloat16, got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self._owners = collect_owners(modules)
        self._plan: dict | None = None

    def _init_state(self, p) -> dict:
        state = self.state[p]
        if not state:
            n = p.numel()
            dtype = torch.float64 if p.dtype == torch.float64 else self.state_dtype
            state["exp_avg"] = torch.zeros(n, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=dtype, device=p.device)
            state["step"] = torch.zeros(n, dtype=torch.int32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = []
        key = []
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError("AdamW takes dense .grad tensors")
                state = self._init_state(p)
                owner = self._owners.get(id(p))
                if owner is None:
                    reference.adamw_sparse_step_(
                        p.view(-1), grad.reshape(-1), state["exp_avg"], state["exp_avg_sq"],
                        state["step"], lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                        weight_decay=group["weight_decay"])
                    continue
                entries.append((p, owner, state, group))
                bv = owner.base_values
                key.append((id(p), grad.data_ptr(), owner.idx.data_ptr(),
                            0 if bv is None else bv.data_ptr()))
        if entries:
            self._sparse_step(entries, tuple(key))
        return loss

    def _sparse_step(self, entries: list, key: tuple) -> None:
        hyper = [[g["lr"] for *_, g in entries], [g["weight_decay"] for *_, g in entries],
                 [g["eps"] for *_, g in entries], [g["betas"][0] for *_, g in entries],
                 [g["betas"][1] for *_, g in entries]]
        cached = self._plan
        if cached is not None and cached["key"] == key:
            if cached["hyper"] != hyper:
                optim_ops.refresh_plan_hyperparameters(cached["plan"], *hyper)
                cached["hyper"] = hyper
            optim_ops.run_plan_adamw_(cached["plan"])
            return
        lr, wd, eps, b1, b2 = hyper
        args = ([p for p, *_ in entries], [p.grad for p, *_ in entries],
                [s["exp_avg"] for *_, s, _ in entries], [s["exp_avg_sq"] for *_, s, _ in entries],
                [s["step"] for *_, s, _ in entries], [o.idx for _, o, *_ in entries],
                [o.weight if o.base_values is not None else None for _, o, *_ in entries],
                [o.base_values for _, o, *_ in entries], lr, b1, b2, eps, wd)
        plan = optim_ops.plan_fused_sparse_adamw(*args)
        if plan is None:
            self._plan = None
            optim_ops.fused_sparse_adamw_(*args)
            return
        optim_ops.run_plan_adamw_(plan)
        self._plan = {"key": key, "plan": plan, "hyper": hyper}


AdamW = SparseAdamW
