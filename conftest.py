"""Shared by tests/ and benchmarks/: items marked `gpu` are skipped where CUDA is absent."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
