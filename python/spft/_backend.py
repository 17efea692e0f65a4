"""Which implementation serves an op: the plain-torch reference, Triton, or the CUDA extension.

`SPFT_BACKEND=torch|triton|cuda` overrides the choice for debugging. Without it, CUDA tensors go
to Triton (or the extension where an op has one) and everything else to the torch reference.
With `SPFT_BACKEND=triton` and `TRITON_INTERPRET=1`, Triton kernels run on CPU tensors (CI).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")


def requested_backend() -> str | None:
    """The backend forced by `SPFT_BACKEND`, or None for automatic choice."""
    value = os.environ.get("SPFT_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"SPFT_BACKEND must be one of {BACKENDS} or 'auto', got {value!r}")
    return value


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def extension_available() -> bool:
    """True when the compiled `spft._C` imports (it is optional)."""
    try:
        importlib.import_module("spft._C")
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor, op: str, supported_dtypes: tuple = ()) -> bool:
    """Decide whether `op` runs its Triton kernel on `tensors` (all on one device).

    Raises RuntimeError naming every reason when `SPFT_BACKEND=triton` forces a call that
    Triton cannot serve, rather than silently falling back.
    """
    forced = requested_backend()
    if forced == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed")
    if not on_cuda and not triton_interpreting():
        reasons.append("tensors are not on CUDA and TRITON_INTERPRET=1 is not set")
    bad = [t.dtype for t in tensors if t.is_floating_point() and supported_dtypes
           and t.dtype not in supported_dtypes]
    if bad:
        reasons.append(f"dtype {bad[0]} is not supported by the Triton kernel")
    if forced == "triton":
        if reasons:
            raise RuntimeError(f"SPFT_BACKEND=triton cannot serve {op}: " + "; ".join(reasons))
        return True
    return on_cuda and not reasons


@functools.cache
def extension_has_cuda() -> bool:
    """True when `spft._C` imports and was built with its CUDA kernels."""
    if not extension_available():
        return False
    return bool(importlib.import_module("spft._C").with_cuda())


def use_extension(*tensors: torch.Tensor, op: str) -> bool:
    """Decide whether `op` runs its CUDA kernel from the compiled `spft._C`.

    Yes for CUDA tensors when the extension was built with CUDA, unless `SPFT_BACKEND` forces
    torch or triton. `SPFT_BACKEND=cuda` raises RuntimeError when the extension cannot serve.
    """
    forced = requested_backend()
    if forced in ("torch", "triton"):
        return False
    reasons = []
    if not extension_has_cuda():
        reasons.append("spft._C is not built with CUDA")
    if not all(t.is_cuda for t in tensors):
        reasons.append("tensors are not on CUDA")
    if forced == "cuda" and reasons:
        raise RuntimeError(f"SPFT_BACKEND=cuda cannot serve {op}: " + "; ".join(reasons))
    return not reasons


def extension():
    """The compiled `spft._C` module (call only after `use_extension` said yes)."""
    return importlib.import_module("spft._C")
