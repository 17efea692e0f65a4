"""Test fixtures; the GPU skip lives in the repository-root conftest.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from spft import _backend

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels; on a CPU-only machine they need TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setenv("SPFT_BACKEND", "triton")


@pytest.fixture
def device():
    """The device Triton kernels run on: CUDA when present, else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def cuda_gemv(monkeypatch):
    """spft._C with its CUDA kernels, forced (`SPFT_BACKEND=cuda` raises rather than falling
    back); skips without CUDA or without the compiled extension."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not _backend.extension_has_cuda():
        pytest.skip("spft._C is not built with CUDA")
    monkeypatch.setenv("SPFT_BACKEND", "cuda")
    return _backend.extension()
