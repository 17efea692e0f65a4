"""How the trainer turns a budget into an S2FT selection (`spft.s2ft`, issue 5).

The budget (`num_trainable`, or `density` × the target linears' total size) buys whole FFN
channels, trained as down_proj columns (S2FT's default: one channel = `hidden` parameters).
`cfg.extra["s2ft"]` may override any `S2FTConfig` field (e.g. {"attn_ratio": 0.05,
"strategy": "weight_norm"}).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from spft.train.config import TrainConfig
from spft.train.methods import target_linears


def s2ft_budget_channels(model: nn.Module, cfg: TrainConfig) -> int:
    hidden = model.config.hidden_size
    budget = cfg.num_trainable
    if budget is None:
        total = sum(m.weight.numel() for m in target_linears(model, cfg.target_modules).values())
        budget = round((cfg.density or 0.01) * total)
    return max(1, round(budget / hidden))


def prepare_s2ft(model: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, Any]:
    from spft.s2ft import S2FTConfig, prepare_s2ft, select_s2ft

    options: dict[str, Any] = {"ffn_ratio": None, "ffn_count": s2ft_budget_channels(model, cfg),
                               "attn_ratio": 0.0, "strategy": "random", "seed": cfg.seed}
    options.update(cfg.extra.get("s2ft", {}))
    selection = select_s2ft(model, S2FTConfig(**options))
    plan = prepare_s2ft(model, selection)
    return model, plan
