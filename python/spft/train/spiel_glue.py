"""Builds `spft.spiel.SpIELController` (issue 4) from a `TrainConfig`.

`cfg.reselect_every` → S, `cfg.drop_fraction` → the initial fraction changed per reselection
(decaying linearly to 0 at `cfg.max_steps`), `cfg.grad_accum` → the AG seeding counter;
`cfg.extra["spiel"]` passes any other controller argument (e.g. {"accumulation_steps": 5,
"first_fraction": 1.0}).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from spft.train.config import TrainConfig


def build_controller(spiel: ModuleType, model: nn.Module, optimizer: torch.optim.Optimizer,
                     cfg: TrainConfig, *, mode: str) -> Any:
    options: dict[str, Any] = {"total_steps": cfg.max_steps,
                               "reselect_every": cfg.reselect_every,
                               "initial_fraction": cfg.drop_fraction,
                               "grad_accum_steps": cfg.grad_accum}
    options.update(cfg.extra.get("spiel", {}))
    try:
        return spiel.SpIELController(model, optimizer, mode, **options)
    except TypeError as e:
        if mode == "ma":
            raise ValueError(f"spiel-ma grows by SM3's accumulators: use --optimizer sm3 ({e})"
                             ) from None
        raise


def controller_events(stats: dict[str, dict] | None) -> dict[str, Any]:
    """Trainer events from the controller's per-layer reselection stats."""
    if not stats:
        return {}
    return {"reselection": 1, "reselected": int(sum(s.get("grown", 0) for s in stats.values()))}
