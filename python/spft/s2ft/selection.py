"""Which FFN channels and attention heads of each block S2FT trains.

    cfg = S2FTConfig(ffn_ratio=0.05, attn_ratio=0.0, strategy="activation", seed=0)
    sel = select_s2ft(model, cfg, calibration={"input_ids": ids})   # S2Selection

* Budget: per model, as a ratio (of all FFN channels / all attention head groups) or a count,
  spread evenly over the blocks (the first ``count % n_layers`` blocks get one more).
* Granularity: FFN channels are intermediate channels (gate/up rows = down columns). Attention
  is selected per KV group: a group is one KV head and its ``n_heads / n_kv_heads`` query heads
  (on MHA a group is one head). By default GQA models train the FFN only (``attn_on_gqa=False``).
* Strategies (deterministic given ``seed``): ``random``; ``weight_norm`` (L2 norm of the
  trainable slice: down columns, o_proj columns of the group); ``activation`` (mean |input| of
  down_proj / o_proj over a calibration batch the caller passes). ``order`` picks the
  ``smallest`` (default for activation: the published finding is that it generalises best) or
  ``largest``.
* `make_selection` builds a selection from explicit indices (validated: range, duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

STRATEGIES = ("random", "weight_norm", "activation")
ORDERS = ("smallest", "largest")


@dataclass(frozen=True)
class S2FTConfig:
    """Budget, strategy and which projections are trained.

    ffn_ratio/ffn_count: FFN channel budget (a count, when given, overrides the ratio);
    attn_ratio/attn_count: head-group budget, likewise. train_down / train_gate_up: FFN
    channels are trained in down_proj columns (input axis) and/or gate/up rows (output
    axis); train_o / train_qkv likewise for heads.
    """

    ffn_ratio: float | None = 0.05
    ffn_count: int | None = None
    attn_ratio: float | None = 0.0
    attn_count: int | None = None
    strategy: str = "random"
    order: str | None = None
    seed: int = 0
    train_down: bool = True
    train_gate_up: bool = False
    train_o: bool = True
    train_qkv: bool = False
    attn_on_gqa: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.order is not None and self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS} or None, got {self.order!r}")
        for kind in ("ffn", "attn"):
            ratio, count = getattr(self, f"{kind}_ratio"), getattr(self, f"{kind}_count")
            if ratio is not None and not 0.0 <= ratio <= 1.0:
                raise ValueError(f"{kind}_ratio must lie in [0, 1], got {ratio}")
            if count is not None and count < 0:
                raise ValueError(f"{kind}_count must be ≥ 0, got {count}")

    @property
    def resolved_order(self) -> str:
        return self.order or ("smallest" if self.strategy == "activation" else "largest")


@dataclass
class S2Selection:
    """Per block: ``channels[i]`` sorted int64 FFN channels, ``groups[i]`` sorted int64 KV-group
    (head) indices, in original coordinates. ``n_rep`` query heads per group, ``head_dim``."""

    channels: list[Tensor]
    groups: list[Tensor]
    n_rep: int
    head_dim: int
    config: S2FTConfig = field(default_factory=S2FTConfig)


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


def model_shape(model: nn.Module) -> ModelShape:
    """Dimensions of a LLaMA-family (Llama, Mistral, Qwen2) Hugging Face model."""
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not divisible by "
                         f"num_key_value_heads={n_kv}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ModelShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, n_heads,
                      n_kv, head_dim)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers: not a LLaMA-family model")
    return layers


def _split_budget(ratio: float | None, count: int | None, per_layer: int, n_layers: int,
                  what: str) -> list[int]:
    total = per_layer * n_layers
    if count is None:
        count = round((ratio or 0.0) * total)
    if count > total:
        raise ValueError(f"budget of {count} {what} exceeds the model's {total} "
                         f"({per_layer} per block × {n_layers} blocks)")
    base, extra = divmod(count, n_layers)
    return [base + (1 if i < extra else 0) for i in range(n_layers)]


def _pick(scores: Tensor | None, k: int, order: str, n: int, gen: torch.Generator) -> Tensor:
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if scores is None:
        chosen = torch.randperm(n, generator=gen)[:k]
    else:
        # Ties broken by index (stable sort): deterministic.
        chosen = torch.sort(scores.float().cpu(), descending=(order == "largest"),
                            stable=True).indices[:k]
    return chosen.sort().values.to(torch.int64)


@torch.no_grad()
def _activation_scores(model: nn.Module, calibration, shape: ModelShape
                       ) -> tuple[list[Tensor], list[Tensor]]:
    layers = decoder_layers(model)
    ffn = [torch.zeros(shape.intermediate, dtype=torch.float64) for _ in layers]
    attn = [torch.zeros(shape.n_kv_heads, dtype=torch.float64) for _ in layers]
    handles = []

    def ffn_hook(i):
        def hook(_module, args):
            a = args[0].detach().abs().double().reshape(-1, shape.intermediate)
            ffn[i] += a.mean(0).cpu()
        return hook

    def attn_hook(i):
        def hook(_module, args):
            a = args[0].detach().abs().double().reshape(-1, shape.n_kv_heads,
                                                        shape.n_rep * shape.head_dim)
            attn[i] += a.mean((0, 2)).cpu()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook(i)))
    try:
        if isinstance(calibration, dict):
            model(**calibration)
        else:
            model(calibration)
    finally:
        for h in handles:
            h.remove()
    return ffn, attn


def _weight_scores(model: nn.Module, shape: ModelShape) -> tuple[list[Tensor], list[Tensor]]:
    ffn, attn = [], []
    for layer in decoder_layers(model):
        ffn.append(layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu())
        o = layer.self_attn.o_proj.weight.detach().float()
        cols = o.reshape(o.shape[0], shape.n_kv_heads, shape.n_rep * shape.head_dim)
        attn.append(cols.pow(2).sum((0, 2)).sqrt().cpu())
    return ffn, attn


def select_s2ft(model: nn.Module, config: S2FTConfig | None = None,
                calibration: dict | Tensor | None = None) -> S2Selection:
    """Choose per-block FFN channels and head groups for `model` (not modified).

    calibration: inputs for one forward pass (a dict of model kwargs or input_ids), required by
    strategy="activation".
    """
    config = config or S2FTConfig()
    shape = model_shape(model)
    attn_ratio, attn_count = config.attn_ratio, config.attn_count
    if shape.n_rep > 1 and not config.attn_on_gqa:
        attn_ratio, attn_count = 0.0, None
    ffn_k = _split_budget(config.ffn_ratio, config.ffn_count, shape.intermediate,
                          shape.n_layers, "FFN channels")
    attn_k = _split_budget(attn_ratio, attn_count, shape.n_kv_heads, shape.n_layers,
                           "attention head groups")
    ffn_scores = attn_scores = [None] * shape.n_layers
    if config.strategy == "activation":
        if calibration is None:
            raise ValueError("strategy='activation' needs a calibration batch")
        ffn_scores, attn_scores = _activation_scores(model, calibration, shape)
    elif config.strategy == "weight_norm":
        ffn_scores, attn_scores = _weight_scores(model, shape)
    gen = torch.Generator().manual_seed(config.seed)
    order = config.resolved_order
    channels, groups = [], []
    for i in range(shape.n_layers):
        channels.append(_pick(ffn_scores[i], ffn_k[i], order, shape.intermediate, gen))
        groups.append(_pick(attn_scores[i], attn_k[i], order, shape.n_kv_heads, gen))
    return S2Selection(channels, groups, shape.n_rep, shape.head_dim, config)


def _check_indices(idx, n: int, what: str) -> Tensor:
    t = torch.as_tensor(idx, dtype=torch.int64).flatten().cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"{what} holds indices outside [0, {n}): {t.tolist()}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{what} holds duplicate indices: {t.tolist()}")
    return t.sort().values


def make_selection(model: nn.Module, channels: dict[int, object] | None = None,
                   groups: dict[int, object] | None = None,
                   config: S2FTConfig | None = None) -> S2Selection:
    """A selection from explicit per-block indices (original coordinates), validated."""
    shape = model_shape(model)
    channels, groups = channels or {}, groups or {}
    for name, d in (("channels", channels), ("groups", groups)):
        bad = [i for i in d if not 0 <= i < shape.n_layers]
        if bad:
            raise ValueError(f"{name}: block indices {bad} outside [0, {shape.n_layers})")
    ch = [_check_indices(channels.get(i, []), shape.intermediate, f"channels[{i}]")
          for i in range(shape.n_layers)]
    gr = [_check_indices(groups.get(i, []), shape.n_kv_heads, f"groups[{i}]")
          for i in range(shape.n_layers)]
    return S2Selection(ch, gr, shape.n_rep, shape.head_dim, config or S2FTConfig())
