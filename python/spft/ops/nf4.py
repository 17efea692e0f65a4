"""4-bit (NF4/FP4) base weights in the bitsandbytes format, and the sparse-delta linear on them.

`NF4Weight` holds the packed codes and the absmax (plain or double-quantised) of one weight.
Ops (namespace `spft`), all taking the packed tensors plus ints so torch.compile sees plain
tensors:
* `nf4_quantize(w, blocksize, quant_type) -> (packed, absmax)`
* `nf4_dequantize(packed, absmax, absmax2, code2, offset, code, blocksize, numel, dtype)`
* `nf4_dequantize_scatter(... , dv, idx, ..., out_features, in_features, dtype)` — W + scatter
  in one pass (the materialisation of the quantised sparse-delta linear, "qSpIEL"). The
  registered ops take idx sorted and unique, as the Python wrappers below hand it over after
  `check_indices`; given unsorted indices the CUDA path may drop deltas.
* `sparse_delta_linear_nf4(x, packed, ..., dv, idx, bias, blocksize, out, in)` — materialise +
  GEMM; backward re-materialises for
  dx and calls `spft::sparse_delta_grad` for dv. Differentiable in x, dv and bias.
* `nf4_linear_small_batch(x, packed, ..., dv?, idx?, row_ptr?, bias?)` — inference with unmerged
  deltas, never materialising a 16-bit weight.

Backends as everywhere in spft: CUDA tensors run `sparse_kernels.nf4`, others the references in
`spft.reference.nf4`. bitsandbytes is never imported; a bnb `Params4bit` is recognised by its
`quant_state` attribute and read through `NF4Weight.from_bnb`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

import spft.ops.sparse_delta  # noqa: F401  (registers spft::sparse_delta_grad)
from spft import _backend
from spft.ops._validation import check_flat_indices, require_dtype, require_tensor
from spft.reference import nf4 as reference

if TYPE_CHECKING:
    from spft.ops.nf4_gemv import NF4GemvWeight

BLOCKSIZES = reference.BLOCKSIZES
QUANT_TYPES = reference.QUANT_TYPES
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMV_MAX_TOKENS = 16


class NF4Weight:
    """A 4-bit blockwise-quantised weight (bitsandbytes layout), on one device.

    Attributes:
        packed: [ceil(numel / 2)] uint8, two codes per byte, even element in the high nibble.
        absmax: [n_blocks] fp32, or [n_blocks] uint8 when double-quantised.
        absmax2: [ceil(n_blocks / 256)] fp32 (double quant only).
        code2: [256] fp32 map of the 8-bit absmax (double quant only).
        offset: 0-dim fp32 mean added back to the absmax (double quant only).
        code: [16] fp32 code values (NF4 or FP4).
        shape, dtype: the original weight's shape and dtype (dequantisation default).
        blocksize: elements per absmax block; quant_type: "nf4" or "fp4".
    """

    __slots__ = ("absmax", "absmax2", "blocksize", "code", "code2", "dtype", "offset",
                 "packed", "quant_type", "shape")

    def __init__(self, packed: Tensor, absmax: Tensor, shape: Iterable[int], dtype: torch.dtype,
                 blocksize: int = 64, quant_type: str = "nf4", code: Tensor | None = None,
                 absmax2: Tensor | None = None, code2: Tensor | None = None,
                 offset: Tensor | None = None) -> None:
        self.packed = packed
        self.absmax = absmax
        self.absmax2 = absmax2
        self.code2 = code2
        self.offset = offset
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.quant_type = quant_type
        self.code = code if code is not None else reference.code_table(quant_type, packed.device)
        validate_nf4_weight(self)

    # ------------------------------------------------------------------ properties
    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None,
                               Tensor]:
        """(packed, absmax, absmax2, code2, offset, code) — the ops' tensor arguments."""
        return self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.code

    def to(self, device: torch.device | str) -> NF4Weight:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype,
                         self.blocksize, self.quant_type, move(self.code), move(self.absmax2),
                         move(self.code2), move(self.offset))

    def absmax_fp32(self) -> Tensor:
        """The fp32 absmax per block (decoded when double-quantised)."""
        if not self.double_quant:
            return self.absmax
        return reference.dequantize_absmax(self.absmax, self.absmax2, self.code2, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return nf4_dequantize(self, dtype)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"quant_type={self.quant_type!r}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")

    # ------------------------------------------------------------------ bitsandbytes
    @classmethod
    def from_bnb(cls, weight: object, quant_state: object | None = None) -> NF4Weight:
        """Read a bnb `Params4bit` (or packed data + `QuantState`) without copying its bytes."""
        state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("weight has no quant_state: is the bnb Params4bit quantised yet "
                             "(moved to its device)?")
        data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if not isinstance(data, Tensor):
            raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
        packed = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 \
            else data.reshape(-1)
        state2 = getattr(state, "state2", None)
        nested = state2 is not None and getattr(state, "nested", True)
        offset = getattr(state, "offset", None)
        if nested and offset is not None and not isinstance(offset, Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        if nested and getattr(state2, "blocksize", reference.ABSMAX_BLOCKSIZE) \
                != reference.ABSMAX_BLOCKSIZE:
            raise ValueError("only double quantisation with absmax blocks of 256 is supported")
        return cls(
            packed, state.absmax, state.shape, state.dtype, state.blocksize,
            state.quant_type, state.code.float(),
            state2.absmax if nested else None, state2.code if nested else None,
            offset.float() if nested else None,
        )


def is_4bit_weight(obj: object) -> bool:
    """True for an `NF4Weight` or a quantised bnb `Params4bit` (detected by `quant_state`)."""
    return isinstance(obj, NF4Weight) or getattr(obj, "quant_state", None) is not None


def as_nf4_weight(obj: object) -> NF4Weight:
    if isinstance(obj, NF4Weight):
        return obj
    if getattr(obj, "quant_state", None) is not None:
        return NF4Weight.from_bnb(obj)
    raise TypeError(f"expected an NF4Weight or a bnb Params4bit, got {type(obj).__name__}")


def validate_nf4_weight(q: NF4Weight) -> None:
    """Clear errors for inconsistent 4-bit tensors (the kernels trust these invariants)."""
    if q.blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {q.blocksize}")
    if q.quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {q.quant_type!r}")
    require_tensor("packed", q.packed)
    require_tensor("absmax", q.absmax)
    if q.packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {q.packed.dtype}")
    if not q.packed.is_contiguous():
        raise ValueError("packed must be contiguous (codes are addressed by flat offset)")
    if q.packed.numel() != (q.numel + 1) // 2:
        raise ValueError(f"packed has {q.packed.numel()} bytes; a weight of shape "
                         f"{tuple(q.shape)} needs {(q.numel + 1) // 2}")
    if q.absmax.dim() != 1 or q.absmax.numel() != q.n_blocks:
        raise ValueError(f"absmax must have shape ({q.n_blocks},) for {q.numel} elements in "
                         f"blocks of {q.blocksize}, got {tuple(q.absmax.shape)}")
    require_dtype("absmax", q.absmax, (torch.float32, torch.uint8))
    if not q.absmax.is_contiguous():
        raise ValueError("absmax must be contiguous")
    if q.code.shape != (16,) or q.code.dtype != torch.float32:
        raise ValueError(f"code must be a float32 tensor of shape (16,), got "
                         f"{q.code.dtype} {tuple(q.code.shape)}")
    if q.double_quant:
        for name in ("absmax2", "code2", "offset"):
            if getattr(q, name) is None:
                raise ValueError(f"a uint8 (double-quantised) absmax needs {name}")
        n2 = -(-q.n_blocks // reference.ABSMAX_BLOCKSIZE)
        if q.absmax2.shape != (n2,) or q.absmax2.dtype != torch.float32:
            raise ValueError(f"absmax2 must be float32 of shape ({n2},), got "
                             f"{q.absmax2.dtype} {tuple(q.absmax2.shape)}")
        if q.code2.shape != (256,) or q.code2.dtype != torch.float32:
            raise ValueError("code2 must be a float32 tensor of shape (256,)")
        if q.offset.numel() != 1 or q.offset.dtype != torch.float32:
            raise ValueError("offset must be a single float32 value")
    tensors = [t for t in q.tensors() if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError("all tensors of an NF4Weight must be on one device")


# --------------------------------------------------------------------------- backends
def _use_triton(*tensors: Tensor, op: str) -> bool:
    return _backend.use_triton(*tensors, op=op, supported_dtypes=_COMPUTE_DTYPES)


def _ref_absmax(absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None,
                offset: Tensor | None) -> Tensor:
    if absmax.dtype == torch.uint8:
        return reference.dequantize_absmax(absmax, absmax2, code2, offset)
    return absmax


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("spft::nf4_quantize", mutates_args=())
def _quantize(w: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    if _use_triton(w, op="nf4_quantize"):
        from sparse_kernels.nf4 import quantize_4bit
        mids, order = reference.quantize_bounds(quant_type, w.device)
        return quantize_4bit(w.contiguous(), blocksize, mids, order)
    return reference.quantize_4bit(w, blocksize, quant_type)


@_quantize.register_fake
def _(w: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    n = w.numel()
    return (w.new_empty((n + 1) // 2, dtype=torch.uint8),
            w.new_empty(-(-n // blocksize), dtype=torch.float32))


def _dequantize_impl(packed: Tensor, absmax: Tensor, absmax2: Tensor | None,
                     code2: Tensor | None, offset: Tensor | None, code: Tensor, blocksize: int,
                     numel: int, dtype: torch.dtype) -> Tensor:
    if _use_triton(packed, op="nf4_dequantize") and dtype in _COMPUTE_DTYPES:
        from sparse_kernels.nf4 import dequantize_4bit
        return dequantize_4bit(packed, absmax, code, blocksize, numel, dtype,
                               absmax2=absmax2, code2=code2, offset=offset)
    return reference.dequantize_4bit(packed, _ref_absmax(absmax, absmax2, code2, offset), code,
                                     blocksize, numel, dtype)


_dequantize = torch.library.custom_op("spft::nf4_dequantize", mutates_args=())(_dequantize_impl)


@_dequantize.register_fake
def _(packed, absmax, absmax2, code2, offset, code, blocksize, numel, dtype) -> Tensor:
    return packed.new_empty(numel, dtype=dtype)


def _materialise(packed: Tensor, absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None,
                 offset: Tensor | None, code: Tensor, dv: Tensor, idx: Tensor, blocksize: int,
                 out_features: int, in_features: int, dtype: torch.dtype,
                 starts: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """W + scatter(dv, idx) [out, in] `dtype`, and the Triton kernel's per-program delta ranges
    (None on other paths): handing them back as `starts` for the same idx skips their search."""
    numel = out_features * in_features
    if _use_triton(packed, dv, op="nf4_dequantize_scatter") and dtype in _COMPUTE_DTYPES:
        from sparse_kernels.nf4 import dequantize_4bit, fused_program_starts
        if starts is None and dtype != torch.float32 and idx.numel() > 0:
            starts = fused_program_starts(idx, numel, blocksize)
        w = dequantize_4bit(packed, absmax, code, blocksize, numel, dtype, absmax2=absmax2,
                            code2=code2, offset=offset, dv=dv, idx=idx, idx_sorted=True,
                            starts=starts)
        return w.view(out_features, in_features), starts
    return reference.dequantize_scatter(packed, _ref_absmax(absmax, absmax2, code2, offset),
                                        code, blocksize, (out_features, in_features), dtype,
                                        dv, idx), None


def _dequantize_scatter_impl(packed: Tensor, absmax: Tensor, absmax2: Tensor | None,
                             code2: Tensor | None, offset: Tensor | None, code: Tensor,
                             dv: Tensor, idx: Tensor, blocksize: int, out_features: int,
                             in_features: int, dtype: torch.dtype) -> Tensor:
    return _materialise(packed, absmax, absmax2, code2, offset, code, dv, idx, blocksize,
                        out_features, in_features, dtype)[0]


# Op bodies call the plain `_impl` functions (one dispatch per op call, not nested ones).
_dequantize_scatter = torch.library.custom_op("spft::nf4_dequantize_scatter", mutates_args=())(
    _dequantize_scatter_impl)


@_dequantize_scatter.register_fake
def _(packed, absmax, absmax2, code2, offset, code, dv, idx, blocksize, out_features,
      in_features, dtype) -> Tensor:
    return packed.new_empty((out_features, in_features), dtype=dtype)


def _small_batch_ok(x: Tensor, packed: Tensor, in_features: int, blocksize: int) -> bool:
    if not _use_triton(x, packed, op="nf4_linear_small_batch"):
        return False
    from sparse_kernels.nf4 import gemv_supported
    return gemv_supported(x, in_features, blocksize)


def gemv_input_reasons(x: Tensor, numel: int, in_features: int) -> list[str]:
    """Why neither compiled GEMV can take x [T, in] with a weight of `numel` elements (shared
    by `spft._C.nf4_gemv` and `nf4_gemv_tiled`); empty if both can."""
    reasons = []
    if x.dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"x is {x.dtype}, not bfloat16/float16")
    if not 1 <= x.shape[0] <= 16:
        reasons.append(f"{x.shape[0]} tokens, not 1 to 16")
    if numel >= 2**31:  # the kernels index with 32-bit offsets
        reasons.append(f"the weight has {numel} elements, not fewer than 2^31")
    if x.dim() == 2 and (x.shape[0] - 1) * x.stride(0) + in_features >= 2**31:
        reasons.append("x spans 2^31 or more elements")
    return reasons


def use_compiled_gemv(x: Tensor, weight_tensor: Tensor, reasons: Callable[[], list[str]],
                      what: str) -> bool:
    """Whether a compiled GEMV serves x (`reasons()` lists why not, and is only called once the
    extension is known to be there); `SPFT_BACKEND=cuda` raises, naming why, when it cannot."""
    if _backend.requested_backend() == "cuda":
        _backend.use_extension(x, weight_tensor, op="nf4_linear_small_batch")  # raises if absent
        found = reasons()
        if found:
            raise RuntimeError(f"SPFT_BACKEND=cuda cannot serve nf4_linear_small_batch{what}: "
                               + "; ".join(found))
        return True
    if _backend.requested_backend() in ("torch", "triton") or not (
            x.is_cuda and weight_tensor.is_cuda):
        return False
    return _backend.extension_has_cuda() and not reasons()


def gemv_kernel_inputs(x: Tensor, dv: Tensor | None, idx: Tensor | None,
                       row_ptr: Tensor | None, bias: Tensor | None, out_features: int,
                       in_features: int) -> tuple[Tensor, Tensor | None, Tensor | None,
                                                  Tensor | None, Tensor | None]:
    """(x, dv, idx, row_ptr, bias) as both compiled GEMVs take them: x [T, in] with contiguous,
    16-byte aligned rows (copied if not), int32 row pointers (computed if not given), fp32
    instead of fp64 deltas, everything contiguous; dv, idx and row_ptr None without deltas."""
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        x = x.contiguous() if not x.is_contiguous() else x.clone()
    if dv is not None and idx is not None and idx.numel() > 0:
        if row_ptr is None:
            row_ptr = nf4_row_pointers(idx, out_features, in_features)
        row_ptr = row_ptr.to(torch.int32).contiguous()
        dv = (dv.float() if dv.dtype == torch.float64 else dv).contiguous()
        idx = idx.contiguous()
    else:
        dv = idx = row_ptr = None
    return x, dv, idx, row_ptr, None if bias is None else bias.contiguous()


def _cuda_gemv_reasons(x: Tensor, packed: Tensor, in_features: int) -> list[str]:
    """Why the compiled kernel (`spft._C.nf4_gemv`) cannot serve x [T, in]; empty if it can."""
    reasons = gemv_input_reasons(x, packed.numel() * 2, in_features)
    if in_features % 32:
        reasons.append(f"in_features={in_features} is not a multiple of 32")
    if packed.data_ptr() % 16:
        reasons.append("the packed weight is not 16-byte aligned")
    return reasons


def _cuda_gemv_serves(x: Tensor, packed: Tensor, in_features: int) -> bool:
    """Whether the compiled kernel serves x [T, in] (never raises)."""
    if _backend.requested_backend() in ("torch", "triton") or not x.is_cuda:
        return False
    return _backend.extension_has_cuda() and not _cuda_gemv_reasons(x, packed, in_features)


def _use_cuda_gemv(x: Tensor, packed: Tensor, in_features: int) -> bool:
    """`_cuda_gemv_serves`, except that `SPFT_BACKEND=cuda` raises, naming why, when it cannot."""
    return use_compiled_gemv(x, packed, lambda: _cuda_gemv_reasons(x, packed, in_features), "")


def _cuda_gemv(x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Tensor | None,
               code2: Tensor | None, offset: Tensor | None, code: Tensor, dv: Tensor | None,
               idx: Tensor | None, row_ptr: Tensor | None, bias: Tensor | None, blocksize: int,
               out_features: int, in_features: int) -> Tensor:
    x, dv, idx, row_ptr, bias = gemv_kernel_inputs(x, dv, idx, row_ptr, bias, out_features,
                                                   in_features)
    return _backend.extension().nf4_gemv(x, packed, absmax, absmax2, code2, offset, code, dv,
                                         idx, row_ptr, bias, blocksize, out_features)


def _small_batch_impl(x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Tensor | None,
                      code2: Tensor | None, offset: Tensor | None, code: Tensor,
                      dv: Tensor | None, idx: Tensor | None, row_ptr: Tensor | None,
                      bias: Tensor | None, blocksize: int, out_features: int,
                      in_features: int) -> Tensor:
    x2 = x.reshape(-1, in_features)
    if _use_cuda_gemv(x2, packed, in_features):
        y = _cuda_gemv(x2, packed, absmax, absmax2, code2, offset, code, dv, idx, row_ptr, bias,
                       blocksize, out_features, in_features)
    elif _small_batch_ok(x2, packed, in_features, blocksize) and x2.stride(1) == 1:
        from sparse_kernels.nf4 import gemv_4bit
        y = gemv_4bit(x2, packed, absmax, code, blocksize, out_features, absmax2=absmax2,
                      code2=code2, offset=offset, dv=dv, idx=idx, row_ptr=row_ptr, bias=bias)
    else:
        if dv is None or idx is None:
            dv = x.new_zeros(0, dtype=torch.float32)
            idx = x.new_zeros(0, dtype=torch.int64)
        w = _dequantize_scatter_impl(packed, absmax, absmax2, code2, offset, code, dv, idx,
                                     blocksize, out_features, in_features, x.dtype)
        y = F.linear(x2, w, bias)
    return y.view(*x.shape[:-1], out_features)


_small_batch = torch.library.custom_op("spft::nf4_linear_small_batch", mutates_args=())(
    _small_batch_impl)


@_small_batch.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, dv, idx, row_ptr, bias, blocksize,
      out_features, in_features) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("spft::sparse_delta_linear_nf4", mutates_args=())
def _linear_nf4(x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Tensor | None,
                code2: Tensor | None, offset: Tensor | None, code: Tensor, dv: Tensor,
                idx: Tensor, bias: Tensor | None, blocksize: int, out_features: int,
                in_features: int) -> Tensor:
    # Materialise + GEMM for every token count: on the H100 the fused small-batch kernel is
    # still slower than this (benchmarks/RESULTS.md), so it is only used when asked for.
    w = _dequantize_scatter_impl(packed, absmax, absmax2, code2, offset, code, dv, idx,
                                 blocksize, out_features, in_features, x.dtype)
    return F.linear(x, w, bias)


@_linear_nf4.register_fake
def _(x, packed, absmax, absmax2, code2, offset, code, dv, idx, bias, blocksize, out_features,
      in_features) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output) -> None:
    (x, packed, absmax, absmax2, code2, offset, code, dv, idx, _bias, blocksize, out_features,
     in_features) = inputs
    # x only for the dv gradient; the 4-bit tensors and the deltas to re-materialise for dx.
    ctx.save_for_backward(x if ctx.needs_input_grad[7] else None, packed, absmax, absmax2, code2,
                          offset, code, dv, idx)
    ctx.meta = (blocksize, out_features, in_features, x.shape)


def _backward_with(ctx, dy: Tensor, dequantize_scatter, grad_fn) -> tuple:
    x, packed, absmax, absmax2, code2, offset, code, dv, idx = ctx.saved_tensors
    blocksize, out_features, in_features, x_shape = ctx.meta
    dy2 = dy.reshape(-1, out_features)
    dx = ddv = dbias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_scatter(packed, absmax, absmax2, code2, offset, code, dv, idx, blocksize,
                               out_features, in_features, dy.dtype)
        dx = (dy2 @ w).view(x_shape)
    if ctx.needs_input_grad[7]:
        x2 = x.reshape(-1, in_features)
        ddv = grad_fn(dy2, x2, idx, in_features, "auto").to(dv.dtype)
    if ctx.needs_input_grad[9]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy2.sum(0, dtype=acc).to(dy.dtype)
    return dx, None, None, None, None, None, None, ddv, None, dbias, None, None, None


def _backward(ctx, dy: Tensor) -> tuple:
    return _backward_with(ctx, dy, _dequantize_scatter, torch.ops.spft.sparse_delta_grad)


_linear_nf4.register_autograd(_backward, setup_context=_setup_context)


class _EagerLinearNF4(torch.autograd.Function):
    """The registered op's forward and backward without its per-call dispatch (see
    spft.ops.sparse_delta: the dispatch would dominate the host time of a training step)."""

    @staticmethod
    def forward(ctx, *inputs):
        (x, packed, absmax, absmax2, code2, offset, code, dv, idx, bias, blocksize, out_features,
         in_features) = inputs
        w, starts = _materialise(packed, absmax, absmax2, code2, offset, code, dv, idx,
                                 blocksize, out_features, in_features, x.dtype)
        y = F.linear(x, w, bias)
        _setup_context(ctx, inputs, y)
        # The backward materialises the same weight again: it reuses the delta ranges (an
        # intermediate, [programs + 1] int64, so a ctx attribute rather than a saved tensor).
        ctx.starts = starts
        return y

    @staticmethod
    def backward(ctx, dy):
        from spft.ops.sparse_delta import _grad_impl

        def materialise(*args):  # _dequantize_scatter_impl's arguments
            *head, dtype = args
            starts = ctx.starts if dtype in (torch.bfloat16, torch.float16) else None
            return _materialise(*head, dtype, starts)[0]

        return _backward_with(ctx, dy, materialise, _grad_impl)


# --------------------------------------------------------------------------- public surface
def nf4_quantize(w: Tensor, blocksize: int = 64, double_quant: bool = False,
                 quant_type: str = "nf4") -> NF4Weight:
    """Quantise `w` (any shape, bf16/fp16/fp32, read row-major) to 4 bits, bnb-compatibly.

    double_quant: also quantise the absmax to 8 bits (bnb's `compress_statistics=True`).
    quant_type: "nf4" (default) or "fp4". The packed codes and the fp32 absmax are byte-equal to
    `bitsandbytes.functional.quantize_4bit` with the same settings.
    """
    require_tensor("w", w)
    require_dtype("w", w, _COMPUTE_DTYPES)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    packed, absmax = torch.ops.spft.nf4_quantize(w.detach(), blocksize, quant_type)
    code = reference.code_table(quant_type, w.device)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize, quant_type, code)
    qabs, absmax2, code2, offset = reference.double_quantize(absmax)
    return NF4Weight(packed, qabs, w.shape, w.dtype, blocksize, quant_type, code, absmax2,
                     code2, offset)


def nf4_dequantize(q: NF4Weight | object, dtype: torch.dtype | None = None) -> Tensor:
    """The dequantised weight, shaped like the original, in `dtype` (default: q.dtype).

    Values are `round(code[q] * absmax)` — equal to bnb's `dequantize_4bit` bit for bit."""
    q = as_nf4_weight(q)
    dtype = dtype or q.dtype
    args = (*q.tensors(), q.blocksize, q.numel, dtype)
    if torch.compiler.is_compiling():
        flat = torch.ops.spft.nf4_dequantize(*args)
    else:  # eager: the body directly (the op's dispatch costs more host time than the kernel)
        flat = _dequantize_impl(*args)
    return flat.view(q.shape)


def _check_2d(q: NF4Weight | NF4GemvWeight) -> tuple[int, int]:
    if len(q.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out, in], got shape {tuple(q.shape)}")
    return q.shape[0], q.shape[1]


def _prepare_deltas(q: NF4Weight | NF4GemvWeight, dv: Tensor, idx: Tensor, check_indices: bool
                    ) -> tuple[Tensor, Tensor]:
    require_tensor("dv", dv)
    require_tensor("idx", idx)
    if dv.dim() != 1 or idx.dim() != 1 or dv.shape != idx.shape:
        raise ValueError(f"dv and idx must be 1-D of equal length, got dv {tuple(dv.shape)} and "
                         f"idx {tuple(idx.shape)}")
    require_dtype("dv", dv, (torch.float32, torch.bfloat16, torch.float16, torch.float64))
    if dv.device != q.device or idx.device != q.device:
        raise ValueError(f"dv and idx must be on the weight's device {q.device}")
    if check_indices:
        is_sorted, _ = check_flat_indices(idx, q.numel)
        if not is_sorted:
            order = torch.argsort(idx)
            idx, dv = idx[order], dv[order]
    return dv, idx


def nf4_dequantize_scatter(q: NF4Weight | object, dv: Tensor, idx: Tensor,
                           dtype: torch.dtype | None = None, check_indices: bool = True
                           ) -> Tensor:
    """`W + scatter(dv, idx)` [out, in] in `dtype`: W'[i] = round(float(W[i]) + dv[i]).

    One pass over the packed weight (0.5 B/element read, one 16-bit write). idx: [k] unique flat
    row-major int32/int64 indices (sorted here if needed), dv: [k] float.
    """
    q = as_nf4_weight(q)
    out_features, in_features = _check_2d(q)
    dv, idx = _prepare_deltas(q, dv, idx, check_indices)
    args = (*q.tensors(), dv, idx, q.blocksize, out_features, in_features, dtype or q.dtype)
    if torch.compiler.is_compiling():
        return torch.ops.spft.nf4_dequantize_scatter(*args)
    return _dequantize_scatter_impl(*args)


def _validate_x(x: Tensor, q: NF4Weight | NF4GemvWeight, bias: Tensor | None) -> None:
    require_tensor("x", x)
    allowed = (*_COMPUTE_DTYPES, torch.float64)
    require_dtype("x", x, allowed)
    if x.dim() < 1 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"x must end in in_features={q.shape[1]}, got shape {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device} but the weight on {q.device}")
    if bias is not None:
        require_tensor("bias", bias)
        if bias.shape != (q.shape[0],):
            raise ValueError(f"bias must have shape ({q.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")


def sparse_delta_linear_nf4(x: Tensor, weight: NF4Weight | object, dv: Tensor, idx: Tensor,
                            bias: Tensor | None = None, *, check_indices: bool = True) -> Tensor:
    """`y = x @ (W + scatter(dv, idx))ᵀ + bias` with W a frozen 4-bit weight (qSpIEL).

    Args:
        x: [..., in] bf16/fp16/fp32 (fp64 on the torch backend); the compute dtype.
        weight: an `NF4Weight` or a quantised bnb `Params4bit` [out, in].
        dv: [k] trainable deltas (fp32 or x's dtype); idx: [k] unique flat int32/int64 indices.
        bias: optional [out] in x's dtype.
    Returns [..., out] in x's dtype; differentiable in x, dv and bias (fp32 accumulation).
    In eager mode, a call that needs no gradient with at most 16 tokens on CUDA goes to the
    compiled small-batch kernel when `spft._C` is built (it reads the 4-bit weight once instead
    of materialising it; benchmarks/RESULTS.md).
    """
    q = as_nf4_weight(weight)
    out_features, in_features = _check_2d(q)
    _validate_x(x, q, bias)
    dv, idx = _prepare_deltas(q, dv, idx, check_indices)
    args = (x, *q.tensors(), dv, idx, bias, q.blocksize, out_features, in_features)
    if torch.compiler.is_compiling():
        return torch.ops.spft.sparse_delta_linear_nf4(*args)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dv, bias))
    if not needs_grad and _cuda_gemv_serves(x.reshape(-1, in_features), q.packed, in_features):
        return _small_batch_impl(x, *q.tensors(), dv, idx, None, bias, q.blocksize,
                                 out_features, in_features)
    return _EagerLinearNF4.apply(*args)


def nf4_row_pointers(idx: Tensor, out_features: int, in_features: int) -> Tensor:
    """CSR row pointer [out + 1] (int32) of sorted flat `idx`: `searchsorted(idx, r · in)`."""
    starts = torch.arange(out_features + 1, device=idx.device, dtype=torch.int64) * in_features
    return torch.searchsorted(idx, starts.to(idx.dtype), out_int32=True)


def nf4_linear_small_batch(x: Tensor, weight: NF4Weight | NF4GemvWeight | object,
                           dv: Tensor | None = None, idx: Tensor | None = None,
                           bias: Tensor | None = None, *, row_ptr: Tensor | None = None,
                           check_indices: bool = True) -> Tensor:
    """Inference `y = x @ (W + scatter(dv, idx))ᵀ + bias` for a few tokens on a 4-bit base,
    with the sparse adapter kept unmerged (no 16-bit weight is materialised on CUDA).

    x: [..., in] with at most 16 tokens for the fused kernel (more fall back to materialise +
    GEMM). weight: an `NF4Weight`, a bnb `Params4bit`, or an `NF4GemvWeight` (`nf4_gemv_pack`;
    served by `spft._C.nf4_gemv_tiled` on CUDA). row_ptr: optional cached
    `nf4_row_pointers(idx, out, in)` for a fixed adapter.
    Not differentiable (use `sparse_delta_linear_nf4` for training).
    """
    from spft.ops.nf4_gemv import NF4GemvWeight, gemv_tiled_linear  # imports this module
    tiled = isinstance(weight, NF4GemvWeight)
    q = weight if tiled else as_nf4_weight(weight)
    out_features, in_features = _check_2d(q)
    _validate_x(x, q, bias)
    if (dv is None) != (idx is None):
        raise ValueError("dv and idx must be given together")
    if dv is not None:
        dv, idx = _prepare_deltas(q, dv, idx, check_indices)
    if row_ptr is not None:
        require_dtype("row_ptr", row_ptr, (torch.int32, torch.int64))
        if row_ptr.shape != (out_features + 1,):
            raise ValueError(f"row_ptr must have shape ({out_features + 1},), got "
                             f"{tuple(row_ptr.shape)}")
    if tiled:
        return gemv_tiled_linear(x, q, dv, idx, row_ptr, bias)
    if torch.compiler.is_compiling():
        return torch.ops.spft.nf4_linear_small_batch(x, *q.tensors(), dv, idx, row_ptr, bias,
                                                     q.blocksize, out_features, in_features)
    # Eager: call the body directly. The registered op's dispatch costs more CPU time than the
    # kernel takes on the GPU at 1-16 tokens; the op carries no autograd to skip.
    return _small_batch_impl(x, *q.tensors(), dv, idx, row_ptr, bias, q.blocksize,
                             out_features, in_features)
