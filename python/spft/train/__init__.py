"""spft.train — the trainer, its config, schedules, data loading, metrics and checkpoints."""

from spft.train.config import METHODS, TrainConfig
from spft.train.data import TokenizedDataset, read_jsonl, write_jsonl
from spft.train.methods import Method, available_methods, get_method, register
from spft.train.schedule import lr_factor
from spft.train.trainer import Trainer, count_trainable, train

__all__ = [
    "METHODS",
    "Method",
    "TokenizedDataset",
    "TrainConfig",
    "Trainer",
    "available_methods",
    "count_trainable",
    "get_method",
    "lr_factor",
    "read_jsonl",
    "register",
    "train",
    "write_jsonl",
]
