"""`SpIELController`: SpIEL's drop-and-grow schedule over the `SparseDeltaLinear` layers.

Call `controller.step()` after every `optimizer.step()`. Every `reselect_every` steps (S) it
replaces a fraction of each layer's deltas: drop the smallest |dv|, grow as many new positions,
keep indices unique and sorted and k constant, and remap the optimizer's per-index state.

* method "ag" (SpIEL-AG): `accumulation_steps` (A) optimizer steps before a reselection each
  layer gets a `CandidateTracker`; its first backward picks the top-|grad| positions of the full
  weight gradient inside the tile-GEMM kernel, later backwards accumulate the candidates'
  gradients in the same sampled pass as the deltas'. Grown = best non-active candidates by
  |mean grad|; with AdamW their moments are seeded as m = ḡ·(1-β1^a), v = ḡ²·(1-β2^a),
  step = a (so bias correction returns ḡ), with a = samples / grad_accum_steps and
  ḡ = grad_sum / a (the mean per-optimizer-step gradient).
* method "ma" (SpIEL-MA): grown = non-active positions with the largest
  row_acc[r]·col_acc[c] of the SM3 state (`spft.ops.grow.ma_select`, O(m + n + k) memory).

Fraction changed at step t: `initial_fraction` decaying to 0 at `total_steps` (linear or
cosine); `first_fraction` (e.g. 1.0) overrides it at the first reselection, which may replace
all random initial indices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from spft.nn.sparse_delta_linear import SparseDeltaLinear, sparse_delta_modules
from spft.ops import grow as grow_ops
from spft.ops.spiel_ag import CandidateTracker

METHODS = ("ag", "ma")
DECAYS = ("linear", "cosine")


class SpIELController:
    """Drop-and-grow for SpIEL.

    Args:
        model: a model holding `SparseDeltaLinear` layers (or a dict name → layer).
        optimizer: the `spft.optim.SM3` or `spft.optim.AdamW` stepping their `dv` (method "ma"
            needs SM3 with column accumulators).
        method: "ag" (accumulated gradients) or "ma" (momentum approximation via SM3).
        total_steps: number of optimizer steps of the run (the fraction reaches 0 there).
        reselect_every: S, steps between reselections (default 20).
        accumulation_steps: A, steps of candidate statistics before a reselection ("ag",
            default 5; clamped to S - 1).
        initial_fraction: fraction of k changed at the start (default 0.2).
        decay: "linear" (default) or "cosine" decay of the fraction to 0 at total_steps.
        first_fraction: fraction for the first reselection (None = the schedule's).
        grad_accum_steps: micro-batches per optimizer step (for the AG seeding counter a).
        candidate_factor: AG looks for candidate_factor × (number to grow) top-|grad|
            positions per layer (default 2).
        per_segment: slots per (row, 128-column segment) of the fused AG top-k.
    """

    def __init__(self, model: nn.Module | dict[str, SparseDeltaLinear],
                 optimizer: torch.optim.Optimizer, method: str = "ag", *, total_steps: int,
                 reselect_every: int = 20, accumulation_steps: int = 5,
                 initial_fraction: float = 0.2, decay: str = "linear",
                 first_fraction: float | None = None, grad_accum_steps: int = 1,
                 candidate_factor: float = 2.0, per_segment: int = 4) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if total_steps < 1 or reselect_every < 1 or accumulation_steps < 1 or \
                grad_accum_steps < 1:
            raise ValueError("total_steps, reselect_every, accumulation_steps and "
                             "grad_accum_steps must be >= 1")
        for name, f in (("initial_fraction", initial_fraction),
                        ("first_fraction", first_fraction)):
            if f is not None and not 0.0 <= f <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {f}")
        if candidate_factor < 1.0:
            raise ValueError(f"candidate_factor must be >= 1, got {candidate_factor}")
        self.layers = dict(model) if isinstance(model, dict) else sparse_delta_modules(model)
        if not self.layers:
            raise ValueError("model holds no SparseDeltaLinear layers")
        self.optimizer = optimizer
        self.method = method
        self.total_steps = total_steps
        self.reselect_every = reselect_every
        self.accumulation_steps = min(accumulation_steps, max(1, reselect_every - 1))
        self.initial_fraction = initial_fraction
        self.decay = decay
        self.first_fraction = first_fraction
        self.grad_accum_steps = grad_accum_steps
        self.candidate_factor = candidate_factor
        self.per_segment = per_segment
        self.t = 0
        self.reselections = 0
        self.last_stats: dict[str, dict] = {}
        if method == "ma":
            accs = getattr(optimizer, "accumulators", None)
            if accs is None:
                raise TypeError("method 'ma' needs the spft.optim.SM3 optimizer")
            if any(g.get("row_cover_only") for g in optimizer.param_groups):
                raise ValueError("method 'ma' needs SM3 column accumulators "
                                 "(row_cover_only=False)")
        if self._is_accumulating_at(0):
            self._arm()

    # ------------------------------------------------------------------ schedule
    def fraction(self, t: int) -> float:
        """Fraction of each layer's deltas changed by a reselection at step t."""
        if self.reselections == 0 and self.first_fraction is not None:
            return self.first_fraction
        progress = min(1.0, t / self.total_steps)
        if self.decay == "linear":
            return self.initial_fraction * (1.0 - progress)
        return self.initial_fraction * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _is_reselection(self, t: int) -> bool:
        return t > 0 and t % self.reselect_every == 0 and t < self.total_steps

    def _is_accumulating_at(self, t: int) -> bool:
        """AG arms trackers when the next A steps end at a reselection."""
        return self.method == "ag" and self._is_reselection(t + self.accumulation_steps)

    def _num_change(self, layer: SparseDeltaLinear, t: int) -> int:
        k = layer.num_deltas
        free = layer.out_features * layer.in_features - k
        return max(0, min(k, free, round(self.fraction(t) * k)))

    def _arm(self) -> None:
        t = self.t + self.accumulation_steps
        for layer in self.layers.values():
            n = self._num_change(layer, t)
            want = min(layer.out_features * layer.in_features, math.ceil(
                self.candidate_factor * n))
            layer.ag_tracker = CandidateTracker(want, self.per_segment) if n > 0 else None

    # ------------------------------------------------------------------ the hook
    def step(self) -> dict[str, dict] | None:
        """Call after `optimizer.step()`. Returns per-layer stats when it reselected."""
        self.t += 1
        stats = None
        if self._is_reselection(self.t):
            stats = self.reselect()
        if self._is_accumulating_at(self.t):
            self._arm()
        return stats

    @torch.no_grad()
    def reselect(self) -> dict[str, dict]:
        """Drop and grow in every layer now (normally called by `step`)."""
        stats = {}
        for name, layer in self.layers.items():
            n = self._num_change(layer, self.t)
            if self.method == "ma":
                grown, init = self._grow_ma(layer, n), None
            else:
                grown, init = self._grow_ag(layer, n)
                layer.ag_tracker = None
            stats[name] = self._drop_and_grow(layer, grown, init)
        self.reselections += 1
        self.last_stats = stats
        return stats

    def _grow_ma(self, layer: SparseDeltaLinear, n: int) -> Tensor:
        if n == 0 or layer.dv not in self.optimizer.state:
            return torch.empty(0, dtype=torch.long, device=layer.idx.device)
        row, col = self.optimizer.accumulators(layer.dv)
        return grow_ops.ma_select(row, col, layer.idx, n)

    def _grow_ag(self, layer: SparseDeltaLinear, n: int) -> tuple[Tensor, dict | None]:
        tracker = layer.ag_tracker
        device = layer.idx.device
        if n == 0 or tracker is None or tracker.samples == 0 or tracker.num_tracked == 0:
            return torch.empty(0, dtype=torch.long, device=device), None
        a = tracker.samples / self.grad_accum_steps
        mean = tracker.grad_sum / a
        take = min(n, mean.numel())
        # stable ordering: ties in |mean| go to the smaller flat index
        order = torch.sort(mean.abs(), descending=True, stable=True).indices[:take]
        grown = tracker.cand_idx[order]
        g = mean[order]
        init = None
        group = self._group_of(layer.dv)
        if group is not None and "betas" in group:
            b1, b2 = group["betas"]
            init = {"exp_avg": g * (1 - b1 ** a), "exp_avg_sq": g * g * (1 - b2 ** a),
                    "step": torch.full_like(g, max(1, round(a)), dtype=torch.int32)}
        return grown, init

    def _group_of(self, p: Tensor) -> dict | None:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group
        return None

    def _drop_and_grow(self, layer: SparseDeltaLinear, grown: Tensor,
                       init: dict | None) -> dict:
        idx = layer.idx.long()
        dv = layer.dv.detach()
        k = idx.numel()
        g = grown.numel()
        if g == 0:
            return {"dropped": 0, "grown": 0}
        drop = torch.sort(dv.float().abs(), stable=True).indices[:g]
        keep = torch.ones(k, dtype=torch.bool, device=idx.device)
        keep[drop] = False
        source = torch.cat([torch.arange(k, device=idx.device)[keep],
                            torch.full((g,), -1, dtype=torch.long, device=idx.device)])
        new_idx = torch.cat([idx[keep], grown.to(idx.device)])
        new_dv = torch.cat([dv[keep], torch.zeros(g, dtype=dv.dtype, device=dv.device)])
        order = torch.argsort(new_idx)
        source = source[order]
        layer.set_indices(new_idx[order], new_dv[order])
        if init is not None:
            # grown entries appear in `source` (as -1) in sorted-index order
            rank = torch.argsort(torch.argsort(grown.to(idx.device)))
            pos_sorted = torch.empty_like(rank)
            pos_sorted[rank] = torch.arange(g, device=idx.device)
            init = {key: v[pos_sorted] for key, v in init.items()}
        remap = getattr(self.optimizer, "remap_sparse_state", None)
        if remap is not None:
            remap(layer.dv, source, init)
        return {"dropped": g, "grown": g, "dropped_positions": idx[drop],
                "grown_positions": grown}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        trackers = {name: layer.ag_tracker.state_dict() for name, layer in self.layers.items()
                    if layer.ag_tracker is not None}
        return {"t": self.t, "reselections": self.reselections, "trackers": trackers}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.reselections = state["reselections"]
        for name, layer in self.layers.items():
            saved = state["trackers"].get(name)
            if saved is None:
                layer.ag_tracker = None
            else:
                tracker = CandidateTracker(saved["num_candidates"], saved["per_segment"])
                tracker.load_state_dict(saved, layer.idx)
                layer.ag_tracker = tracker
