"""4-bit (NF4/FP4) blockwise quantisation kernels in the bitsandbytes format.

* `quantize_4bit(w, blocksize, code_mids, code_order)`: per block of `blocksize` flat
  elements, the fp32 absmax and the nearest-code index of every element, packed two per byte
  (even element in the high nibble). The arithmetic is bnb's exactly: full blocks scale by
  `x * (1 / absmax)`, the short tail block by `x / absmax` (absmax clamped to ≥ 1e-38), both with
  IEEE round-to-nearest divisions; ties at a code midpoint go to the lower code.
* `dequantize_4bit(...)`: `code[q] * absmax` in fp32, one rounding to the output dtype. With
  `dv`/`idx` it also scatter-adds the sparse deltas in the same pass,
  `W'[i] = round(float(W[i]) + dv[i])`: reads 0.5 B/element of codes (plus the absmax), writes
  the 16-bit weight once. Double-quantised absmax (`code2[q] * absmax2[b // 256] + offset`)
  is decoded in registers.
* `gemv_4bit(x, ...)`: `y = x @ (W + scatter(dv, idx))ᵀ (+ bias)` for a few tokens (T ≤ 16):
  reads the packed weight once, dequantises tiles in registers, multiplies, then adds the
  sparse deltas of its rows from a CSR row pointer without merging them into W. Needs
  in_features even and a multiple of the blocksize. Up to 4 tokens reduce on CUDA cores;
  5–16 tokens use the tensor cores with the tokens padded to 16.

All kernels run with `enable_fp_fusion=False` so that products and sums round exactly as the
reference does (no fused multiply-add). Flat offsets are int64. `idx` must be sorted and unique
(not checked here; `spft.ops` does); out-of-range indices are masked.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256
GEMV_MAX_TOKENS = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _round_to(x, dtype: tl.constexpr, MANUAL_RNE: tl.constexpr):
    """fp32 → dtype with round-to-nearest-even (the interpreter truncates bf16 otherwise)."""
    if MANUAL_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _load_absmax(blk, mask, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                 DOUBLE_QUANT: tl.constexpr, BS2: tl.constexpr):
    """fp32 absmax of 4-bit blocks `blk` (any shape), decoding the 8-bit form if needed."""
    if DOUBLE_QUANT:
        q = tl.load(qabs_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BS2, mask=mask, other=0.0)
        c2 = tl.load(code2_ptr + q, mask=mask, other=0.0)
        return c2 * a2 + tl.load(offset_ptr)  # two roundings: fp fusion is off
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


# --------------------------------------------------------------------------- quantize
@triton.jit
def _quantize_4bit_kernel(
    w_ptr, packed_ptr, absmax_ptr, mids_ptr, order_ptr, numel, n_blocks, n_full_blocks,
    BS: tl.constexpr, NB: tl.constexpr,
):
    blk = tl.program_id(0) * NB + tl.arange(0, NB)
    offs = blk[:, None].to(tl.int64) * BS + tl.arange(0, BS)[None, :]
    x = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    safe = tl.maximum(amax, tl.full((NB,), 1e-38, tl.float32))  # an fp32 (denormal) floor
    inv = tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), safe)
    tail = (blk >= n_full_blocks)[:, None]
    scaled = tl.where(tail, tl.math.div_rn(x, safe[:, None]), x * inv[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    q = tl.zeros((NB, BS), dtype=tl.int32)
    for m in tl.static_range(15):
        q += (scaled > tl.load(mids_ptr + m)).to(tl.int32)
    q = tl.load(order_ptr + q).to(tl.int32)
    hi, lo = tl.split(tl.reshape(q, (NB, BS // 2, 2)))
    byte = ((hi << 4) | lo).to(tl.uint8)
    boffs = blk[:, None].to(tl.int64) * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + boffs, byte, mask=boffs < (numel + 1) // 2)
    tl.store(absmax_ptr + blk, tl.where(blk >= n_full_blocks, safe, amax), mask=blk < n_blocks)


# --------------------------------------------------------------------------- dequantize
@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
    dv_ptr, idx_ptr, bounds_ptr, numel, n_blocks,
    BS: tl.constexpr, NB: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_DELTA: tl.constexpr, MANUAL_RNE: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * NB + tl.arange(0, NB)
    am = _load_absmax(blk, blk < n_blocks, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr,
                      offset_ptr, DOUBLE_QUANT, BS2)
    offs = blk[:, None].to(tl.int64) * BS + tl.arange(0, BS)[None, :]
    in_range = offs < numel
    # Each byte is loaded by the two elements it holds (the second load hits L1). A join +
    # reshape of high/low nibbles instead miscompiles on Triton 3.6 (misaligned shared-memory
    # read at BS=256, found by compute-sanitizer on the H100).
    b = tl.load(packed_ptr + offs // 2, mask=in_range, other=0).to(tl.int32)
    codes = tl.where(offs % 2 == 0, b >> 4, b & 0xF)
    v = tl.load(code_ptr + codes) * am[:, None]
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs, _round_to(v, out_ty, MANUAL_RNE), mask=in_range)
    if HAS_DELTA:
        lo = tl.load(bounds_ptr + pid)
        hi = tl.load(bounds_ptr + pid + 1)
        # The deltas overwrite elements other threads of this program just stored.
        tl.debug_barrier()
        for start in range(lo, hi, CHUNK):
            j = start + tl.arange(0, CHUNK)
            active = j < hi
            i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
            active = active & (i >= 0) & (i < numel)
            byte = tl.load(packed_ptr + i // 2, mask=active, other=0).to(tl.int32)
            nib = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)
            a = _load_absmax(i // BS, active, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr,
                             offset_ptr, DOUBLE_QUANT, BS2)
            base = _round_to(tl.load(code_ptr + nib) * a, out_ty, MANUAL_RNE).to(tl.float32)
            d = tl.load(dv_ptr + j, mask=active, other=0.0).to(tl.float32)
            tl.store(out_ptr + i, _round_to(base + d, out_ty, MANUAL_RNE), mask=active)


# --------------------------------------------------------------------------- small-batch GEMV
@triton.jit
def _gemv_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    dv_ptr, idx_ptr, row_ptr, bias_ptr, y_ptr,
    T, N, K, stride_xt, stride_yt,
    BS: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_DOT: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, TP: tl.constexpr, CH: tl.constexpr,
):
    # Absmax groups inside one K tile: NA groups of SUB bytes (NA = 1 when BS ≥ BK).
    NA: tl.constexpr = BK // BS if BK > BS else 1
    SUB: tl.constexpr = BK // 2 // NA
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    n_ok = rn < N
    rj = tl.arange(0, BK // 2)
    rk = tl.arange(0, BK)
    rt = tl.arange(0, TP)
    t_ok = rt < T
    kb = K // BS  # blocks per row (K is a multiple of BS)
    acc = tl.zeros((BN, TP), dtype=tl.float32)
    row_bytes = rn.to(tl.int64) * (K // 2)
    x_ty: tl.constexpr = x_ptr.dtype.element_ty
    for k0 in range(0, K, BK):
        b = tl.load(packed_ptr + row_bytes[:, None] + (k0 // 2 + rj)[None, :],
                    mask=n_ok[:, None] & ((k0 + 2 * rj) < K)[None, :], other=0).to(tl.int32)
        ka = k0 + tl.arange(0, NA) * (BK // NA)
        blk = rn[:, None] * kb + ka[None, :] // BS
        am = _load_absmax(blk, n_ok[:, None] & (ka < K)[None, :], absmax_ptr, qabs_ptr,
                          absmax2_ptr, code2_ptr, offset_ptr, DOUBLE_QUANT, BS2)
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (BN, NA, SUB)), (BN, BK // 2))
        # Round to x's dtype like the dequantised weight would be.
        w_hi = (tl.load(code_ptr + (b >> 4)) * am).to(x_ty)
        w_lo = (tl.load(code_ptr + (b & 0xF)) * am).to(x_ty)
        # x rows are read contiguously, then split into even / odd columns.
        xk = tl.load(x_ptr + rt[:, None] * stride_xt + (k0 + rk)[None, :],
                     mask=t_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(xk, (TP, BK // 2, 2)))
        if USE_DOT:
            if UPCAST_DOT:
                acc = tl.dot(w_hi.to(tl.float32), tl.trans(x_even.to(tl.float32)), acc)
                acc = tl.dot(w_lo.to(tl.float32), tl.trans(x_odd.to(tl.float32)), acc)
            else:
                acc = tl.dot(w_hi, tl.trans(x_even), acc)
                acc = tl.dot(w_lo, tl.trans(x_odd), acc)
        else:
            prod = w_hi.to(tl.float32)[:, None, :] * x_even.to(tl.float32)[None, :, :]
            prod += w_lo.to(tl.float32)[:, None, :] * x_odd.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)
    if HAS_DELTA:
        n0 = pid * BN
        lo = tl.load(row_ptr + n0)
        hi = tl.load(row_ptr + tl.minimum(n0 + BN, N))
        for start in range(lo, hi, CH):
            j = start + tl.arange(0, CH)
            active = j < hi
            i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
            r = (i // K - n0).to(tl.int32)
            c = i % K
            d = tl.load(dv_ptr + j, mask=active, other=0.0).to(tl.float32)
            xg = tl.load(x_ptr + rt[:, None] * stride_xt + c[None, :],
                         mask=t_ok[:, None] & active[None, :], other=0.0)
            sel = tl.where(tl.arange(0, BN)[:, None] == r[None, :], d[None, :], 0.0)
            if USE_DOT:
                if UPCAST_DOT:
                    acc = tl.dot(sel, tl.trans(xg.to(tl.float32)), acc)
                else:
                    acc = tl.dot(sel.to(x_ty), tl.trans(xg), acc)
            else:
                acc += tl.sum(sel[:, None, :] * xg.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rt[None, :] * stride_yt + rn[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & t_ok[None, :])


_GEMV_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in ((16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3),
                         (16, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3), (8, 256, 4, 4))
]
_gemv_4bit_kernel_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "BS", "TP"])(
    _gemv_4bit_kernel)


def _token_pad(tokens: int) -> tuple[int, bool]:
    """(padded token count, use tensor cores): CUDA-core reduction for ≤ 4 tokens."""
    if tokens <= 4:
        return max(2, triton.next_power_of_2(tokens)), False
    return 16, True


# --------------------------------------------------------------------------- launchers
def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _absmax_args(absmax: torch.Tensor, absmax2: torch.Tensor | None,
                 code2: torch.Tensor | None, offset: torch.Tensor | None):
    """(absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, double_quant)."""
    if absmax.dtype == torch.uint8:
        if absmax2 is None or code2 is None or offset is None:
            raise ValueError("a uint8 (double-quantised) absmax needs absmax2, code2 and offset")
        return absmax, absmax, absmax2, code2, offset, True
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 or uint8, got {absmax.dtype}")
    return absmax, absmax, absmax, absmax, absmax, False


def _program_blocks(blocksize: int, elems: int) -> int:
    return max(1, elems // blocksize)


def quantize_4bit(w: torch.Tensor, blocksize: int, mids: torch.Tensor, order: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w: contiguous bf16/fp16/fp32 (any shape, read flat); mids [15] fp32 sorted code
    midpoints; order [16] uint8 sorted position → code index. Returns (packed
    [ceil(numel/2)] uint8, absmax [ceil(numel/blocksize)] fp32)."""
    _check_blocksize(blocksize)
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"w dtype must be one of {SUPPORTED_DTYPES}, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous")
    numel = w.numel()
    n_blocks = triton.cdiv(numel, blocksize)
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    if numel == 0:
        return packed, absmax
    nb = _program_blocks(blocksize, 2048)
    _quantize_4bit_kernel[(triton.cdiv(n_blocks, nb),)](
        w, packed, absmax, mids, order, numel, n_blocks, numel // blocksize,
        BS=blocksize, NB=nb, num_warps=4, enable_fp_fusion=False,
    )
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, numel: int, dtype: torch.dtype, *,
                    absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                    offset: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                    idx: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    elems_per_program: int = 8192, num_warps: int = 8) -> torch.Tensor:
    """Flat [numel] `dtype` weight `code[q] * absmax` (+ scatter(dv, idx) when given).

    packed: [ceil(numel/2)] uint8 contiguous; absmax: [n_blocks] fp32, or uint8 with absmax2
    [ceil(n_blocks/256)] fp32, code2 [256] fp32 and offset 0-dim fp32 (double quant); code [16]
    fp32. dv [k] float and idx [k] int32/int64 sorted unique flat indices. `out` ([numel]
    contiguous `dtype`) may be passed to reuse a buffer.
    """
    _check_blocksize(blocksize)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError("packed must be a contiguous uint8 tensor")
    amax_args = _absmax_args(absmax, absmax2, code2, offset)
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=packed.device)
    elif out.shape != (numel,) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{numel}] {dtype} tensor")
    if numel == 0:
        return out
    n_blocks = triton.cdiv(numel, blocksize)
    nb = _program_blocks(blocksize, elems_per_program)
    n_prog = triton.cdiv(n_blocks, nb)
    has_delta = dv is not None and idx is not None and idx.numel() > 0
    if has_delta:
        span = nb * blocksize
        starts = torch.arange(0, n_prog + 1, device=idx.device, dtype=torch.int64) * span
        starts = starts.clamp_(max=numel).to(idx.dtype)
        bounds = torch.searchsorted(idx, starts, out_int32=True)
    else:
        dv = idx = bounds = out  # unused placeholders
    _dequantize_4bit_kernel[(n_prog,)](
        packed, *amax_args[:5], code, out, dv, idx, bounds, numel, n_blocks,
        BS=blocksize, NB=nb, BS2=ABSMAX_BLOCKSIZE, DOUBLE_QUANT=amax_args[5],
        HAS_DELTA=has_delta, MANUAL_RNE=interpreting(), CHUNK=128,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def gemv_supported(x: torch.Tensor, in_features: int, blocksize: int) -> bool:
    """Whether `gemv_4bit` can serve x [T, in]: T ≤ 16, in even and a multiple of blocksize."""
    tokens = x.numel() // max(in_features, 1)
    return (0 < tokens <= GEMV_MAX_TOKENS and in_features % 2 == 0
            and in_features % blocksize == 0 and x.dtype in SUPPORTED_DTYPES)


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
              blocksize: int, out_features: int, *, absmax2: torch.Tensor | None = None,
              code2: torch.Tensor | None = None, offset: torch.Tensor | None = None,
              dv: torch.Tensor | None = None, idx: torch.Tensor | None = None,
              row_ptr: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              config: dict | None = None) -> torch.Tensor:
    """y [T, out] = x [T, in] @ (W + scatter(dv, idx))ᵀ + bias, T ≤ 16, x's dtype.

    x: rows contiguous (stride(1) == 1); W packed row-major like `dequantize_4bit`; in even and a
    multiple of blocksize. row_ptr [out + 1] int32/int64: `searchsorted(idx, r · in)` for
    r = 0 … out (computed here when None; cache it when serving a fixed adapter).
    `config` ({"BN", "BK", "num_warps", "num_stages"}) skips the autotuner.
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be 2-D [T, in] with contiguous rows")
    T, K = x.shape
    if not gemv_supported(x, K, blocksize):
        raise ValueError(f"gemv_4bit needs 1 ≤ T ≤ {GEMV_MAX_TOKENS} and in_features even and a "
                         f"multiple of blocksize {blocksize}; got x {tuple(x.shape)}")
    amax_args = _absmax_args(absmax, absmax2, code2, offset)
    y = torch.empty((T, out_features), dtype=x.dtype, device=x.device)
    has_delta = dv is not None and idx is not None and idx.numel() > 0
    if has_delta and row_ptr is None:
        starts = torch.arange(0, out_features + 1, device=idx.device, dtype=torch.int64) * K
        row_ptr = torch.searchsorted(idx, starts.to(idx.dtype), out_int32=True)
    if not has_delta:
        dv = idx = row_ptr = y
    args = (x, packed, *amax_args[:5], code, dv, idx, row_ptr,
            bias if bias is not None else y, y, T, out_features, K, x.stride(0), y.stride(0))
    tp, use_dot = _token_pad(T)
    meta = dict(BS=blocksize, BS2=ABSMAX_BLOCKSIZE, DOUBLE_QUANT=amax_args[5],
                HAS_DELTA=has_delta, HAS_BIAS=bias is not None,
                UPCAST_DOT=interpreting() and x.dtype != torch.float32, USE_DOT=use_dot,
                TP=tp, CH=32)
    if config is None and interpreting():
        config = {"BN": 16, "BK": 64, "num_warps": 4, "num_stages": 1}
    if config is not None:
        cfg = dict(config)
        grid = (triton.cdiv(out_features, cfg["BN"]),)
        _gemv_4bit_kernel[grid](*args, **meta, BN=cfg["BN"], BK=cfg["BK"],
                                num_warps=cfg.get("num_warps", 4),
                                num_stages=cfg.get("num_stages", 3), enable_fp_fusion=False)
    else:
        def grid(meta):
            return (triton.cdiv(out_features, meta["BN"]),)
        _gemv_4bit_kernel_tuned[grid](*args, **meta, enable_fp_fusion=False)
    return y
