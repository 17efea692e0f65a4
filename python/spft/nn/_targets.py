"""Finding target linears by name and swapping submodules in place (shared by the wrappers)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


def matches_target(name: str, targets: Iterable[str]) -> bool:
    """True when the module's leaf name equals a target (e.g. "q_proj") or a target regex
    matches the whole dotted name."""
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or re.fullmatch(t, name) for t in targets)


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` of `model`."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
