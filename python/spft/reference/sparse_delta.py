"""Reference for the SpIEL sparse-delta linear: y = x @ (W + scatter(dv, idx))ᵀ + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def sparse_delta_materialize(weight: torch.Tensor, dv: torch.Tensor,
                             idx: torch.Tensor) -> torch.Tensor:
    """`weight + scatter(dv, idx)` rounded once to weight.dtype.

    weight: [out, in] contiguous; dv: [k] float; idx: [k] int32/int64 unique flat row-major
    indices. Differentiable with respect to `dv` (used by the fp64 gradcheck).
    """
    acc = _acc_dtype(weight, dv)
    flat = weight.reshape(-1).to(acc)
    flat = flat.index_add(0, idx.long(), dv.to(acc))
    return flat.to(weight.dtype).view_as(weight)


def sparse_delta_refresh_(weight: torch.Tensor, base_values: torch.Tensor, dv: torch.Tensor,
                          idx: torch.Tensor) -> None:
    """In place: weight.flat[idx] = round(base_values + dv) (an assignment, never an increment)."""
    acc = _acc_dtype(base_values, dv)
    weight.view(-1).index_copy_(0, idx.long(), (base_values.to(acc) + dv.to(acc)).to(weight.dtype))


def sparse_delta_grad(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, in_features: int,
                      chunk: int = 4096) -> torch.Tensor:
    """Sampled dense-dense matmul: grad[i] = Σ_t dy[t, idx_i // in] · x[t, idx_i % in].

    dy: [T, out], x: [T, in]; returns fp32 (fp64 if an input is fp64) [k]. Works in chunks of
    `chunk` indices so memory stays O(T · chunk), never O(out · in).
    """
    acc = _acc_dtype(dy, x)
    k = idx.numel()
    out = torch.empty(k, dtype=acc, device=dy.device)
    idx = idx.long()
    for start in range(0, k, chunk):
        part = idx[start:start + chunk]
        rows, cols = part // in_features, part % in_features
        out[start:start + chunk] = (dy[:, rows].to(acc) * x[:, cols].to(acc)).sum(0)
    return out


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, dv: torch.Tensor, idx: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Forward of the sparse-delta linear, differentiable in x, dv and bias."""
    return F.linear(x, sparse_delta_materialize(weight, dv, idx), bias)


def sparse_delta_linear_published(x: torch.Tensor, weight: torch.Tensor, dv: torch.Tensor,
                                  idx: torch.Tensor, bias: torch.Tensor | None = None
                                  ) -> torch.Tensor:
    """The algorithm as published (clone, scatter_add, linear; autograd computes a dense dW and
    gathers it). The benchmarks' baseline; numerically it matches `sparse_delta_linear`."""
    w = weight.detach().clone().view(-1)
    w = w.scatter_add(0, idx.long(), dv.to(weight.dtype)).view_as(weight)
    return F.linear(x, w, bias)
