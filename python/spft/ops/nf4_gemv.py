"""A serving layout of a 4-bit weight for the compiled small-batch GEMV (`spft._C.nf4_gemv_tiled`).

`nf4_gemv_pack(q)` repacks an `NF4Weight` [N, K] once into `NF4GemvWeight`: the same 4-bit codes
in 16×64 tiles (`spft.reference.nf4.pack_gemv_tiles` states the layout bit by bit) with one fp32
absmax per 64 inputs of a row. `spft.ops.nf4_linear_small_batch` accepts it in place of the
`NF4Weight`; tensors the compiled kernel cannot serve take the dequantise + GEMM fallback here,
which gives the same values as the `NF4Weight` path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spft import _backend
from spft.ops._validation import require_tensor
from spft.ops.nf4 import (
    NF4Weight,
    as_nf4_weight,
    gemv_input_reasons,
    gemv_kernel_inputs,
    use_compiled_gemv,
)
from spft.reference import nf4 as reference

GROUP = reference.GEMV_GROUP
TILE_ROWS = reference.GEMV_TILE_ROWS


class NF4GemvWeight:
    """A 4-bit weight [N, K] in the tile-major GEMV serving layout, on one device.

    Attributes:
        codes: [ceil(N / 16), K // 64, 32, 16] uint8, the packed codes (see `pack_gemv_tiles`).
        absmax: [ceil(N / 16), K // 64, 8, 2] fp32, one absmax per row and group of 64 inputs.
        code: [16] fp32 code values (NF4 or FP4).
        shape: (N, K); dtype: the original weight's dtype (the default of `dequantize`).
        blocksize: the source weight's absmax block size; quant_type: "nf4" or "fp4".
    """

    __slots__ = ("absmax", "blocksize", "code", "codes", "dtype", "quant_type", "shape")

    def __init__(self, codes: Tensor, absmax: Tensor, code: Tensor, shape: tuple[int, int],
                 dtype: torch.dtype, blocksize: int, quant_type: str) -> None:
        self.codes = codes
        self.absmax = absmax
        self.code = code
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.quant_type = quant_type
        _validate(self)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.code))

    def to(self, device: torch.device | str) -> NF4GemvWeight:
        return NF4GemvWeight(self.codes.to(device), self.absmax.to(device), self.code.to(device),
                             self.shape, self.dtype, self.blocksize, self.quant_type)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """[N, K] `code[q] * absmax` in fp32, rounded once to `dtype` (default: self.dtype);
        equal bit for bit to `nf4_dequantize` of the source weight."""
        codes_nk, absmax_rg = reference.unpack_gemv_tiles(self.codes, self.absmax,
                                                          self.out_features)
        scale = absmax_rg.repeat_interleave(GROUP, dim=1)
        return (self.code.float()[codes_nk.long()] * scale).to(dtype or self.dtype)

    def __repr__(self) -> str:
        return (f"NF4GemvWeight(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"quant_type={self.quant_type!r}, blocksize={self.blocksize}, "
                f"device={self.device})")


def _validate(w: NF4GemvWeight) -> None:
    if len(w.shape) != 2:
        raise ValueError(f"shape must be (out_features, in_features), got {tuple(w.shape)}")
    n, k = w.shape
    if n < 1 or k < GROUP or k % GROUP:
        raise ValueError(f"shape {(n, k)} needs out_features >= 1 and in_features a positive "
                         f"multiple of {GROUP}")
    tiles, groups = -(-n // TILE_ROWS), k // GROUP
    for name, t, shape, dtype in (("codes", w.codes, (tiles, groups, 32, 16), torch.uint8),
                                  ("absmax", w.absmax, (tiles, groups, 8, 2), torch.float32),
                                  ("code", w.code, (16,), torch.float32)):
        require_tensor(name, t)
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} of shape {shape} for a weight of shape "
                             f"{(n, k)}, got {t.dtype} {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if len({w.codes.device, w.absmax.device, w.code.device}) > 1:
        raise ValueError("all tensors of an NF4GemvWeight must be on one device")


def _group_absmax(q: NF4Weight) -> Tensor:
    """[N, K // 64] fp32: the absmax of each run of 64 inputs of a row (inside one block)."""
    n, k = q.shape
    starts = torch.arange(n * (k // GROUP), device=q.device) * GROUP  # flat n·K + grp·64
    return q.absmax_fp32()[starts // q.blocksize].view(n, k // GROUP)


def nf4_gemv_pack(weight: NF4Weight | object) -> NF4GemvWeight:
    """Repack a 4-bit weight [N, K] into the GEMV serving layout (a one-time conversion).

    `weight`: anything `as_nf4_weight` accepts (an `NF4Weight` or a quantised bnb `Params4bit`),
    2-D with in_features a multiple of 64 and blocksize >= 64. Runs on the weight's device.

    The result holds the same 4-bit codes, 4 bits per weight, plus one fp32 absmax per 64
    weights (double quantisation is expanded, so 0.5 + 4/64 bytes per weight). The compiled
    small-batch kernel reads it with one 16-byte load per lane per 16×64 tile;
    `NF4GemvWeight.dequantize` and the CPU path of `nf4_linear_small_batch` give the same values
    as the source weight.
    """
    q = as_nf4_weight(weight)
    if len(q.shape) != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(q.shape)}")
    n, k = q.shape
    if k % GROUP:
        raise ValueError(f"weight: in_features={k} is not a multiple of {GROUP}")
    if q.blocksize < GROUP:
        raise ValueError(f"weight: blocksize={q.blocksize} < {GROUP} (an absmax block must "
                         f"cover each run of {GROUP} inputs)")
    codes_nk = reference.unpack_codes(q.packed, q.numel).view(n, k)
    codes, absmax = reference.pack_gemv_tiles(codes_nk, _group_absmax(q))
    return NF4GemvWeight(codes, absmax, q.code.float().contiguous(), (n, k), q.dtype,
                         q.blocksize, q.quant_type)


# --------------------------------------------------------------------------- the linear
def _cuda_reasons(x: Tensor, w: NF4GemvWeight) -> list[str]:
    """Why `spft._C.nf4_gemv_tiled` cannot serve x [T, in]; empty if it can (the extension
    itself is checked by the callers)."""
    reasons = gemv_input_reasons(x, w.numel, w.in_features)
    if not hasattr(_backend.extension(), "nf4_gemv_tiled"):
        reasons.insert(0, "spft._C has no nf4_gemv_tiled (rebuild the extension)")
    if w.codes.data_ptr() % 16:
        reasons.append("the packed codes are not 16-byte aligned")
    return reasons


def _use_cuda(x: Tensor, w: NF4GemvWeight) -> bool:
    """Whether the compiled kernel serves x [T, in]; `SPFT_BACKEND=cuda` raises, naming why,
    when it cannot."""
    return use_compiled_gemv(x, w.codes, lambda: _cuda_reasons(x, w), " on an NF4GemvWeight")


def _cuda_linear(x: Tensor, w: NF4GemvWeight, dv: Tensor | None, idx: Tensor | None,
                 row_ptr: Tensor | None, bias: Tensor | None) -> Tensor:
    x, dv, idx, row_ptr, bias = gemv_kernel_inputs(x, dv, idx, row_ptr, bias, w.out_features,
                                                   w.in_features)
    return _backend.extension().nf4_gemv_tiled(x, w.codes, w.absmax, w.code, dv, idx, row_ptr,
                                               bias, w.out_features)


def _fallback_linear(x: Tensor, w: NF4GemvWeight, dv: Tensor | None, idx: Tensor | None,
                     bias: Tensor | None) -> Tensor:
    weight = w.dequantize(x.dtype)
    if dv is not None and idx is not None:
        weight = reference.add_deltas(weight, dv, idx)  # the rounding of nf4_dequantize_scatter
    return F.linear(x, weight, bias)


def gemv_tiled_linear(x: Tensor, w: NF4GemvWeight, dv: Tensor | None, idx: Tensor | None,
                      row_ptr: Tensor | None, bias: Tensor | None) -> Tensor:
    """`nf4_linear_small_batch` on an `NF4GemvWeight`, arguments already validated there.

    x [..., in]; dv/idx [k] sorted unique flat indices (or None); row_ptr [out + 1] or None;
    bias [out] or None. Returns [..., out] in x's dtype.
    """
    x2 = x.reshape(-1, w.in_features)
    if _use_cuda(x2, w):
        y = _cuda_linear(x2, w, dv, idx, row_ptr, bias)
    else:
        y = _fallback_linear(x2, w, dv, idx, bias)
    return y.view(*x.shape[:-1], w.out_features)
