"""spft — fused kernels for sparse fine-tuning (SpIEL, S2FT) of large language models.

`import spft` is cheap: it never initialises CUDA, never imports Triton and never loads the
compiled extension `spft._C`. Subpackages (`spft.ops`, `spft.nn`, ...) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("ops", "nn", "optim", "s2ft", "spiel", "adapters", "train", "models", "info")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"spft.{name}")
    if name in ("load_adapter", "save_adapter", "merge_adapter"):
        return getattr(importlib.import_module("spft.adapters"), name)
    raise AttributeError(f"module 'spft' has no attribute {name!r}")


__all__ = ["__version__"]
