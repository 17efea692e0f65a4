"""SpIEL sparse-delta linear: `y = x @ (W + scatter(dv, idx))ᵀ + b` as torch.library custom ops.

Ops (namespace `spft`):
* `sparse_delta_materialize(weight, dv, idx) -> W'` — one fused pass, W' = round(W + scatter(dv)).
* `sparse_delta_grad(dy, x, idx, in_features, strategy) -> g` — fp32 gradient at idx only (SDDMM).
* `sparse_delta_linear(x, weight, dv, idx, bias)` — materialise + GEMM; backward re-materialises
  for dx (no weight-sized tensor is kept between forward and backward) and runs the SDDMM for dv.
* `sparse_delta_linear_merged(x, weight, dv, idx, bias)` — the weight already holds
  round(W0 + dv) at idx: forward is a plain GEMM, backward a plain dx GEMM plus the SDDMM.
* `sparse_delta_refresh_(weight, base_values, dv, idx)` — in place, weight.flat[idx] =
  round(base_values + dv); keeps a merged weight in sync after each optimizer step.

Backends: CUDA tensors run the Triton kernels in `sparse_kernels`, the gradient's `staged`
strategy the compiled tensor-core SDDMM of `spft._C` (`csrc/sddmm.cu`, where the extension
is built) and its `chunked` strategy cuBLAS row blocks of dW plus a Triton gather; everything
else (and `SPFT_BACKEND=torch`) runs the references in `spft.reference.sparse_delta`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spft import _backend
from spft.ops._validation import (
    FLOAT_DTYPES,
    check_flat_indices,
    require_dtype,
    require_same_device,
    require_tensor,
)
from spft.reference import sparse_delta as reference

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GRAD_STRATEGIES = ("auto", "tiles", "sampled", "staged", "chunked")
# `auto` picks the compiled staged SDDMM for densities in (sddmm.SAMPLED_MAX_DENSITY, this];
# denser 16-bit deltas on CUDA take `chunked`, fp32 the tensor-core tiles (measured on the
# H200: benchmarks/RESULTS.md, eighteenth session).
STAGED_MAX_DENSITY = 0.01
# The compiled kernel keeps its copy steps (16 rows) in 32 bits (csrc/sddmm.cuh).
STAGED_MAX_ROW_STRIDE = 2**27
# `chunked` forms dW one block of rows at a time, at most this many fp32 elements (32 MiB)
# whatever the layer's size, and gathers the block's indices from it.
CHUNKED_BLOCK_ELEMS = 2**23


def _use_triton(*tensors: Tensor, op: str) -> bool:
    return _backend.use_triton(*tensors, op=op, supported_dtypes=_TRITON_DTYPES)


# --------------------------------------------------------------------------- building blocks
# Each op body is a plain function; the registered op wraps it. Eager callers use the bodies
# directly (`eager_*` / the autograd.Function below): on torch 2.11 a registered custom op
# costs ~0.1-0.2 ms of host time per call, ~1.2 ms per forward+backward of the linear
# (benchmarks/bench_host_overhead.py), which would make a 7B training step host-bound.
# Under torch.compile the registered ops (with their fake impls) are used.
def _materialize_impl(weight: Tensor, dv: Tensor, idx: Tensor) -> Tensor:
    if _use_triton(weight, dv, op="sparse_delta_materialize"):
        from sparse_kernels.sparse_delta import sparse_delta_materialize
        return sparse_delta_materialize(weight, dv, idx)
    return reference.sparse_delta_materialize(weight, dv, idx)


def staged_grad_reasons(dy: Tensor, x: Tensor, idx: Tensor) -> list[str]:
    """Why the compiled staged SDDMM (`spft._C.sddmm_staged`) cannot take these tensors; empty
    if it can (the extension itself aside)."""
    reasons = []
    if dy.dtype not in (torch.bfloat16, torch.float16) or x.dtype != dy.dtype:
        reasons.append(f"dy/x are {dy.dtype}/{x.dtype}, not one of bfloat16/float16")
    if dy.dim() != 2 or x.dim() != 2:
        return [*reasons, "dy and x must be 2-D"]
    if dy.shape[1] % 8 or x.shape[1] % 8:
        reasons.append("out_features and in_features must be multiples of 8")
    for name, t in (("dy", dy), ("x", x)):
        if t.stride(1) != 1 or t.stride(0) % 8 or t.data_ptr() % 16:
            reasons.append(f"{name} rows are not contiguous and 16-byte aligned")
        if t.stride(0) >= STAGED_MAX_ROW_STRIDE:
            reasons.append(f"{name}'s row stride {t.stride(0)} is 2^27 elements or more")
    if idx.dtype == torch.int32 and dy.shape[1] * x.shape[1] >= 2**31:
        reasons.append("an int32 idx cannot address 2^31 or more weight elements")
    if dy.is_cuda and torch.cuda.get_device_capability(dy.device)[0] < 8:
        reasons.append("the kernel needs compute capability 8.0 or newer")
    return reasons


def _use_staged(dy: Tensor, x: Tensor, idx: Tensor, in_features: int, strategy: str) -> bool:
    if strategy not in ("auto", "staged") or _backend.requested_backend() in ("torch", "triton"):
        return False
    if not (dy.is_cuda and x.is_cuda and idx.is_cuda) or not _backend.extension_has_cuda():
        return False
    if staged_grad_reasons(dy, x, idx):
        return False
    if strategy == "staged":
        return True
    from sparse_kernels.sddmm import SAMPLED_MAX_DENSITY
    density = idx.numel() / max(1, dy.shape[1] * in_features)
    return SAMPLED_MAX_DENSITY < density <= STAGED_MAX_DENSITY


def _use_chunked(dy: Tensor, x: Tensor, idx: Tensor, in_features: int, strategy: str) -> bool:
    if strategy not in ("auto", "chunked") or _backend.requested_backend() in ("torch", "triton"):
        return False
    if not (dy.is_cuda and dy.dtype in (torch.bfloat16, torch.float16) and x.dtype == dy.dtype):
        return False
    density = idx.numel() / max(1, dy.shape[1] * in_features)
    return strategy == "chunked" or density > STAGED_MAX_DENSITY


def grad_chunked(dy: Tensor, x: Tensor, idx: Tensor, in_features: int,
                 block_elems: int | None = None) -> Tensor:
    """The `chunked` gradient: dW = dyᵀ x a block of rows at a time (cuBLAS, 16-bit inputs, fp32
    accumulation and output), each block's indices gathered from it (Triton). Peak memory: one
    block of at most `block_elems` (default CHUNKED_BLOCK_ELEMS) fp32 elements. dy [T, out] /
    x [T, in] bf16 or fp16 on CUDA; idx [k] int32/int64 in any order; returns fp32 [k] (0 for
    indices outside the weight)."""
    from sparse_kernels.sddmm import gather_row_block
    out_features = dy.shape[1]
    block_elems = block_elems or CHUNKED_BLOCK_ELEMS
    # Whole multiples of 64 rows keep each block's slice of dy 16-byte aligned for cuBLAS (at
    # 762 rows a 4096 × 11008 gradient took 2.3× as long on the H200); a weight wider than
    # block_elems / 64 columns gets 64-row blocks, over the budget.
    rows = min(out_features, max(64, block_elems // max(1, in_features) // 64 * 64))
    out = torch.zeros(idx.numel(), dtype=torch.float32, device=dy.device)
    for first in range(0, out_features, rows):
        block = torch.mm(dy[:, first:first + rows].t(), x, out_dtype=torch.float32)
        gather_row_block(block, idx, out, first, in_features)
    return out


def _grad_impl(dy: Tensor, x: Tensor, idx: Tensor, in_features: int, strategy: str) -> Tensor:
    if _use_chunked(dy, x, idx, in_features, strategy):
        return grad_chunked(dy, x, idx, in_features)
    if _use_staged(dy, x, idx, in_features, strategy):
        return _backend.extension().sddmm_staged(dy, x, idx, in_features)
    if _use_triton(dy, x, op="sparse_delta_grad"):
        from sparse_kernels.sddmm import sparse_delta_grad
        return sparse_delta_grad(dy, x, idx, in_features,
                                 strategy="auto" if strategy in ("staged", "chunked") else strategy)
    return reference.sparse_delta_grad(dy, x, idx, in_features)


def _refresh_impl(weight: Tensor, base_values: Tensor, dv: Tensor, idx: Tensor) -> None:
    if _use_triton(weight, dv, op="sparse_delta_refresh_"):
        from sparse_kernels.sparse_delta import sparse_delta_refresh_
        sparse_delta_refresh_(weight, base_values, dv, idx)
    else:
        reference.sparse_delta_refresh_(weight, base_values, dv, idx)


_materialize = torch.library.custom_op("spft::sparse_delta_materialize", mutates_args=())(
    _materialize_impl)
_grad = torch.library.custom_op("spft::sparse_delta_grad", mutates_args=())(_grad_impl)
_refresh = torch.library.custom_op("spft::sparse_delta_refresh_", mutates_args=("weight",))(
    _refresh_impl)


@_materialize.register_fake
def _(weight: Tensor, dv: Tensor, idx: Tensor) -> Tensor:
    return torch.empty_like(weight)


@_grad.register_fake
def _(dy: Tensor, x: Tensor, idx: Tensor, in_features: int, strategy: str) -> Tensor:
    dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.new_empty(idx.shape, dtype=dtype)


@_refresh.register_fake
def _(weight: Tensor, base_values: Tensor, dv: Tensor, idx: Tensor) -> None:
    return None


def eager_materialize(weight: Tensor, dv: Tensor, idx: Tensor) -> Tensor:
    """`spft::sparse_delta_materialize` (the op when compiling, its body otherwise)."""
    if torch.compiler.is_compiling():
        return _materialize(weight, dv, idx)
    return _materialize_impl(weight, dv, idx)


def eager_grad(dy: Tensor, x: Tensor, idx: Tensor, in_features: int,
               strategy: str = "auto") -> Tensor:
    """`spft::sparse_delta_grad` (the op when compiling, its body otherwise)."""
    if torch.compiler.is_compiling():
        return _grad(dy, x, idx, in_features, strategy)
    return _grad_impl(dy, x, idx, in_features, strategy)


# --------------------------------------------------------------------------- the linear ops
@torch.library.custom_op("spft::sparse_delta_linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, dv: Tensor, idx: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, _materialize_impl(weight, dv, idx), bias)


@torch.library.custom_op("spft::sparse_delta_linear_merged", mutates_args=())
def _linear_merged(x: Tensor, weight: Tensor, dv: Tensor, idx: Tensor,
                   bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _linear_fake(x: Tensor, weight: Tensor, dv: Tensor, idx: Tensor,
                 bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_linear.register_fake(_linear_fake)
_linear_merged.register_fake(_linear_fake)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, dv, idx, _bias = inputs
    # x is needed only for the dv gradient; weight/dv/idx only for dx (re-materialised).
    ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, weight, dv, idx)
    ctx.x_shape = x.shape


def _keep_weight(weight: Tensor, dv: Tensor, idx: Tensor) -> Tensor:
    return weight


def _backward_common(ctx, dy: Tensor, weight_for_dx, grad_fn) -> tuple:
    x, weight, dv, idx = ctx.saved_tensors
    out_features, in_features = weight.shape
    dy2 = dy.reshape(-1, out_features)
    dx = ddv = dbias = None
    if ctx.needs_input_grad[0]:
        dx = (dy2 @ weight_for_dx(weight, dv, idx)).view(ctx.x_shape)
    if ctx.needs_input_grad[2]:
        x2 = x.reshape(-1, in_features)
        ddv = grad_fn(dy2, x2, idx, in_features, "auto").to(dv.dtype)
    if ctx.needs_input_grad[4]:
        dbias = dy2.sum(0, dtype=torch.float32 if dy.dtype != torch.float64 else None).to(dy.dtype)
    return dx, None, ddv, None, dbias


def _backward_materialising(ctx, dy: Tensor) -> tuple:
    return _backward_common(ctx, dy, _materialize, _grad)


def _backward_merged(ctx, dy: Tensor) -> tuple:
    return _backward_common(ctx, dy, _keep_weight, _grad)


_linear.register_autograd(_backward_materialising, setup_context=_setup_context)
_linear_merged.register_autograd(_backward_merged, setup_context=_setup_context)


class _EagerSparseDeltaLinear(torch.autograd.Function):
    """The same forward and backward as the registered ops, without their dispatch."""

    @staticmethod
    def forward(ctx, x, weight, dv, idx, bias, merged):
        y = F.linear(x, weight if merged else _materialize_impl(weight, dv, idx), bias)
        _setup_context(ctx, (x, weight, dv, idx, bias), y)
        ctx.merged = merged
        return y

    @staticmethod
    def backward(ctx, dy):
        weight_for_dx = _keep_weight if ctx.merged else _materialize_impl
        return (*_backward_common(ctx, dy, weight_for_dx, _grad_impl), None)


# --------------------------------------------------------------------------- public surface
def _validate_linear(x: Tensor, weight: Tensor, dv: Tensor, idx: Tensor,
                     bias: Tensor | None) -> None:
    for name, value in (("x", x), ("weight", weight), ("dv", dv), ("idx", idx)):
        require_tensor(name, value)
    if bias is not None:
        require_tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous: idx holds flat row-major offsets into it")
    require_dtype("weight", weight, FLOAT_DTYPES)
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if dv.dtype not in (torch.float32, weight.dtype):
        raise TypeError(f"dv must be float32 or the weight's dtype {weight.dtype}, got {dv.dtype}")
    require_dtype("idx", idx, (torch.int32, torch.int64))
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in in_features={weight.shape[1]}, got shape {tuple(x.shape)}")
    if dv.dim() != 1 or idx.dim() != 1 or dv.shape != idx.shape:
        raise ValueError(f"dv and idx must be 1-D of equal length, got dv {tuple(dv.shape)} and "
                         f"idx {tuple(idx.shape)}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match weight dtype {weight.dtype}")
    require_same_device(x=x, weight=weight, dv=dv, idx=idx, bias=bias)


def sparse_delta_linear(x: Tensor, weight: Tensor, dv: Tensor, idx: Tensor,
                        bias: Tensor | None = None, *, merged: bool = False,
                        check_indices: bool = True) -> Tensor:
    """`y = x @ (weight + scatter(dv, idx))ᵀ + bias`, differentiable in x, dv and bias.

    Args:
        x: [..., in] with weight's dtype (bf16, fp16, fp32; fp64 on the torch backend).
        weight: [out, in] frozen, contiguous. Never receives a gradient. A 4-bit base (an
            `spft.ops.NF4Weight` or a quantised bnb `Params4bit`) routes to
            `spft.ops.sparse_delta_linear_nf4`.
        dv: [k] trainable deltas, float32 or weight.dtype.
        idx: [k] int32/int64 unique flat row-major indices into weight (int64 when
            out·in ≥ 2**31). Unsorted input is sorted (dv is permuted with it, differentiably).
        bias: optional [out], weight's dtype.
        merged: the weight already holds round(W0 + dv) at idx (see
            `spft.nn.SparseDeltaLinear`); the forward is then a plain GEMM.
        check_indices: validate idx (range, uniqueness, order: one host sync). Callers that
            guarantee sorted unique in-range indices (the modules) pass False.
    Returns:
        [..., out] in weight's dtype. Gradients are accumulated in fp32.
    """
    if not isinstance(weight, Tensor) or getattr(weight, "quant_state", None) is not None:
        # A 4-bit base (spft NF4Weight or bnb Params4bit): its own op, see spft.ops.nf4.
        from spft.ops.nf4 import is_4bit_weight, sparse_delta_linear_nf4
        if is_4bit_weight(weight):
            if merged:
                raise ValueError("merged=True is not supported on a 4-bit base weight")
            return sparse_delta_linear_nf4(x, weight, dv, idx, bias, check_indices=check_indices)
    _validate_linear(x, weight, dv, idx, bias)
    if check_indices:
        is_sorted, _ = check_flat_indices(idx, weight.numel())
        if not is_sorted:
            if merged:
                raise ValueError("idx must be sorted when merged=True (the module keeps it so)")
            order = torch.argsort(idx)
            idx, dv = idx[order], dv[order]
    if not torch.compiler.is_compiling():
        return _EagerSparseDeltaLinear.apply(x, weight, dv, idx, bias, merged)
    op = torch.ops.spft.sparse_delta_linear_merged if merged else torch.ops.spft.sparse_delta_linear
    return op(x, weight, dv, idx, bias)


def sparse_delta_materialize(weight: Tensor, dv: Tensor, idx: Tensor) -> Tensor:
    """`weight + scatter(dv, idx)` rounded once to weight.dtype, in a new tensor.

    weight: [out, in] contiguous; dv: [k] float; idx: [k] sorted unique int32/int64.
    """
    require_tensor("weight", weight)
    check_flat_indices(idx, weight.numel())
    return eager_materialize(weight, dv, idx)


def sparse_delta_grad(dy: Tensor, x: Tensor, idx: Tensor, in_features: int,
                      strategy: str = "auto", check_indices: bool = True) -> Tensor:
    """fp32 gradient of deltas at unique `idx`: g[j] = Σ_t dy[t, r_j] · x[t, c_j].

    dy: [T, out], x: [T, in] (any strides). strategy: "auto" (on CUDA: "sampled" up to 0.02 %
    density, "staged" up to 1 % where spft._C is built, above 1 % "chunked" for bf16/fp16;
    "tiles" otherwise) | "tiles" (tensor-core tiles of dW, for dense deltas) | "sampled" (one
    index at a time, for very sparse deltas) | "staged"
    (the compiled kernel of `spft._C`: per 512 × 512 weight tile, mma rows filled with wanted
    entries only, for up to ~1 % density; it first copies the smaller of dy / x transposed,
    T × min(out, in) elements; where it cannot serve — no extension, CPU, fp32, sizes not
    multiples of 8, unaligned rows — it means "auto") | "chunked" (dW a block of rows at a time
    with cuBLAS, at most 32 MiB, gathered at the indices; CUDA bf16/fp16, else "auto"). The
    strategy only chooses a kernel; every one returns the same values up to fp32 summation
    order.

    idx: [k] flat row-major indices into the [out, in] weight. check_indices (one host sync)
    rejects indices out of range or repeated and sorts unsorted ones (the result stays in idx's
    order); callers that guarantee sorted, unique, in-range indices pass False — the kernels
    assume them sorted.
    """
    if strategy not in GRAD_STRATEGIES:
        raise ValueError(f"strategy must be one of {GRAD_STRATEGIES}, got {strategy!r}")
    if check_indices:
        require_tensor("dy", dy)
        is_sorted, _ = check_flat_indices(idx, dy.shape[-1] * in_features)
        if not is_sorted:
            order = torch.argsort(idx)
            grad_sorted = eager_grad(dy, x, idx[order], in_features, strategy)
            return torch.empty_like(grad_sorted).index_copy_(0, order, grad_sorted)
    return eager_grad(dy, x, idx, in_features, strategy)


def sparse_delta_refresh_(weight: Tensor, base_values: Tensor, dv: Tensor, idx: Tensor) -> None:
    """In place: `weight.flat[idx] = round(base_values + dv)`.

    base_values: [k] fp32 originals W0[idx]; the refresh is an assignment, so repeated calls
    never accumulate rounding drift.
    """
    if base_values.shape != dv.shape or dv.shape != idx.shape:
        raise ValueError("base_values, dv and idx must share one 1-D shape")
    if torch.compiler.is_compiling():
        torch.ops.spft.sparse_delta_refresh_(weight, base_values, dv, idx)
    else:
        _refresh_impl(weight, base_values, dv, idx)
