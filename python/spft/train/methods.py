"""The method registry: how each fine-tuning method prepares a model, builds its optimizer,
acts around each optimizer step, and saves its adapter.

* `spiel-ag`: k sparse deltas per target linear, drop-and-grow by accumulated gradients
  (`spft.spiel`);
* `spiel-ma`: the same, growth by momentum approximation (SM3-compatible) (`spft.spiel`);
* `s2ft`: whole FFN channels / heads of the target linears (structured sparsity, `spft.s2ft`);
* `full`: every parameter;
* `lora`: LoRA factors on the target linears (the baseline, `peft`).

`--quant nf4` stores the frozen base in NF4 (qSpIEL with a SpIEL method; needs
`spft.nn.nf4_linear`).
New methods subclass `Method` and register with `@register("name")`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spft.nn._targets import replace_submodule
from spft.train.config import TrainConfig

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    from spft.nn._targets import matches_target

    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches_target(n, targets)}


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig, *,
                    sparse_modules: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW or SM3 over `params`.

    sparse_modules: a model holding `SparseDeltaLinear` layers; then spft's fused sparse
    optimizers (`spft.optim`, per-index state the SpIEL controller can remap) are used. Without
    it AdamW is torch's.
    """
    if cfg.optimizer == "adamw" and sparse_modules is None:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay)
    try:
        from spft.optim import SM3, AdamW
    except ImportError as e:
        raise NotImplementedError(f"optimizer {cfg.optimizer!r} for sparse deltas needs "
                                  f"spft.optim (issue 4), not available in this build: {e}"
                                  ) from None
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                     modules=sparse_modules, **_extra_kwargs(cfg, "adamw"))
    return SM3(params, lr=cfg.lr, weight_decay=cfg.weight_decay, modules=sparse_modules,
               **_extra_kwargs(cfg, "sm3"))


def _extra_kwargs(cfg: TrainConfig, key: str) -> dict[str, Any]:
    """Extra optimizer arguments from `cfg.extra[key]`; dtype names become torch dtypes
    (e.g. {"adamw": {"state_dtype": "bfloat16"}} for bf16 moments)."""
    out = dict(cfg.extra.get(key, {}))
    for name, value in out.items():
        if name.endswith("dtype") and isinstance(value, str):
            out[name] = getattr(torch, value)
    return out


class Method:
    """Base class. Subclasses override `prepare`; the other hooks have safe defaults."""

    name = "base"
    #: whether the checkpoint must hold the method's controller state
    has_controller = False

    def prepare(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return build_optimizer(self.trainable_parameters(model), cfg)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> None:
        """Called once the optimizer exists (controllers that edit optimizer state hook here)."""

    def before_optimizer_step(self, step: int) -> None:
        """After backward (gradients present), before `optimizer.step()`."""

    def after_optimizer_step(self, step: int) -> dict[str, Any]:
        """After `optimizer.step()`; returns events to log (e.g. {"reselected": n grown})."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def adapter_method(self) -> str:
        return self.name

    def exact_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable tensors a checkpoint must keep bit-exactly when the adapter file cannot
        reproduce them (e.g. S2FT stores fp32 deltas; base + delta may round differently)."""
        return {}


def _quantize_base(model: nn.Module, cfg: TrainConfig) -> None:
    """NF4 (blocksize 64, double quantisation, as QLoRA) for the target linears."""
    if cfg.quant is None:
        return
    try:
        from spft.nn.nf4_linear import quantize_model_nf4
    except ImportError as e:
        raise NotImplementedError(f"--quant nf4 needs spft.nn.nf4_linear (issue 3), which is not "
                                  f"available in this build: {e}") from None
    quantize_model_nf4(model, cfg.target_modules, double_quant=True)


def per_layer_budget(model: nn.Module, cfg: TrainConfig) -> tuple[float | None, dict[str, int]]:
    """(density, {} ) when a density is given, else (None, {layer: k}) spreading
    `cfg.num_trainable` over the target linears in proportion to their sizes."""
    if cfg.num_trainable is None:
        return cfg.density, {}
    layers = target_linears(model, cfg.target_modules)
    total = sum(m.weight.numel() for m in layers.values())
    if not 0 < cfg.num_trainable <= total:
        raise ValueError(f"num_trainable must be in (0, {total}] for these target modules")
    return None, {n: round(m.weight.numel() * cfg.num_trainable / total)
                  for n, m in layers.items()}


class _Spiel(Method):
    mode = "ag"
    has_controller = True

    def __init__(self) -> None:
        self.controller: Any = None

    def prepare(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        from spft.nn import apply_sparse_deltas

        density, budgets = per_layer_budget(model, cfg)
        if cfg.quant is not None and not budgets:
            budgets = {n: round(density * m.weight.numel())
                       for n, m in target_linears(model, cfg.target_modules).items()}
        _quantize_base(model, cfg)
        if budgets:
            from spft.nn import SparseDeltaLinear
            for p in model.parameters():
                p.requires_grad_(False)
            g = torch.Generator().manual_seed(cfg.seed)
            for name, k in budgets.items():
                lin = model.get_submodule(name)
                replace_submodule(model, name, SparseDeltaLinear(lin, num_deltas=k, generator=g))
        else:
            apply_sparse_deltas(model, target_modules=cfg.target_modules, density=density,
                                seed=cfg.seed)
        if cfg.merged:
            if cfg.quant is not None:
                raise ValueError("merged=True needs a 16-bit base (drop --quant)")
            from spft.nn import sparse_delta_modules
            for m in sparse_delta_modules(model).values():
                m.merge()  # forward = plain GEMM; spft.optim refreshes W[idx] each step
        model.spft_method = self.name
        return model

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return build_optimizer(self.trainable_parameters(model), cfg, sparse_modules=model)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig) -> None:
        if cfg.reselect_every <= 0:
            return  # fixed random indices (SpIEL without drop-and-grow)
        self.controller = make_spiel_controller(model, optimizer, cfg, mode=self.mode)

    def after_optimizer_step(self, step: int) -> dict[str, Any]:
        if self.controller is None:
            return {}
        from spft.train.spiel_glue import controller_events
        return controller_events(self.controller.step())

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()} if self.controller else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is not None and "controller" in state:
            self.controller.load_state_dict(state["controller"])


