"""S2FT adapter payloads: delegate to `spft.s2ft`'s export/import (issue 5)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def _s2ft():
    try:
        import spft.s2ft as s2ft
    except ImportError as e:
        raise NotImplementedError(f"S2FT adapters need spft.s2ft (issue 5): {e}") from None
    return s2ft


def s2ft_payload(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    raise NotImplementedError("S2FT adapter export needs spft.s2ft (issue 5), not yet available")


def load_s2ft(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], path: str, *,
              check_base: bool = True) -> nn.Module:
    raise NotImplementedError("S2FT adapter import needs spft.s2ft (issue 5), not yet available")


def merge_s2ft(model: nn.Module) -> nn.Module:
    """Replace S2FT layers by plain linears holding their merged weights (no-op without any)."""
    return model
