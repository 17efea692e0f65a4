"""4-bit (NF4/FP4) blockwise quantisation kernels in the bitsandbytes format.

* `quantize_4bit(w, blocksize, code_mids, code_order)`: per block of `blocksize` flat
  elements, the fp32 absmax and the nearest-code index of every element, packed two per byte
  (even element in the high nibble). The arithmetic is bnb's exactly: full blocks scale by
  `x * (1 / absmax)`, the short tail block by `x / absmax` (absmax clamped to ≥ 1e-38), both with
  IEEE round-to-nearest divisions; ties at a code midpoint go to the lower code.
* `dequantize_4bit(...)`: `code[q] * absmax` in fp32, one rounding to the output dtype; 16-bit
  outputs byte by byte, the two elements of a byte in one 32-bit store. Deltas,
  `W'[i] = round(float(W[i]) + dv[i])`: with a sorted idx each program adds those in its own
  elements right after writing them (their lines still in L2), its range of idx found by
  `program_starts` (one thread per delta); otherwise (unsorted idx, fp32 output) a second launch
  re-decodes each delta's element, one thread per delta. 0.5 B/element of codes (plus the
  absmax) read, the 16-bit weight written once, plus 8-12 B per delta. Double-quantised absmax
  (`code2[q] * absmax2[b // 256] + offset`) is decoded in registers.
* `gemv_4bit(x, ...)`: `y = x @ (W + scatter(dv, idx))ᵀ (+ bias)` for a few tokens (T ≤ 16):
  reads the packed weight once, decodes tiles in registers, multiplies, then adds the sparse
  deltas of its rows from a CSR row pointer without merging them into W. Needs in_features even
  and a multiple of the blocksize. Up to 4 tokens per program on CUDA cores ("cc"); 16-bit x
  with more than 4 tokens on the tensor cores ("mma", tokens padded to 16).

Quantise, dequantise and scatter run with `enable_fp_fusion=False` so that products and sums
round exactly as the reference does (no fused multiply-add); the GEMVs accumulate in fp32 and
match the reference to the output dtype's tolerance. Flat offsets are int64. `idx` must be
unique (the GEMV also needs it sorted; neither is checked here, `spft.ops` does);
out-of-range indices are masked.
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
SCATTER_BLOCK = 1024  # deltas per program of the scatter pass
FUSED_DELTA_BLOCK = 128  # deltas per step of a dequantise program's own delta loop


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
    numel, n_blocks,
    BS: tl.constexpr, NB: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    MANUAL_RNE: tl.constexpr,
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


@triton.jit
def _dequantize_4bit_pairs_kernel(
    packed_ptr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
    out_pairs_ptr, dv_ptr, idx_ptr, starts_ptr, numel, n_blocks,
    BS: tl.constexpr, NB: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    MANUAL_RNE: tl.constexpr, DELTAS: tl.constexpr, DBLOCK: tl.constexpr,
):
    """16-bit output, byte by byte: the two elements of byte j go out as one 32-bit word (the
    even element, high nibble, in the low half: little-endian), so codes are loaded once per
    byte and contiguously, and stores are whole words. out_pairs_ptr is out_ptr as int32
    ([numel // 2] words); an odd numel's last element goes through out_ptr.

    DELTAS: the program then adds the sorted deltas idx[starts[pid] : starts[pid + 1]] that
    fall in its elements, right after writing them: it reads back its own rounded values (still
    in L2, where a later scatter pass would re-read them from HBM) and writes round(w + dv).
    The first DBLOCK of them are loaded before the dense values, so that their latency hides
    behind the dense loads."""
    pid = tl.program_id(0)
    if DELTAS:
        first = pid.to(tl.int64) * NB * BS
        end = tl.minimum(first + NB * BS, numel)
        j0 = tl.load(starts_ptr + pid)
        j1 = tl.load(starts_ptr + pid + 1)
        j = j0 + tl.arange(0, DBLOCK)
        i_head = tl.load(idx_ptr + j, mask=j < j1, other=-1).to(tl.int64)
        dv_head = tl.load(dv_ptr + j, mask=j < j1, other=0.0).to(tl.float32)
    blk = pid * NB + tl.arange(0, NB)
    am = _load_absmax(blk, blk < n_blocks, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr,
                      offset_ptr, DOUBLE_QUANT, BS2)
    pairs = blk[:, None].to(tl.int64) * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    whole = pairs < numel // 2
    b = tl.load(packed_ptr + pairs, mask=whole, other=0).to(tl.int32)
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    even = _round_to(tl.load(code_ptr + (b >> 4)) * am[:, None], out_ty, MANUAL_RNE)
    odd = _round_to(tl.load(code_ptr + (b & 0xF)) * am[:, None], out_ty, MANUAL_RNE)
    word = (even.to(tl.uint16, bitcast=True).to(tl.uint32)
            | (odd.to(tl.uint16, bitcast=True).to(tl.uint32) << 16))
    tl.store(out_pairs_ptr + pairs, word.to(tl.int32, bitcast=True), mask=whole)
    if numel % 2 == 1:
        last = numel - 1
        if pid == (last // BS) // NB:
            byte = tl.load(packed_ptr + last // 2).to(tl.int32)
            a = tl.sum(tl.where(blk == last // BS, am, 0.0), axis=0)
            tl.store(out_ptr + last, _round_to(tl.load(code_ptr + (byte >> 4)) * a, out_ty,
                                               MANUAL_RNE))
    if DELTAS:
        tl.debug_barrier()  # the block's dense stores are visible to all its threads
        _add_to_written(i_head, dv_head, first, end, out_ptr, MANUAL_RNE)
        for js in range(j0 + DBLOCK, j1, DBLOCK):
            j = js + tl.arange(0, DBLOCK)
            i = tl.load(idx_ptr + j, mask=j < j1, other=-1).to(tl.int64)
            d = tl.load(dv_ptr + j, mask=j < j1, other=0.0).to(tl.float32)
            _add_to_written(i, d, first, end, out_ptr, MANUAL_RNE)


@triton.jit
def _add_to_written(i, d, first, end, out_ptr, MANUAL_RNE: tl.constexpr):
    """out[i] = round(out[i] + d) for the indices i in [first, end) (written by this program)."""
    ok = (i >= first) & (i < end)
    w = tl.load(out_ptr + i, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + i, _round_to(w + d, out_ptr.dtype.element_ty, MANUAL_RNE), mask=ok)


@triton.jit
def _program_starts_kernel(idx_ptr, starts_ptr, k, n_programs, ELEMS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """starts[p] = #(idx < p · ELEMS) for p in [0, n_programs] over a sorted idx [k], without a
    binary search per boundary (19 dependent loads at k = 450k): entry j owns the boundaries p
    with idx[j - 1] // ELEMS < p <= idx[j] // ELEMS (j = k owns those up to n_programs), and
    writes j there. Gaps between consecutive deltas' programs are short when deltas are dense
    enough to make the fused pass worth it; the launcher takes searchsorted otherwise."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = j <= k
    cur = tl.load(idx_ptr + j, mask=j < k, other=0).to(tl.int64) // ELEMS
    cur = tl.where(j < k, tl.minimum(cur, n_programs), n_programs)
    prev = tl.load(idx_ptr + j - 1, mask=(j > 0) & live, other=0).to(tl.int64) // ELEMS
    prev = tl.where(j > 0, tl.minimum(prev, n_programs), -1)
    gap = tl.where(live, cur - prev, 0)
    for step in range(0, tl.max(gap, axis=0)):
        p = prev + 1 + step
        tl.store(starts_ptr + p, j.to(starts_ptr.dtype.element_ty), mask=live & (step < gap))


@triton.jit
def _scatter_4bit_kernel(
    packed_ptr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
    dv_ptr, idx_ptr, k, numel,
    BS: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, MANUAL_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The scatter pass after a dense one, for any order of idx:
    out[idx[j]] = round(round(code[q] · absmax) + dv[j]), re-decoding the base value of each
    delta's element (cheaper than ordering against the dense pass), one thread per delta."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    active = j < k
    i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
    active = active & (i >= 0) & (i < numel)
    byte = tl.load(packed_ptr + i // 2, mask=active, other=0).to(tl.int32)
    nib = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)
    a = _load_absmax(i // BS, active, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr,
                     offset_ptr, DOUBLE_QUANT, BS2)
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    base = _round_to(tl.load(code_ptr + nib) * a, out_ty, MANUAL_RNE).to(tl.float32)
    d = tl.load(dv_ptr + j, mask=active, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, _round_to(base + d, out_ty, MANUAL_RNE), mask=active)


# --------------------------------------------------------------------------- small-batch GEMV
# Both kernels work in *byte space*: the high nibble of byte j (column 2j) pairs with x[2j] and
# the low nibble with x[2j + 1]. 16-bit x is read as int32 words holding (x[2j], x[2j+1]) and
# split with shifts. A K step covers G absmax groups of GS elements (GS = min(blocksize, 128),
# so a group never straddles two absmax blocks); few, wide K steps keep the chain of dependent
# loads per program short, which is what bounds a GEMV's latency at 1-16 tokens.
@triton.jit
def _x_pairs(xw_ptr, row_off, words, ok, t, T, X_KIND: tl.constexpr):
    """fp32 (x[2j], x[2j+1]) of token t at word positions `words` (zeros where not `ok` or
    t ≥ T). X_KIND 0: bf16 words, 1: fp16 words, 2: fp32 elements."""
    mask = ok & ((tl.zeros_like(words) + t) < T)  # `tensor & scalar` trips the interpreter
    if X_KIND == 2:
        even = tl.load(xw_ptr + row_off + 2 * words, mask=mask, other=0.0)
        odd = tl.load(xw_ptr + row_off + 2 * words + 1, mask=mask, other=0.0)
    else:
        w = tl.load(xw_ptr + row_off + words, mask=mask, other=0)  # x[2j] in the low half
        if X_KIND == 0:
            even = (w << 16).to(tl.float32, bitcast=True)
            odd = ((w >> 16) << 16).to(tl.float32, bitcast=True)
        else:
            even = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return even, odd


@triton.jit
def _cc_load_step(packed_ptr, row_bytes, blk_row, n_ok, k0, rg, rs, K, BS: tl.constexpr,
                  GS: tl.constexpr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                  DOUBLE_QUANT: tl.constexpr, BS2: tl.constexpr):
    """Packed bytes [BN, G, GS/2] (int32) and absmax [BN, G] of the K step starting at k0
    (zeros past K)."""
    kg = k0 + rg * GS
    g_ok = kg < K
    words = (kg // 2)[:, None] + rs[None, :]
    ok2 = g_ok[:, None] & (rs >= 0)[None, :]
    b = tl.load(packed_ptr + row_bytes[:, None, None] + words[None, :, :],
                mask=n_ok[:, None, None] & ok2[None, :, :], other=0).to(tl.int32)
    am = _load_absmax(blk_row[:, None] + (kg // BS)[None, :], n_ok[:, None] & g_ok[None, :],
                      absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, DOUBLE_QUANT,
                      BS2)
    return b, am


@triton.jit
def _cc_token_step(acc, w_hi, w_lo, am, xw_ptr, row_off, words, ok, t, T,
                   X_KIND: tl.constexpr):
    """acc [BN, G] += am · Σ_sub (w_hi · x_even + w_lo · x_odd) for token t."""
    xe, xo = _x_pairs(xw_ptr, row_off, words, ok, t, T, X_KIND)
    return acc + tl.sum(w_hi * xe[None, :, :] + w_lo * xo[None, :, :], axis=2) * am


@triton.jit
def _delta_token(acc_row, sel, d, x_ptr, t, T, stride_xt, c, active):
    """acc_row [BN] += Σ_j sel[:, j] · d[j] · x[t, c[j]]."""
    xg = tl.load(x_ptr + t * stride_xt + c, mask=active & ((tl.zeros_like(c) + t) < T),
                 other=0.0)
    return acc_row + tl.sum(tl.where(sel, (d * xg.to(tl.float32))[None, :], 0.0), axis=1)


@triton.jit
def _store_rows(acc_row, y_ptr, bias_ptr, t, T, rn, N, stride_yt, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc_row += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + rn, acc_row.to(y_ptr.dtype.element_ty),
             mask=(rn < N) & ((tl.zeros_like(rn) + t) < T))


@triton.jit
def _gemv_4bit_cc_kernel(
    x_ptr, xw_ptr, packed_ptr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    code_ptr, dv_ptr, idx_ptr, row_ptr, bias_ptr, y_ptr,
    T, N, K, stride_xt, stride_xw, stride_yt,
    BS: tl.constexpr, GS: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr, TG: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, CH: tl.constexpr,
):
    """CUDA-core GEMV: program (n-block, token group) reduces TG ≤ 4 tokens for BN rows. Each
    [BN, G, GS/2]-byte weight tile is decoded once (fp32 code values; the absmax is applied per
    group after the reduction) and shared by the group's tokens."""
    G: tl.constexpr = BK // GS
    SUB: tl.constexpr = GS // 2
    n0 = tl.program_id(0) * BN
    t0 = tl.program_id(1) * TG
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < N
    rg = tl.arange(0, G)
    rs = tl.arange(0, SUB)
    row_bytes = rn.to(tl.int64) * (K // 2)
    blk_row = rn * (K // BS)
    xw_row = t0 * stride_xw
    acc0 = tl.zeros((BN, G), dtype=tl.float32)
    acc1 = tl.zeros((BN, G), dtype=tl.float32)
    acc2 = tl.zeros((BN, G), dtype=tl.float32)
    acc3 = tl.zeros((BN, G), dtype=tl.float32)
    sub_ok = (rs < SUB)[None, :]
    # Registers double-buffer the packed bytes and absmax: step k + 1's loads are issued
    # before step k's decode, so HBM latency overlaps the arithmetic.
    b_next, am_next = _cc_load_step(packed_ptr, row_bytes, blk_row, n_ok, 0, rg, rs, K, BS, GS,
                                    absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                    DOUBLE_QUANT, BS2)
    for k0 in range(0, K, BK):
        b = b_next
        am = am_next
        b_next, am_next = _cc_load_step(packed_ptr, row_bytes, blk_row, n_ok, k0 + BK, rg, rs,
                                        K, BS, GS, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr,
                                        offset_ptr, DOUBLE_QUANT, BS2)
        kg = k0 + rg * GS
        words = (kg // 2)[:, None] + rs[None, :]  # [G, SUB] byte (= x word) positions
        ok2 = (kg < K)[:, None] & sub_ok
        w_hi = tl.load(code_ptr + (b >> 4))
        w_lo = tl.load(code_ptr + (b & 0xF))
        acc0 = _cc_token_step(acc0, w_hi, w_lo, am, xw_ptr, xw_row, words, ok2, t0, T, X_KIND)
        if TG > 1:
            acc1 = _cc_token_step(acc1, w_hi, w_lo, am, xw_ptr, xw_row + stride_xw, words, ok2,
                                  t0 + 1, T, X_KIND)
        if TG > 2:
            acc2 = _cc_token_step(acc2, w_hi, w_lo, am, xw_ptr, xw_row + 2 * stride_xw, words,
                                  ok2, t0 + 2, T, X_KIND)
        if TG > 3:
            acc3 = _cc_token_step(acc3, w_hi, w_lo, am, xw_ptr, xw_row + 3 * stride_xw, words,
                                  ok2, t0 + 3, T, X_KIND)
    y0 = tl.sum(acc0, axis=1)
    y1 = tl.sum(acc1, axis=1)
    y2 = tl.sum(acc2, axis=1)
    y3 = tl.sum(acc3, axis=1)
    if HAS_DELTA:  # this block's deltas, all tokens in one pass over them
        lo = tl.load(row_ptr + n0)
        hi = tl.load(row_ptr + tl.minimum(n0 + BN, N))
        rows = tl.arange(0, BN)
        for start in range(lo, hi, CH):
            j = start + tl.arange(0, CH)
            active = j < hi
            i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
            sel = rows[:, None] == (i // K - n0).to(tl.int32)[None, :]
            d = tl.load(dv_ptr + j, mask=active, other=0.0).to(tl.float32)
            c = i % K
            y0 = _delta_token(y0, sel, d, x_ptr, t0, T, stride_xt, c, active)
            if TG > 1:
                y1 = _delta_token(y1, sel, d, x_ptr, t0 + 1, T, stride_xt, c, active)
            if TG > 2:
                y2 = _delta_token(y2, sel, d, x_ptr, t0 + 2, T, stride_xt, c, active)
            if TG > 3:
                y3 = _delta_token(y3, sel, d, x_ptr, t0 + 3, T, stride_xt, c, active)
    _store_rows(y0, y_ptr, bias_ptr, t0, T, rn, N, stride_yt, HAS_BIAS)
    if TG > 1:
        _store_rows(y1, y_ptr, bias_ptr, t0 + 1, T, rn, N, stride_yt, HAS_BIAS)
    if TG > 2:
        _store_rows(y2, y_ptr, bias_ptr, t0 + 2, T, rn, N, stride_yt, HAS_BIAS)
    if TG > 3:
        _store_rows(y3, y_ptr, bias_ptr, t0 + 3, T, rn, N, stride_yt, HAS_BIAS)


@triton.jit
def _mma_load_step(packed_ptr, row_bytes, blk_row, n_ok, k0, rh, rg, K, BS: tl.constexpr,
                   GS: tl.constexpr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                   DOUBLE_QUANT: tl.constexpr, BS2: tl.constexpr):
    """Packed bytes [BN, BK/2] (int32) and absmax [BN, G] of the K step starting at k0."""
    j = k0 // 2 + rh
    b = tl.load(packed_ptr + row_bytes[:, None] + j[None, :],
                mask=n_ok[:, None] & (2 * j < K)[None, :], other=0).to(tl.int32)
    kg = k0 + rg * GS
    am = _load_absmax(blk_row[:, None] + (kg // BS)[None, :], n_ok[:, None] & (kg < K)[None, :],
                      absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr, DOUBLE_QUANT,
                      BS2)
    return b, am


@triton.jit
def _gemv_4bit_mma_kernel(
    x_ptr, xw_ptr, packed_ptr, absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    code_ptr, dv_ptr, idx_ptr, row_ptr, bias_ptr, y_ptr,
    T, N, K, stride_xt, stride_xw, stride_yt,
    BS: tl.constexpr, GS: tl.constexpr, BS2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
    UPCAST_DOT: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    CH: tl.constexpr,
):
    """Tensor-core GEMV for 16-bit x, tokens padded to TP = 16: the weight tile is rounded to
    x's dtype (like the dequantised weight) and multiplied as [BN, BK/2] × [BK/2, TP] twice
    (high and low nibbles against even and odd columns of x)."""
    G: tl.constexpr = BK // GS
    SUB: tl.constexpr = GS // 2
    H: tl.constexpr = BK // 2
    n0 = tl.program_id(0) * BN
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < N
    rh = tl.arange(0, H)
    rg = tl.arange(0, G)
    rt = tl.arange(0, TP)
    t_ok = rt < T
    row_bytes = rn.to(tl.int64) * (K // 2)
    blk_row = rn * (K // BS)
    x_ty: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, TP), dtype=tl.float32)
    b_next, am_next = _mma_load_step(packed_ptr, row_bytes, blk_row, n_ok, 0, rh, rg, K, BS, GS,
                                     absmax_ptr, qabs_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                     DOUBLE_QUANT, BS2)
    for k0 in range(0, K, BK):
        b = b_next
        am = am_next
        b_next, am_next = _mma_load_step(packed_ptr, row_bytes, blk_row, n_ok, k0 + BK, rh, rg,
                                         K, BS, GS, absmax_ptr, qabs_ptr, absmax2_ptr,
                                         code2_ptr, offset_ptr, DOUBLE_QUANT, BS2)
        j = k0 // 2 + rh
        j_ok = 2 * j < K
        am = tl.reshape(tl.broadcast_to(am[:, :, None], (BN, G, SUB)), (BN, H))
        w_hi = (tl.load(code_ptr + (b >> 4)) * am).to(x_ty)
        w_lo = (tl.load(code_ptr + (b & 0xF)) * am).to(x_ty)
        words = tl.load(xw_ptr + rt[None, :] * stride_xw + j[:, None],
                        mask=j_ok[:, None] & t_ok[None, :], other=0)
        if X_KIND == 0:
            xe = (words << 16).to(tl.float32, bitcast=True).to(x_ty)
            xo = ((words >> 16) << 16).to(tl.float32, bitcast=True).to(x_ty)
        else:
            xe = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            xo = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        if UPCAST_DOT:  # the interpreter's 16-bit dot is unreliable
            acc = tl.dot(w_hi.to(tl.float32), xe.to(tl.float32), acc)
            acc = tl.dot(w_lo.to(tl.float32), xo.to(tl.float32), acc)
        else:
            acc = tl.dot(w_hi, xe, acc)
            acc = tl.dot(w_lo, xo, acc)
    if HAS_DELTA:
        lo = tl.load(row_ptr + n0)
        hi = tl.load(row_ptr + tl.minimum(n0 + BN, N))
        for start in range(lo, hi, CH):
            jj = start + tl.arange(0, CH)
            active = jj < hi
            i = tl.load(idx_ptr + jj, mask=active, other=0).to(tl.int64)
            r = (i // K - n0).to(tl.int32)
            d = tl.load(dv_ptr + jj, mask=active, other=0.0).to(tl.float32)
            xg = tl.load(x_ptr + rt[None, :] * stride_xt + (i % K)[:, None],
                         mask=active[:, None] & t_ok[None, :], other=0.0)
            sel = tl.where(tl.arange(0, BN)[:, None] == r[None, :], d[None, :], 0.0)
            if UPCAST_DOT:
                acc = tl.dot(sel, xg.to(tl.float32), acc)
            else:
                acc = tl.dot(sel.to(x_ty), xg, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rt[None, :] * stride_yt + rn[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & t_ok[None, :])


# Default launch configurations (BN, BK, num_warps), from the sweep in
# benchmarks/tune_nf4_gemv.py on the H100.
GEMV_DEFAULTS = {"cc": (4, 1024, 4), "mma": (16, 512, 4)}
GEMV_GROUP_MAX = 128  # GS: elements per absmax sub-group of a K step


# --------------------------------------------------------------------------- launchers
# Dequantise launch defaults (elements per program, warps) per kernel: "elements" writes one
# element per store (fp32 output), "pairs" two 16-bit elements per 32-bit store. Pairs: the
# H200 sweep of benchmarks/tune_nf4_dequant.py (RESULTS.md) ties 4096/2 with 8192/4 without
# deltas (31.5 µs) and prefers it with 1% fused deltas (38.2 vs 39.0 µs).
DEQUANT_DEFAULTS = {"elements": (8192, 4), "pairs": (4096, 2)}


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


def program_starts(idx: torch.Tensor, elems_per_program: int, n_programs: int,
                   method: str | None = None) -> torch.Tensor:
    """[n_programs + 1] int64: starts[p] = #(idx < p · elems_per_program) for a sorted idx [k]
    (int32/int64). `method` "gaps" (one thread per delta, `_program_starts_kernel`) or
    "searchsorted" (one binary search per boundary); by default gaps when there are at least as
    many deltas as programs."""
    k = idx.numel()
    if method is None:
        method = "gaps" if k >= n_programs else "searchsorted"
    if method == "searchsorted":
        step = elems_per_program
        sorted_idx = idx if n_programs * step < 2**31 else idx.long()
        bounds = torch.arange(0, n_programs * step + 1, step, device=idx.device,
                              dtype=sorted_idx.dtype)
        return torch.searchsorted(sorted_idx, bounds)
    if method != "gaps":
        raise ValueError(f"method must be 'gaps' or 'searchsorted', got {method!r}")
    starts = torch.empty(n_programs + 1, dtype=torch.int64, device=idx.device)
    block = 1024
    _program_starts_kernel[(triton.cdiv(k + 1, block),)](
        idx, starts, k, n_programs, ELEMS=elems_per_program, BLOCK=block, num_warps=4)
    return starts


def fused_program_starts(idx: torch.Tensor, numel: int, blocksize: int,
                         elems_per_program: int | None = None) -> torch.Tensor:
    """The [n_programs + 1] int64 delta ranges `dequantize_4bit`'s fused scatter uses for a
    sorted idx into a [numel] weight (its default 16-bit launch, or `elems_per_program`): pass
    them back as its `starts` to reuse them (for example from a forward to its backward)."""
    nb = _program_blocks(blocksize, elems_per_program or DEQUANT_DEFAULTS["pairs"][0])
    return program_starts(idx, nb * blocksize, triton.cdiv(triton.cdiv(numel, blocksize), nb))


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, numel: int, dtype: torch.dtype, *,
                    absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                    offset: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                    idx: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    elems_per_program: int | None = None, num_warps: int | None = None,
                    pair_store: bool | None = None, idx_sorted: bool = False,
                    starts: torch.Tensor | None = None) -> torch.Tensor:
    """Flat [numel] `dtype` weight `code[q] * absmax` (+ scatter(dv, idx) when given).

    packed: [ceil(numel/2)] uint8 contiguous; absmax: [n_blocks] fp32, or uint8 with absmax2
    [ceil(n_blocks/256)] fp32, code2 [256] fp32 and offset 0-dim fp32 (double quant); code [16]
    fp32. dv [k] float and idx [k] int32/int64 unique flat indices. `out` ([numel]
    contiguous `dtype`) may be passed to reuse a buffer.

    16-bit outputs are written two elements per 32-bit store (`pair_store`, the default when
    `out` is 4-byte aligned); `elems_per_program` and `num_warps` override the launch defaults
    (`DEQUANT_DEFAULTS`, per kernel). With `idx_sorted` (idx ascending, as `spft.ops` hands it
    over) and pair stores, each program adds its own deltas right after its dense values (one
    launch, after `program_starts` has found each program's range of idx); otherwise a second
    launch scatters them. An unsorted idx passed as sorted loses deltas; every access stays in
    bounds (each program's range lies in [0, k] whatever the order). `starts`
    (`fused_program_starts` of the same idx and launch) skips that search; the other paths
    ignore it.
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
    can_pair = dtype != torch.float32 and out.data_ptr() % 4 == 0
    if pair_store is None:
        pair_store = can_pair
    elif pair_store and not can_pair:
        raise ValueError("pair_store needs a 16-bit dtype and a 4-byte aligned out")
    default_elems, default_warps = DEQUANT_DEFAULTS["pairs" if pair_store else "elements"]
    nb = _program_blocks(blocksize, elems_per_program or default_elems)
    meta = dict(BS=blocksize, NB=nb, BS2=ABSMAX_BLOCKSIZE, DOUBLE_QUANT=amax_args[5],
                MANUAL_RNE=interpreting(), num_warps=num_warps or default_warps,
                enable_fp_fusion=False)
    grid = (triton.cdiv(n_blocks, nb),)
    has_deltas = dv is not None and idx is not None and idx.numel() > 0
    fused = has_deltas and pair_store and idx_sorted
    if pair_store:
        # an odd numel's last word would overrun out: the kernel writes that element alone
        out_pairs = out[: numel - numel % 2].view(torch.int32)
        starts_arg = dv_arg = idx_arg = out_pairs
        if fused:
            if starts is None:
                starts = program_starts(idx, nb * blocksize, grid[0])
            elif (starts.shape != (grid[0] + 1,) or starts.dtype != torch.int64
                  or starts.device != idx.device):
                raise ValueError(f"starts must be a [{grid[0] + 1}] int64 tensor on "
                                 f"{idx.device} (fused_program_starts of this launch)")
            starts_arg, dv_arg, idx_arg = starts, dv, idx
        _dequantize_4bit_pairs_kernel[grid](packed, *amax_args[:5], code, out, out_pairs,
                                            dv_arg, idx_arg, starts_arg, numel, n_blocks, **meta,
                                            DELTAS=fused, DBLOCK=FUSED_DELTA_BLOCK)
    else:
        _dequantize_4bit_kernel[grid](packed, *amax_args[:5], code, out, numel, n_blocks, **meta)
    if has_deltas and not fused:
        k = idx.numel()
        _scatter_4bit_kernel[(triton.cdiv(k, SCATTER_BLOCK),)](
            packed, *amax_args[:5], code, out, dv, idx, k, numel,
            BS=blocksize, BS2=ABSMAX_BLOCKSIZE, DOUBLE_QUANT=amax_args[5],
            MANUAL_RNE=interpreting(), BLOCK=SCATTER_BLOCK, num_warps=4,
            enable_fp_fusion=False,
        )
    return out


def gemv_supported(x: torch.Tensor, in_features: int, blocksize: int) -> bool:
    """Whether `gemv_4bit` can serve x [T, in]: T ≤ 16, in even and a multiple of blocksize."""
    tokens = x.numel() // max(in_features, 1)
    return (0 < tokens <= GEMV_MAX_TOKENS and in_features % 2 == 0
            and in_features % blocksize == 0 and x.dtype in SUPPORTED_DTYPES)


_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
CC_MAX_GROUP = 4  # tokens per program of the CUDA-core kernel


def gemv_kernel_for(tokens: int, dtype: torch.dtype) -> str:
    """"cc" (CUDA cores, ≤ 4 tokens per program) or "mma" (tensor cores, 16-bit x, > 4 tokens)."""
    return "mma" if tokens > CC_MAX_GROUP and dtype != torch.float32 else "cc"


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
              blocksize: int, out_features: int, *, absmax2: torch.Tensor | None = None,
              code2: torch.Tensor | None = None, offset: torch.Tensor | None = None,
              dv: torch.Tensor | None = None, idx: torch.Tensor | None = None,
              row_ptr: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              config: dict | None = None, kernel: str = "auto") -> torch.Tensor:
    """y [T, out] = x [T, in] @ (W + scatter(dv, idx))ᵀ + bias, T ≤ 16, x's dtype.

    x: rows contiguous (stride(1) == 1); W packed row-major like `dequantize_4bit`; in even and a
    multiple of blocksize. row_ptr [out + 1] int32/int64: `searchsorted(idx, r · in)` for
    r = 0 … out (computed here when None; cache it when serving a fixed adapter).
    kernel: "auto" (`gemv_kernel_for`), "cc" or "mma" (16-bit x only).
    `config` ({"BN", "BK", "num_warps"[, "num_stages"]}) overrides `GEMV_DEFAULTS`. Accumulation is
    fp32; the CUDA-core kernel does not round the decoded weight to x's dtype (the result is
    at least as accurate as dequantise + F.linear).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be 2-D [T, in] with contiguous rows")
    T, K = x.shape
    if not gemv_supported(x, K, blocksize):
        raise ValueError(f"gemv_4bit needs 1 ≤ T ≤ {GEMV_MAX_TOKENS} and in_features even and a "
                         f"multiple of blocksize {blocksize}; got x {tuple(x.shape)}")
    if kernel == "auto":
        kernel = gemv_kernel_for(T, x.dtype)
    if kernel not in ("cc", "mma") or (kernel == "mma" and x.dtype == torch.float32):
        raise ValueError(f"kernel must be 'auto', 'cc' or 'mma' (16-bit x), got {kernel!r}")
    amax_args = _absmax_args(absmax, absmax2, code2, offset)
    x_kind = _X_KIND[x.dtype]
    if x_kind < 2:  # 16-bit x is read as int32 words holding (x[2j], x[2j+1])
        if x.stride(0) % 2 or x.storage_offset() % 2:
            x = x.clone()
        xw = x.view(torch.int32)
    else:
        xw = x
    y = torch.empty((T, out_features), dtype=x.dtype, device=x.device)
    has_delta = dv is not None and idx is not None and idx.numel() > 0
    if has_delta and row_ptr is None:
        starts = torch.arange(0, out_features + 1, device=idx.device, dtype=torch.int64) * K
        row_ptr = torch.searchsorted(idx, starts.to(idx.dtype), out_int32=True)
    if not has_delta:
        dv = idx = row_ptr = y
    args = (x, xw, packed, *amax_args[:5], code, dv, idx, row_ptr,
            bias if bias is not None else y, y, T, out_features, K, x.stride(0), xw.stride(0),
            y.stride(0))
    meta = dict(BS=blocksize, BS2=ABSMAX_BLOCKSIZE, DOUBLE_QUANT=amax_args[5],
                HAS_DELTA=has_delta, HAS_BIAS=bias is not None, X_KIND=x_kind,
                CH=128 if kernel == "cc" else 64)
    if kernel == "cc":
        group = min(T, CC_MAX_GROUP)
        meta["TG"] = group
        fn = _gemv_4bit_cc_kernel
    else:
        meta.update(TP=16, UPCAST_DOT=interpreting())
        group = 16
        fn = _gemv_4bit_mma_kernel
    if config is None:
        bn, bk, warps = GEMV_DEFAULTS[kernel]
        config = {"BN": max(bn, 16) if interpreting() else bn, "BK": bk, "num_warps": warps}
    group_size = min(blocksize, GEMV_GROUP_MAX)
    bn = config["BN"]
    if kernel == "mma" and bn < 16:
        raise ValueError(f"the mma kernel needs BN >= 16, got {bn}")
    bk = max(group_size, min(config["BK"], triton.next_power_of_2(K)))
    grid = (triton.cdiv(out_features, bn), triton.cdiv(T, group))
    fn[grid](*args, **meta, GS=group_size, BN=bn, BK=bk, num_warps=config.get("num_warps", 4),
             num_stages=config.get("num_stages", 1))
    return y
