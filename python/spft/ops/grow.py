"""SpIEL growth selection: public wrappers with validation and backend choice.

* `ma_select(row_acc, col_acc, active_idx, num_grow)` — exact top products of SM3
  accumulators outside the active set, O(m + n + k) memory on CUDA.
* `grad_topk_candidates(dy, x, num_candidates)` — top-|dW| positions without a dense dW on CUDA.

Both are selection utilities with host synchronisation (data-dependent sizes), called once per
reselection; they are plain functions, not torch.library ops. CPU tensors (and
`SPFT_BACKEND=torch`) use the dense references of `spft.reference.grow`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spft import _backend
from spft.ops._validation import check_flat_indices, require_dtype, require_tensor
from spft.reference import grow as reference


def ma_select(row_acc: Tensor, col_acc: Tensor, active_idx: Tensor, num_grow: int) -> Tensor:
    """The `num_grow` non-active flat positions of an [m, n] weight with the largest fp32
    `row_acc[r]·col_acc[c]`; ties go to the smaller flat index (deterministic).

    row_acc: [m] and col_acc: [n] float, non-negative (SM3 accumulators); active_idx: [k]
    int32/int64 sorted unique flat indices. Returns sorted int64 [num_grow].
    """
    for name, t in (("row_acc", row_acc), ("col_acc", col_acc), ("active_idx", active_idx)):
        require_tensor(name, t)
    require_dtype("row_acc", row_acc, (torch.float32,))
    require_dtype("col_acc", col_acc, (torch.float32,))
    if row_acc.dim() != 1 or col_acc.dim() != 1:
        raise ValueError("row_acc and col_acc must be 1-D")
    m, n = row_acc.numel(), col_acc.numel()
    is_sorted, k = check_flat_indices(active_idx, m * n, name="active_idx")
    if not is_sorted:
        raise ValueError("active_idx must be sorted ascending")
    if not isinstance(num_grow, int) or not 0 <= num_grow <= m * n - k:
        raise ValueError(f"num_grow must be an int in [0, {m * n - k}], got {num_grow}")
    if _backend.use_triton(row_acc, col_acc, op="ma_select"):
        from sparse_kernels.grow import ma_select as kernel
        return kernel(row_acc, col_acc, active_idx, num_grow)
    return reference.ma_select(row_acc, col_acc, active_idx, num_grow)


def grad_topk_candidates(dy: Tensor, x: Tensor, num_candidates: int, *, per_segment: int = 4
                         ) -> tuple[Tensor, Tensor, bool]:
    """Positions (sorted int64 [c]) and fp32 values of the `num_candidates` largest |dW|,
    dW = dyᵀ x ([out, in]), and whether the selection is provably exact (see
    `sparse_kernels.grow.grad_topk_candidates`; the torch path is always exact).

    dy: [T, out], x: [T, in], one float dtype.
    """
    require_tensor("dy", dy)
    require_tensor("x", x)
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy [T, out] and x [T, in] must be 2-D with equal T, got "
                         f"{tuple(dy.shape)} and {tuple(x.shape)}")
    numel = dy.shape[1] * x.shape[1]
    if not isinstance(num_candidates, int) or not 0 <= num_candidates <= numel:
        raise ValueError(f"num_candidates must be an int in [0, {numel}], got {num_candidates}")
    if _backend.use_triton(dy, x, op="grad_topk_candidates",
                           supported_dtypes=(torch.float16, torch.bfloat16, torch.float32)):
        from sparse_kernels.grow import grad_topk_candidates as kernel
        return kernel(dy, x, num_candidates, per_segment=per_segment)
    idx, vals = reference.ag_candidates(dy, x, num_candidates)
    return idx, vals, True
