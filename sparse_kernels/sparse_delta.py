"""Materialise `W + scatter(dv, idx)` in one pass, and refresh a merged weight in place.

* `sparse_delta_materialize(weight, dv, idx)`: each program copies one BLOCK of the flat weight
  into the output and then writes `round(W[i] + dv[i])` for the deltas whose sorted index falls in
  that block (found by a searchsorted over the k indices, O(numel / BLOCK) work). The copy and the
  scatter are ordered by a CTA barrier, so no element is written twice by different programs.
  Reads W once (2 B/elem for 16-bit weights) and writes it once: the minimal bytes.
* `sparse_delta_refresh_(weight, base_values, dv, idx)`: `W[idx] = round(base_values + dv)` —
  an assignment from the fp32 original values, so repeated refreshes never drift.

Limits: `idx` must be sorted ascending and unique (the launcher does not check; `spft.ops` does);
indices outside [0, numel) are masked, never dereferenced. Flat offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DELTA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _sparse_delta_materialize_kernel(
    w_ptr, out_ptr, dv_ptr, idx_ptr, bounds_ptr, numel,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < numel
    w = tl.load(w_ptr + offs, mask=in_range)
    tl.store(out_ptr + offs, w, mask=in_range)
    lo = tl.load(bounds_ptr + pid)
    hi = tl.load(bounds_ptr + pid + 1)
    # The deltas of this block overwrite elements the copy above just wrote (other threads).
    tl.debug_barrier()
    for start in range(lo, hi, CHUNK):
        j = start + tl.arange(0, CHUNK)
        active = j < hi
        i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
        active = active & (i >= 0) & (i < numel)
        d = tl.load(dv_ptr + j, mask=active, other=0.0).to(tl.float32)
        base = tl.load(w_ptr + i, mask=active, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (base + d).to(out_ptr.dtype.element_ty), mask=active)


@triton.jit
def _sparse_delta_refresh_kernel(
    w_ptr, base_ptr, dv_ptr, idx_ptr, k, numel, BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = j < k
    i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
    active = active & (i >= 0) & (i < numel)
    base = tl.load(base_ptr + j, mask=active, other=0.0).to(tl.float32)
    d = tl.load(dv_ptr + j, mask=active, other=0.0).to(tl.float32)
    tl.store(w_ptr + i, (base + d).to(w_ptr.dtype.element_ty), mask=active)


def _check_common(weight: torch.Tensor, dv: torch.Tensor, idx: torch.Tensor) -> None:
    if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise TypeError(
            f"weight dtype must be one of {SUPPORTED_WEIGHT_DTYPES}, got {weight.dtype}")
    if dv.dtype not in SUPPORTED_DELTA_DTYPES:
        raise TypeError(f"dv dtype must be one of {SUPPORTED_DELTA_DTYPES}, got {dv.dtype}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be int32 or int64, got {idx.dtype}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (flat indices are row-major)")
    if dv.dim() != 1 or idx.dim() != 1 or dv.numel() != idx.numel():
        raise ValueError(f"dv and idx must be 1-D of equal length, got {tuple(dv.shape)} and "
                         f"{tuple(idx.shape)}")
    if not (dv.is_contiguous() and idx.is_contiguous()):
        raise ValueError("dv and idx must be contiguous")
    if not (weight.device == dv.device == idx.device):
        raise ValueError("weight, dv and idx must be on one device")


def sparse_delta_materialize(weight: torch.Tensor, dv: torch.Tensor, idx: torch.Tensor,
                             out: torch.Tensor | None = None, block: int = 4096,
                             num_warps: int = 8) -> torch.Tensor:
    """Return `weight + scatter(dv, idx)` (rounded once to weight.dtype) in a fresh buffer.

    weight: [..] contiguous bf16/fp16/fp32; dv: [k] fp32/bf16/fp16; idx: [k] int32/int64 sorted
    unique flat indices. `out` (same shape/dtype as weight) may be passed to reuse a scratch.
    """
    _check_common(weight, dv, idx)
    if out is None:
        out = torch.empty_like(weight)
    elif out.shape != weight.shape or out.dtype != weight.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor shaped and typed like weight")
    numel = weight.numel()
    if numel == 0:
        return out
    n_blocks = triton.cdiv(numel, block)
    if n_blocks * block < 2**31 or idx.dtype == torch.int64:
        starts = torch.arange(0, n_blocks * block + 1, block, device=idx.device, dtype=idx.dtype)
    else:  # int32 indices near 2**31 elements: clamp so the last boundary cannot overflow
        starts = torch.arange(0, n_blocks * block + 1, block, device=idx.device)
        starts = starts.clamp_(max=numel).to(idx.dtype)
    bounds = torch.searchsorted(idx, starts, out_int32=True)
    _sparse_delta_materialize_kernel[(n_blocks,)](
        weight, out, dv, idx, bounds, numel, BLOCK=block, CHUNK=128, num_warps=num_warps,
    )
    return out


def sparse_delta_refresh_(weight: torch.Tensor, base_values: torch.Tensor, dv: torch.Tensor,
                          idx: torch.Tensor, block: int = 1024) -> None:
    """In place: `weight.flat[idx] = round(base_values + dv)`; base_values [k] fp32."""
    _check_common(weight, dv, idx)
    if base_values.shape != dv.shape or not base_values.is_contiguous():
        raise ValueError("base_values must be contiguous and shaped like dv")
    k = idx.numel()
    if k == 0:
        return
    _sparse_delta_refresh_kernel[(triton.cdiv(k, block),)](
        weight, base_values, dv, idx, k, weight.numel(), BLOCK=block, num_warps=4,
    )
