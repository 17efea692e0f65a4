"""What the spft optimizers know about sparse-delta parameters, and the state plumbing they share.

A parameter is *sparse* when a module passed as `modules=` owns it as `dv` next to an `idx`
buffer of flat row-major indices into its `weight` (`spft.nn.SparseDeltaLinear` and anything
with the same attributes: `dv`, `idx`, `weight`, `in_features`, `base_values`, `merged`).
The optimizer reads `idx`, `merged` and `base_values` from the owner at every step, so index
changes made by the SpIEL controller are seen at once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.optim.optimizer as torch_optimizer
from torch import Tensor, nn

_OWNER_ATTRS = ("dv", "idx", "weight", "in_features", "base_values")


def is_sparse_owner(module: object) -> bool:
    return all(hasattr(module, a) for a in _OWNER_ATTRS) and isinstance(
        module.dv, Tensor)


def collect_owners(modules: nn.Module | Iterable[nn.Module] | None) -> dict[int, nn.Module]:
    """{id(dv): owner} for every sparse-delta module in `modules` (a model or an iterable)."""
    if modules is None:
        return {}
    if isinstance(modules, nn.Module):
        found = [m for m in modules.modules() if is_sparse_owner(m)]
    else:
        found = list(modules)
        bad = [type(m).__name__ for m in found if not is_sparse_owner(m)]
        if bad:
            raise TypeError(f"modules must hold sparse-delta modules (dv, idx, weight, "
                            f"in_features, base_values); got {bad[0]}")
    return {id(m.dv): m for m in found}


class SparseStateMixin:
    """Shared by `SM3` and `AdamW`: owner lookup, exact state_dict round trip, state remap."""

    #: per-index state keys (length k, follow the deltas when indices change)
    per_index_keys: tuple[str, ...] = ()
    _owners: dict[int, nn.Module]
    #: cached launch tables of the fused step (keyed by data pointers); any state
    #: replacement below drops it
    _plan: dict | None = None

    @staticmethod
    def profile_hook_step(func):
        """Wrap `step` (torch calls this once per class): torch's wrapper opens a profiler range
        and walks the step hooks, which costs more host time than a whole cached fused step;
        take it only while a profiler runs or a step hook is registered."""
        hooked = torch.optim.Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def step(*args, **kwargs):
            self = args[0]
            if (torch.autograd._profiler_enabled() or self._optimizer_step_pre_hooks
                    or self._optimizer_step_post_hooks
                    or torch_optimizer._global_optimizer_pre_hooks
                    or torch_optimizer._global_optimizer_post_hooks):
                return hooked(*args, **kwargs)
            return func(*args, **kwargs)

        return step

    def owner(self, p: Tensor) -> nn.Module | None:
        return self._owners.get(id(p))

    def state_dict(self) -> dict:
        sd = super().state_dict()  # type: ignore[misc]
        # Keep exact copies: torch's loader would cast state to the parameter dtype.
        sd["state"] = {k: {n: (v.clone() if isinstance(v, Tensor) else v) for n, v in s.items()}
                       for k, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        self._plan = None
        super().load_state_dict(state_dict)  # type: ignore[misc]
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        for i, p in enumerate(params):
            if i in saved:
                self.state[p] = {  # type: ignore[attr-defined]
                    n: (v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v)
                    for n, v in saved[i].items()}

    @torch.no_grad()
    def remap_sparse_state(self, p: Tensor, source: Tensor,
                           grown: dict[str, Tensor] | None = None) -> None:
        """Follow an index change of the sparse parameter `p` (called by the SpIEL controller).

        source: [k] int64, for each new position the old position it came from, or -1 for a
        newly grown index; grown: optional initial values for the grown entries, keyed by
        per-index state name ([number of -1 entries] each, in order); others start at zero.
        Per-row/column state (SM3 accumulators) is positional in the weight and is kept.
        """
        self._plan = None
        state = self.state.get(p)  # type: ignore[attr-defined]
        if not state:
            return
        source = source.to(device=p.device, dtype=torch.long)
        new_mask = source < 0
        safe = source.clamp(min=0)
        for key in self.per_index_keys:
            if key not in state:
                continue
            old = state[key]
            fresh = old[safe]
            fresh[new_mask] = 0
            if grown is not None and key in grown:
                fresh[new_mask] = grown[key].to(device=old.device, dtype=old.dtype)
            state[key] = fresh
