"""`TrainConfig`: every setting of a training run in one typed dataclass (the CLI maps onto it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ("spiel-ag", "spiel-ma", "s2ft", "full", "lora")
OPTIMIZERS = ("auto", "adamw", "sm3")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Settings of one run. Budgets: `density` (fraction of each target weight) or
    `num_trainable` (total trainable count spread over the target layers); for LoRA, `lora_rank`.
    """

    method: str = "spiel-ag"
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj")
    density: float | None = 0.01
    num_trainable: int | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    quant: str | None = None            # None or "nf4"
    merged: bool = False                 # SpIEL on a 16-bit base: deltas live in the weight
    optimizer: str = "auto"  # auto: SM3 for spiel-ma (its growth needs SM3), else AdamW
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "linear"
    warmup_steps: int = 0
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    grad_clip: float | None = 1.0
    bf16: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 0                  # 0 = only at the end (when eval data exists)
    eval_batches: int = 8
    save_every: int = 0                  # 0 = only at the end (when output_dir is set)
    log_every: int = 1
    reselect_every: int = 20             # SpIEL drop-and-grow period (optimizer steps)
    drop_fraction: float = 0.1           # SpIEL: fraction of deltas replaced per reselection
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True
    plot: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.quant not in (None, "nf4"):
            raise ValueError(f"quant must be None or 'nf4', got {self.quant!r}")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.optimizer == "auto":
            self.optimizer = "sm3" if self.method == "spiel-ma" else "adamw"
        self.target_modules = tuple(self.target_modules)
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**data)