def make_spiel_controller(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                          *, mode: str) -> Any:
    """The drop-and-grow controller of `spft.spiel` (issue 4)."""
    try:
        import spft.spiel as spiel
        if not hasattr(spiel, "SpIELController"):
            raise ImportError("spft.spiel has no SpIELController yet")
    except ImportError as e:
        raise NotImplementedError(
            f"spiel-{mode} drop-and-grow needs spft.spiel (issue 4), which is not available in "
            f"this build ({e}); pass reselect_every=0 for fixed random indices") from None
    from spft.train.spiel_glue import build_controller
    return build_controller(spiel, model, optimizer, cfg, mode=mode)


@register("spiel-ag")
class SpielAG(_Spiel):
    mode = "ag"


@register("spiel-ma")
class SpielMA(_Spiel):
    mode = "ma"


@register("s2ft")
class S2FT(Method):
    has_controller = True

    def __init__(self) -> None:
        self.handle: Any = None

    def prepare(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        try:
            import spft.s2ft as s2ft  # noqa: F401
            from spft.train.s2ft_glue import prepare_s2ft
        except ImportError as e:
            raise NotImplementedError(f"method 's2ft' needs spft.s2ft (issue 5), which is not "
                                      f"available in this build: {e}") from None
        if cfg.quant is not None:
            raise NotImplementedError("S2FT on a 4-bit base is not supported (use spiel-* with "
                                      "--quant nf4)")
        model, self.handle = prepare_s2ft(model, cfg)
        model.spft_method = "s2ft"
        return model

    def exact_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                if p.requires_grad}


@register("full")
class Full(Method):
    def prepare(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        if cfg.quant is not None:
            raise ValueError("full fine-tuning cannot train a quantized base (drop --quant)")
        for p in model.parameters():
            p.requires_grad_(True)
        model.spft_method = "full"
        return model


@register("lora")
class LoRA(Method):
    def prepare(self, model: nn.Module, cfg: TrainConfig) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise NotImplementedError(f"method 'lora' needs peft: {e}") from None
        if cfg.quant is not None:
            raise NotImplementedError("QLoRA is benchmarked in benchmarks/e2e with bitsandbytes; "
                                      "the trainer's --quant applies to spft methods")
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                          lora_dropout=0.0, target_modules=list(cfg.target_modules),
                          task_type="CAUSAL_LM")
        return get_peft_model(model, lora)


def lora_trainable_count(model: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Trainable parameters LoRA rank `rank` would add to the target linears of `model`."""
    return sum(rank * (m.in_features + m.out_features)
               for m in target_linears(model, targets).values())
