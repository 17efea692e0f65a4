"""Plain-torch references for S2FT's split-weight linear (test oracle, CPU path, baselines).

The S2FT weight of a co-permuted linear is the concatenation of a trainable block and a frozen
remainder along one axis:

* ``axis="output"``: ``W = [T; F]``, T ``[s, in]`` (the first s output rows), F ``[out-s, in]``;
* ``axis="input"``:  ``W = [T | F]``, T ``[out, s]`` (the first s input columns), F ``[out, in-s]``.

``y = x @ Wᵀ + b``. Only T (and the bias) receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AXES = ("output", "input")


def s2_weight(trainable: torch.Tensor, frozen: torch.Tensor, axis: str) -> torch.Tensor:
    """The full weight ``[out, in]`` as one new tensor (cat along the split axis)."""
    return torch.cat([trainable, frozen], dim=0 if axis == "output" else 1)


def s2_linear(x: torch.Tensor, trainable: torch.Tensor, frozen: torch.Tensor, axis: str,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference forward, differentiable in x, trainable and bias (frozen is detached)."""
    return F.linear(x, s2_weight(trainable, frozen.detach(), axis), bias)


def s2_linear_dx(dy: torch.Tensor, trainable: torch.Tensor, frozen: torch.Tensor,
                 axis: str) -> torch.Tensor:
    """``dy @ W``: dy ``[..., out]`` → ``[..., in]``."""
    return dy @ s2_weight(trainable, frozen, axis)


def s2_linear_masked(x: torch.Tensor, weight: torch.Tensor, s: int, axis: str,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle for gradients: a dense trainable ``weight`` [out, in] whose gradient is masked to
    the first s rows (axis="output") or columns (axis="input")."""
    mask = torch.zeros_like(weight, dtype=torch.bool)
    if axis == "output":
        mask[:s] = True
    else:
        mask[:, :s] = True
    w = torch.where(mask, weight, weight.detach())
    return F.linear(x, w, bias)


def s2_linear_naive(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, axis: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The naive S2FT path (benchmark baseline): a full frozen linear plus a separate linear for
    the trainable slice, added (autograd). ``delta`` is ``[s, in]`` (output axis) or
    ``[out, s]`` (input axis), trainable, starting at zero; weight ``[out, in]`` frozen."""
    y = F.linear(x, weight.detach(), bias)
    s = delta.shape[0] if axis == "output" else delta.shape[1]
    if axis == "output":
        extra = F.linear(x, delta)
        return torch.cat([y[..., :s] + extra, y[..., s:]], dim=-1)
    return y + F.linear(x[..., :s], delta)


def multi_adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         row_adapter: torch.Tensor, indices: list[torch.Tensor],
                         deltas: list[torch.Tensor], axis: str) -> torch.Tensor:
    """Batched serving reference: row t of x uses adapter ``row_adapter[t]`` (-1: none).

    x ``[T, in]``; weight ``[out, in]`` (the untouched base); adapter a holds original-coordinate
    ``indices[a]`` ``[s_a]`` and ``deltas[a]`` (``[s_a, in]`` for axis="output", ``[out, s_a]``
    for axis="input"). Equivalent to running each row through base + adapter merged.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.linear(x, weight, bias).to(acc)
    for a, (idx, d) in enumerate(zip(indices, deltas)):
        rows = (row_adapter == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        xa = x[rows].to(acc)
        if axis == "output":
            y[rows[:, None], idx.long()[None, :]] += xa @ d.to(acc).t()
        else:
            y[rows] += xa[:, idx.long()] @ d.to(acc).t()
    return y.to(x.dtype)
