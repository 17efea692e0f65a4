"""Argument checks shared by the public ops: clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        got = str(t.dtype).replace("torch.", "")
        raise TypeError(f"{name} must have dtype in ({names}), got {got}")


def require_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_flat_indices(idx: torch.Tensor, numel: int, name: str = "idx") -> tuple[bool, int]:
    """Validate flat indices into a tensor of `numel` elements: integer dtype, 1-D, the width
    that can address numel, in range and unique. Returns (is_sorted, k).

    One host sync for sorted input (min, max and order checked together); unsorted input costs a
    sort and a second sync for the duplicate check.
    """
    require_dtype(name, idx, INDEX_DTYPES)
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype == torch.int32 and numel > 2**31 - 1:
        raise ValueError(f"{name} must be int64 for a weight of {numel} elements (≥ 2**31)")
    k = idx.numel()
    if k == 0:
        return True, 0
    if k > numel:
        raise ValueError(f"{name} has {k} entries but the weight only {numel} elements, so they "
                         "cannot be unique")
    steps = idx[1:] - idx[:-1]
    stats = torch.stack([
        idx.min().long(), idx.max().long(),
        (steps <= 0).any().long() if k > 1 else idx.new_zeros((), dtype=torch.long),
    ]).tolist()
    lo, hi, unsorted = stats
    if lo < 0 or hi >= numel:
        raise ValueError(f"{name} holds indices outside [0, {numel}): min {lo}, max {hi}")
    if not unsorted:
        return True, k
    sorted_idx = idx.sort().values
    if bool((sorted_idx[1:] == sorted_idx[:-1]).any()):
        raise ValueError(f"{name} holds duplicate indices; sparse deltas need unique positions")
    return False, k
