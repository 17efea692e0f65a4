"""Plain-torch references for SpIEL growth selection (test oracle and benchmark baseline).

Both materialise the dense `[m, n]` score the fused versions in `sparse_kernels/grow.py` avoid.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ma_select(row_acc: Tensor, col_acc: Tensor, active_idx: Tensor, num_grow: int) -> Tensor:
    """SpIEL-MA growth by brute force: the `num_grow` non-active flat positions with the largest
    fp32 `row_acc[r] · col_acc[c]`; ties go to the smaller flat index. Returns sorted int64 [g].

    row_acc: [m], col_acc: [n] (non-negative SM3 accumulators); active_idx: [k] flat indices.
    Memory O(m·n): this is the outer product + mask + top-k the fused selection avoids.
    """
    score = torch.outer(row_acc.float(), col_acc.float()).reshape(-1)
    score[active_idx.long()] = -float("inf")
    order = torch.sort(score, descending=True, stable=True).indices[:num_grow]
    return order.sort().values


def ma_select_published(row_acc: Tensor, col_acc: Tensor, active_idx: Tensor,
                        num_grow: int) -> Tensor:
    """As the published code does it (outer product, boolean masks, arange, top-k); the
    benchmark's baseline. Ties are broken by torch.topk (unspecified order)."""
    m, n = row_acc.numel(), col_acc.numel()
    score = torch.outer(row_acc, col_acc).view(-1)
    mask = torch.ones(m * n, dtype=torch.bool, device=score.device)
    mask[active_idx.long()] = False
    positions = torch.arange(m * n, device=score.device)[mask]
    top = torch.topk(score[mask], num_grow).indices
    return positions[top].sort().values


def ag_candidates(dy: Tensor, x: Tensor, num_candidates: int) -> tuple[Tensor, Tensor]:
    """SpIEL-AG candidates by brute force: the flat positions of the `num_candidates` largest
    |dW| of the dense weight gradient dW = dyᵀ x ([out, in], fp32 accumulation).

    dy: [T, out], x: [T, in]. Returns (sorted int64 indices [c], their fp32 gradients [c]).
    """
    dw = (dy.float().t() @ x.float()).reshape(-1)
    top = torch.topk(dw.abs(), num_candidates).indices.sort().values
    return top, dw[top]
