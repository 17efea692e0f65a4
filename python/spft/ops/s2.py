"""S2FT split-weight linear as torch.library custom ops.

The weight ``W [out, in]`` is a trainable block ``T`` followed by a frozen remainder ``F`` along
one axis, both read where they lie (never concatenated into a copy):

* ``axis="output"``: ``W = [T; F]``, T ``[s, in]``, F ``[out-s, in]``. Backward saves x and uses
  only ``dy[..., :s]`` for ``dT = dy[:, :s]ᵀ x``.
* ``axis="input"``: ``W = [T | F]``, T ``[out, s]``, F ``[out, in-s]``. Backward saves only
  ``x[..., :s]`` (a contiguous copy of the slice: partial back-propagation) for
  ``dT = dyᵀ x[:, :s]``.

``dx = dy @ W`` uses the same split GEMM. Ops (namespace ``spft``):
``s2_linear(x, trainable, frozen, axis, bias)``, ``s2_linear_dx(dy, trainable, frozen, axis)``,
``s2_adapter_linear(x, weight, bias, row_adapter, indices, deltas, axis)`` (batched serving).

How the parts are read on CUDA (chosen by measurement, see benchmarks/RESULTS.md "S2FT"):
1. ``adjacent``: T and F are views of one weight storage, laid out as one [out, in] matrix
   (`spft.nn.S2Linear` keeps them so): one cuBLAS GEMM over the whole weight.
2. otherwise ``SPFT_S2_SPLIT`` (environment, read per call; "cublas", the default: two cuBLAS
   calls that read the parts and write/accumulate into slices of one output; or "triton": the
   split-weight Triton GEMM in `sparse_kernels.s2_linear`). ``SPFT_BACKEND=triton`` forces the
   Triton kernel.
CPU tensors (and ``SPFT_BACKEND=torch``) use `spft.reference.s2`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from spft import _backend
from spft.ops._validation import FLOAT_DTYPES, require_dtype, require_same_device, require_tensor
from spft.reference import s2 as reference

AXES = reference.AXES
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SPLIT_IMPLS = ("cublas", "triton")


def split_impl() -> str:
    """The split path for non-adjacent parts on CUDA: `SPFT_S2_SPLIT`, default "cublas" (the
    H100 measurement in benchmarks/RESULTS.md)."""
    value = os.environ.get("SPFT_S2_SPLIT", "cublas").strip().lower()
    if value not in SPLIT_IMPLS:
        raise ValueError(f"SPFT_S2_SPLIT must be one of {SPLIT_IMPLS}, got {value!r}")
    return value


def _use_triton(*tensors: Tensor, op: str) -> bool:
    return _backend.use_triton(*tensors, op=op, supported_dtypes=_TRITON_DTYPES)


def adjacent_weight(trainable: Tensor, frozen: Tensor, axis: str) -> Tensor | None:
    """The whole weight [out, in] as a view when T and F lie next to each other in one storage
    exactly as one row-major matrix would; else None."""
    if trainable.dtype != frozen.dtype or trainable.device != frozen.device:
        return None
    if trainable.untyped_storage().data_ptr() != frozen.untyped_storage().data_ptr():
        return None
    st, sf = trainable.stride(), frozen.stride()
    if st != sf or st[1] != 1:
        return None
    if axis == "output":
        s, n_in = trainable.shape
        out = s + frozen.shape[0]
        ok = st[0] == n_in and frozen.storage_offset() == trainable.storage_offset() + s * n_in
        shape = (out, n_in)
    else:
        out, s = trainable.shape
        n_in = s + frozen.shape[1]
        ok = st[0] >= n_in and frozen.storage_offset() == trainable.storage_offset() + s
        shape = (out, n_in)
    if not ok:
        return None
    return trainable.as_strided(shape, st, trainable.storage_offset())


def _mm_parts(a: Tensor, b0: Tensor, b1: Tensor, split: str, use_triton: bool) -> Tensor:
    """``a @ [b0 | b1]`` (split n) or ``a @ [b0; b1]`` (split k) on CUDA."""
    if use_triton or split_impl() == "triton":
        from sparse_kernels.s2_linear import split_mm
        return split_mm(a, b0, b1, split)
    m = a.shape[0]
    if split == "n":
        s = b0.shape[1]
        out = a.new_empty((m, s + b1.shape[1]))
        torch.mm(a, b0, out=out[:, :s])
        torch.mm(a, b1, out=out[:, s:])
        return out
    s = b0.shape[0]
    out = torch.mm(a[:, s:], b1)
    return out.addmm_(a[:, :s], b0)


def _forward_impl(x2: Tensor, trainable: Tensor, frozen: Tensor, axis: str) -> Tensor:
    w = adjacent_weight(trainable, frozen, axis)
    forced = _backend.requested_backend() == "triton"
    if w is not None and not forced:
        return x2 @ w.t()
    if axis == "output":
        return _mm_parts(x2, trainable.t(), frozen.t(), "n", forced)
    return _mm_parts(x2, trainable.t(), frozen.t(), "k", forced)


def _dx_impl(dy2: Tensor, trainable: Tensor, frozen: Tensor, axis: str) -> Tensor:
    w = adjacent_weight(trainable, frozen, axis)
    forced = _backend.requested_backend() == "triton"
    if w is not None and not forced:
        return dy2 @ w
    return _mm_parts(dy2, trainable, frozen, "k" if axis == "output" else "n", forced)


# --------------------------------------------------------------------------- custom ops
def _s2_forward(x: Tensor, trainable: Tensor, frozen: Tensor, axis: str,
                bias: Tensor | None) -> Tensor:
    if not _use_triton(x, trainable, frozen, op="s2_linear"):
        return reference.s2_linear(x, trainable, frozen, axis, bias)
    n_out = trainable.shape[0] + frozen.shape[0] if axis == "output" else trainable.shape[0]
    y = _forward_impl(x.reshape(-1, x.shape[-1]), trainable, frozen, axis)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n_out)


@torch.library.custom_op("spft::s2_linear", mutates_args=())
def _s2_linear(x: Tensor, trainable: Tensor, frozen: Tensor, axis: str,
               bias: Tensor | None) -> Tensor:
    return _s2_forward(x, trainable, frozen, axis, bias)


@_s2_linear.register_fake
def _(x: Tensor, trainable: Tensor, frozen: Tensor, axis: str, bias: Tensor | None) -> Tensor:
    n_out = trainable.shape[0] + frozen.shape[0] if axis == "output" else trainable.shape[0]
    return x.new_empty((*x.shape[:-1], n_out))


def _s2_dx(dy: Tensor, trainable: Tensor, frozen: Tensor, axis: str) -> Tensor:
    if not _use_triton(dy, trainable, frozen, op="s2_linear_dx"):
        return reference.s2_linear_dx(dy, trainable, frozen, axis)
    n_in = trainable.shape[1] if axis == "output" else trainable.shape[1] + frozen.shape[1]
    dx = _dx_impl(dy.reshape(-1, dy.shape[-1]), trainable, frozen, axis)
    return dx.view(*dy.shape[:-1], n_in)


@torch.library.custom_op("spft::s2_linear_dx", mutates_args=())
def _s2_linear_dx(dy: Tensor, trainable: Tensor, frozen: Tensor, axis: str) -> Tensor:
    return _s2_dx(dy, trainable, frozen, axis)


@_s2_linear_dx.register_fake
def _(dy: Tensor, trainable: Tensor, frozen: Tensor, axis: str) -> Tensor:
    n_in = trainable.shape[1] if axis == "output" else trainable.shape[1] + frozen.shape[1]
    return dy.new_empty((*dy.shape[:-1], n_in))


def _setup_context(ctx, inputs, output) -> None:
    x, trainable, frozen, axis, _ = inputs
    ctx.axis = axis
    ctx.s = trainable.shape[0] if axis == "output" else trainable.shape[1]
    saved_x = None
    if ctx.needs_input_grad[1]:
        # Input axis: keep only the slice the block's gradient reads (partial back-propagation).
        saved_x = x if axis == "output" else x[..., : trainable.shape[1]].contiguous()
    ctx.save_for_backward(saved_x, trainable if ctx.needs_input_grad[0] else None,
                          frozen if ctx.needs_input_grad[0] else None)


def _backward(ctx, dy: Tensor, dx_fn=None) -> tuple:
    saved_x, trainable, frozen = ctx.saved_tensors
    axis = ctx.axis
    dx = dt = dbias = None
    if ctx.needs_input_grad[0]:
        dx = (dx_fn or torch.ops.spft.s2_linear_dx)(dy, trainable, frozen, axis)
    if ctx.needs_input_grad[1]:
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = saved_x.reshape(dy2.shape[0], saved_x.shape[-1])
        if axis == "output":
            dt = dy2[:, : ctx.s].t() @ x2  # only the block's s columns of dy are read
        else:
            dt = dy2.t() @ x2
    if ctx.needs_input_grad[4]:
        acc = torch.float32 if dy.dtype != torch.float64 else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=acc).to(dy.dtype)
    return dx, dt, None, None, dbias


_s2_linear.register_autograd(_backward, setup_context=_setup_context)


class S2LinearFunction(torch.autograd.Function):
    """Eager autograd path over the same implementation and the same saving policy as the
    custom op (the torch.library dispatch costs tens of µs of host time per call, which the
    H100 measurement showed to dominate a layer's fwd+bwd; under torch.compile the custom op
    is used)."""

    @staticmethod
    def forward(ctx, x, trainable, frozen, axis, bias):
        y = _s2_forward(x, trainable, frozen, axis, bias)
        _setup_context(ctx, (x, trainable, frozen, axis, bias), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, _s2_dx)


@torch.library.custom_op("spft::s2_adapter_linear", mutates_args=())
def _s2_adapter_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapter: Tensor,
                       indices: list[Tensor], deltas: list[Tensor], axis: str) -> Tensor:
    if not _use_triton(x, weight, op="s2_adapter_linear"):
        return reference.multi_adapter_linear(x, weight, bias, row_adapter, indices, deltas, axis)
    from sparse_kernels.s2_linear import segmented_delta_
    y = torch.nn.functional.linear(x, weight, bias)
    return segmented_delta_(y, x, row_adapter, indices, deltas, axis)


@_s2_adapter_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapter: Tensor,
      indices: list[Tensor], deltas: list[Tensor], axis: str) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


# --------------------------------------------------------------------------- public surface
def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def _validate(x: Tensor, trainable: Tensor, frozen: Tensor, axis: str,
              bias: Tensor | None) -> None:
    for name, value in (("x", x), ("trainable", trainable), ("frozen", frozen)):
        require_tensor(name, value)
    _check_axis(axis)
    for name, t in (("trainable", trainable), ("frozen", frozen)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        require_dtype(name, t, FLOAT_DTYPES)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
    if axis == "output":
        if trainable.shape[1] != frozen.shape[1]:
            raise ValueError(f"axis='output': trainable [s, in] and frozen [out-s, in] need equal "
                             f"in, got {tuple(trainable.shape)} and {tuple(frozen.shape)}")
        n_in, n_out = trainable.shape[1], trainable.shape[0] + frozen.shape[0]
    else:
        if trainable.shape[0] != frozen.shape[0]:
            raise ValueError(f"axis='input': trainable [out, s] and frozen [out, in-s] need equal "
                             f"out, got {tuple(trainable.shape)} and {tuple(frozen.shape)}")
        n_in, n_out = trainable.shape[1] + frozen.shape[1], trainable.shape[0]
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"x must end in in_features={n_in}, got shape {tuple(x.shape)}")
    if bias is not None:
        require_tensor("bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    require_same_device(x=x, trainable=trainable, frozen=frozen, bias=bias)


def s2_linear(x: Tensor, trainable: Tensor, frozen: Tensor, axis: str = "input",
              bias: Tensor | None = None) -> Tensor:
    """``y = x @ Wᵀ + bias`` with ``W = [trainable; frozen]`` (axis="output") or
    ``[trainable | frozen]`` (axis="input"), differentiable in x, trainable and bias.

    Args:
        x: [..., in], bf16/fp16/fp32 (fp64 on the torch backend).
        trainable: [s, in] (output axis) or [out, s] (input axis), x's dtype.
        frozen: [out-s, in] or [out, in-s], x's dtype; never receives a gradient.
        axis: "output" (rows) or "input" (columns).
        bias: optional [out], x's dtype.
    Returns:
        [..., out] in x's dtype. Saved for backward: x (output axis) or only the contiguous
        slice x[..., :s] (input axis), plus the two weight parts (no copies).
    """
    _validate(x, trainable, frozen, axis, bias)
    if torch.compiler.is_compiling():
        return torch.ops.spft.s2_linear(x, trainable, frozen, axis, bias)
    return S2LinearFunction.apply(x, trainable, frozen, axis, bias)


def s2_linear_dx(dy: Tensor, trainable: Tensor, frozen: Tensor, axis: str = "input") -> Tensor:
    """``dy @ W`` for the split weight W (see `s2_linear`): dy [..., out] → [..., in]."""
    _check_axis(axis)
    return torch.ops.spft.s2_linear_dx(dy, trainable, frozen, axis)


def s2_adapter_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_adapter: Tensor,
                      indices: list[Tensor], deltas: list[Tensor], axis: str) -> Tensor:
    """Batched multi-adapter serving: ``y[t] = x[t] @ (W + Δ_{a(t)})ᵀ + b`` without merging.

    x [T, in]; weight [out, in] (untouched base); bias [out] or None; row_adapter [T] int32/int64
    with values in [-1, n) (-1: base only); indices[a] [s_a] int64 unique original channels
    (output rows for axis="output", input columns for axis="input"); deltas[a] [s_a, in] or
    [out, s_a] (any float dtype, applied in x's dtype). CUDA: segmented GEMM over adapter groups
    (`sparse_kernels.s2_linear.segmented_delta_`). Not differentiable (inference op).
    """
    _check_axis(axis)
    require_tensor("x", x)
    require_tensor("weight", weight)
    require_tensor("row_adapter", row_adapter)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [T, in] and weight [out, in] must agree, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    require_dtype("row_adapter", row_adapter, (torch.int32, torch.int64))
    if row_adapter.shape != (x.shape[0],):
        raise ValueError(f"row_adapter must have shape ({x.shape[0]},), got "
                         f"{tuple(row_adapter.shape)}")
    if len(indices) != len(deltas):
        raise ValueError("indices and deltas must have one entry per adapter")
    out, n_in = weight.shape
    for a, (idx, d) in enumerate(zip(indices, deltas)):
        limit = out if axis == "output" else n_in
        want = (idx.numel(), n_in) if axis == "output" else (out, idx.numel())
        if idx.dim() != 1 or tuple(d.shape) != want:
            raise ValueError(f"adapter {a}: indices [s] and deltas {want} expected, got "
                             f"{tuple(idx.shape)} and {tuple(d.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise ValueError(f"adapter {a}: indices out of range [0, {limit})")
    if row_adapter.numel() and (int(row_adapter.min()) < -1
                                or int(row_adapter.max()) >= len(indices)):
        raise ValueError(f"row_adapter values must lie in [-1, {len(indices)})")
    indices = [i.to(torch.int64) for i in indices]
    return torch.ops.spft.s2_adapter_linear(x, weight, bias, row_adapter, indices,
                                            list(deltas), axis)
