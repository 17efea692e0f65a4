"""Split-weight GEMM for S2FT: ``C = A @ B`` where B is two tensors that are never concatenated.

B ``[K, N]`` is given as two parts read where they lie:

* ``split="n"``: columns ``[0, S)`` come from ``b0`` ``[K, S]`` and ``[S, N)`` from ``b1``
  ``[K, N-S]``. The grid holds ``cdiv(S, BN)`` column tiles over part 0 and ``cdiv(N-S, BN)`` over
  part 1, so no tile straddles the split (each tile reads one contiguous part).
* ``split="k"``: rows ``[0, S)`` of the reduction come from ``b0`` ``[S, N]`` and ``[S, K)`` from
  ``b1`` ``[K-S, N]``; one accumulator, two loops.

S2FT's four GEMMs map onto it (W = [T; F] rows, or [T | F] columns):
  output axis: y = x @ Wᵀ  (split n, b0 = Tᵀ, b1 = Fᵀ);  dx = dy @ W  (split k, b0 = T, b1 = F)
  input axis:  y = x @ Wᵀ  (split k, b0 = Tᵀ, b1 = Fᵀ);  dx = dy @ W  (split n, b0 = T, b1 = F)

Any strides (transposes are stride swaps). fp32 accumulation, output in A's dtype.
Also here: ``segmented_delta`` for batched multi-adapter serving (one small GEMM per adapter group
of rows, gathered and scattered inside the kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparse_kernels.sddmm import _tile_coords

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot_loop(acc, a_ptrs, b_ptrs, m_ok, n_ok, k_len, stride_ak, stride_bk,
              BK: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    rk = tl.arange(0, BK)
    for k0 in range(0, k_len, BK):
        k_ok = (k0 + rk) < k_len
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    return acc


@triton.jit
def _s2_split_mm_kernel(
    a_ptr, b0_ptr, b1_ptr, c_ptr,
    M, N, K, S,
    stride_am, stride_ak,
    stride_b0k, stride_b0n, stride_b1k, stride_b1n,
    stride_cm, stride_cn,
    SPLIT_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    if SPLIT_K:
        n_tiles0 = tl.cdiv(N, BN)
        n_pid_n = n_tiles0
    else:
        n_tiles0 = tl.cdiv(S, BN)
        n_pid_n = n_tiles0 + tl.cdiv(N - S, BN)
    pid_m, pid_n = _tile_coords(M, n_pid_n, BM, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    a_row = a_ptr + rm[:, None].to(tl.int64) * stride_am
    c_row = c_ptr + rm[:, None].to(tl.int64) * stride_cm
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if SPLIT_K:
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        acc = _dot_loop(acc, a_row + rk[None, :] * stride_ak,
                        b0_ptr + rk[:, None] * stride_b0k + rn[None, :].to(tl.int64) * stride_b0n,
                        m_ok, n_ok, S, stride_ak, stride_b0k, BK, UPCAST_DOT, PRECISION)
        acc = _dot_loop(acc, a_row + (S + rk[None, :]) * stride_ak,
                        b1_ptr + rk[:, None] * stride_b1k + rn[None, :].to(tl.int64) * stride_b1n,
                        m_ok, n_ok, K - S, stride_ak, stride_b1k, BK, UPCAST_DOT, PRECISION)
        tl.store(c_row + rn[None, :].to(tl.int64) * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    elif pid_n < n_tiles0:
        # Column tiles [0, n_tiles0) cover part 0, the rest part 1: one part per tile.
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < S
        acc = _dot_loop(acc, a_row + rk[None, :] * stride_ak,
                        b0_ptr + rk[:, None] * stride_b0k + rn[None, :].to(tl.int64) * stride_b0n,
                        m_ok, n_ok, K, stride_ak, stride_b0k, BK, UPCAST_DOT, PRECISION)
        tl.store(c_row + rn[None, :].to(tl.int64) * stride_cn, acc.to(c_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        rn = (pid_n - n_tiles0) * BN + tl.arange(0, BN)
        n_ok = rn < N - S
        acc = _dot_loop(acc, a_row + rk[None, :] * stride_ak,
                        b1_ptr + rk[:, None] * stride_b1k + rn[None, :].to(tl.int64) * stride_b1n,
                        m_ok, n_ok, K, stride_ak, stride_b1k, BK, UPCAST_DOT, PRECISION)
        tl.store(c_row + (S + rn[None, :]).to(tl.int64) * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(a: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor) -> None:
    for name, t in (("a", a), ("b0", b0), ("b1", b1)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != a.dtype or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"a, b0, b1 must share a dtype in {SUPPORTED_DTYPES}, {name} is "
                            f"{t.dtype}")
    if not (a.device == b0.device == b1.device):
        raise ValueError("a, b0 and b1 must be on one device")


def split_mm(a: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor, split: str,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ [b0 | b1]`` (split="n") or ``a @ [b0; b1]`` (split="k") without concatenating.

    a: [M, K]; split="n": b0 [K, S], b1 [K, N-S]; split="k": b0 [S, N], b1 [K-S, N].
    fp16/bf16/fp32, one dtype, any strides. Returns (or writes ``out``) [M, N] in a's dtype.
    """
    _check(a, b0, b1)
    M, K = a.shape
    if split == "n":
        if b0.shape[0] != K or b1.shape[0] != K:
            raise ValueError(f"split='n' needs b0, b1 with {K} rows, got {tuple(b0.shape)}, "
                             f"{tuple(b1.shape)}")
        S, N = b0.shape[1], b0.shape[1] + b1.shape[1]
    elif split == "k":
        if b0.shape[1] != b1.shape[1] or b0.shape[0] + b1.shape[0] != K:
            raise ValueError(f"split='k' needs b0 [S, N], b1 [K-S, N] with K={K}, got "
                             f"{tuple(b0.shape)}, {tuple(b1.shape)}")
        S, N = b0.shape[0], b0.shape[1]
    else:
        raise ValueError(f"split must be 'n' or 'k', got {split!r}")
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    elif out.shape != (M, N) or out.dtype != a.dtype:
        raise ValueError(f"out must be [{M}, {N}] {a.dtype}, got {tuple(out.shape)} {out.dtype}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    BM, BN, BK, GROUP_M = 128, 128, 64, 8
    if split == "k":
        n_n = triton.cdiv(N, BN)
    else:
        n_n = triton.cdiv(S, BN) + triton.cdiv(N - S, BN)
    grid = (triton.cdiv(M, BM) * n_n,)
    _s2_split_mm_kernel[grid](
        a, b0, b1, out, M, N, K, S,
        a.stride(0), a.stride(1), b0.stride(0), b0.stride(1), b1.stride(0), b1.stride(1),
        out.stride(0), out.stride(1),
        SPLIT_K=(split == "k"), BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M,
        UPCAST_DOT=interpreting() and a.dtype == torch.bfloat16,
        # fp32 matches torch's default (no TF32) exactly enough for the fp32 tolerance
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=8, num_stages=3 if a.dtype == torch.float32 else 4,
    )
    return out


# --------------------------------------------------------------------------- multi-adapter serving
@triton.jit
def _segmented_delta_kernel(
    x_ptr, rows_ptr, seg_ptr, tile_seg_ptr, tile_m_ptr, idx_ptr, idx_off_ptr, d_ptr, d_off_ptr,
    y_ptr, K, stride_xm, stride_ym,
    AXIS_OUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BM rows of one adapter group × BN of the adapter's s channels.

    axis out:  y[r, idx[j]] += Σ_k x[r, k] · D[j, k]       (D [s, K] row-major)
    axis in:   y[r, n]      += Σ_j x[r, idx[j]] · D[n, j]  (D [N, s] row-major; K = s here)
    """
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_seg_ptr + t)
    m0 = tl.load(tile_m_ptr + t)
    r_lo = tl.load(seg_ptr + g)
    r_hi = tl.load(seg_ptr + g + 1)
    i_lo = tl.load(idx_off_ptr + g)
    s = tl.load(idx_off_ptr + g + 1) - i_lo
    d_base = tl.load(d_off_ptr + g)
    rm = r_lo + m0 + tl.arange(0, BM)
    m_ok = rm < r_hi
    rows = tl.load(rows_ptr + rm, mask=m_ok, other=0).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if AXIS_OUT:
        n_ok = rn < s
        for k0 in range(0, K, BK):
            k_ok = (k0 + rk) < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(d_ptr + d_base + rn[None, :].to(tl.int64) * K + (k0 + rk)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        cols = tl.load(idx_ptr + i_lo + rn, mask=n_ok, other=0).to(tl.int64)
    else:
        N = K  # output width (the base's out features)
        n_ok = rn < N
        for k0 in range(0, s, BK):
            k_ok = (k0 + rk) < s
            src = tl.load(idx_ptr + i_lo + k0 + rk, mask=k_ok, other=0).to(tl.int64)
            a = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(d_ptr + d_base + rn[None, :].to(tl.int64) * s + (k0 + rk)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        cols = rn.to(tl.int64)
    ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    prev = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (prev.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def segmented_delta_(y: torch.Tensor, x: torch.Tensor, row_adapter: torch.Tensor,
                     indices: list[torch.Tensor], deltas: list[torch.Tensor],
                     axis: str) -> torch.Tensor:
    """In place ``y += per-row adapter delta`` (see `spft.reference.s2.multi_adapter_linear`).

    y [T, out] (contiguous rows), x [T, in] (unit column stride); row_adapter [T] int (-1: no
    adapter); indices[a] [s_a] int original-coordinate channels (unique); deltas[a] [s_a, in]
    (axis "output") or [out, s_a] (axis "input"), any float dtype (cast to x's dtype). Rows of
    different adapters never meet in one tile: rows are grouped by adapter (a sort) and each
    group is a segment of the grid.
    """
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y need unit stride along features")
    n = len(indices)
    if n == 0 or x.shape[0] == 0:
        return y
    dev = x.device
    order = torch.argsort(row_adapter, stable=True)
    sorted_ids = row_adapter[order]
    counts = torch.bincount(sorted_ids[sorted_ids >= 0].long(), minlength=n)[:n]
    first = int((sorted_ids < 0).sum())
    seg = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    seg[1:] = torch.cumsum(counts, 0)
    seg += first
    BM, BN, BK = 64, 64, 32
    tiles_per = (counts + BM - 1) // BM
    tile_seg = torch.repeat_interleave(torch.arange(n, device=dev), tiles_per)
    starts = torch.cumsum(tiles_per, 0) - tiles_per
    tile_m = (torch.arange(tile_seg.numel(), device=dev) - starts[tile_seg]) * BM
    if tile_seg.numel() == 0:
        return y
    sizes = [int(i.numel()) for i in indices]
    idx_cat = torch.cat([i.to(device=dev, dtype=torch.int64) for i in indices])
    idx_off = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=dev)
    d_cat = torch.cat([d.to(device=dev, dtype=x.dtype).contiguous().reshape(-1) for d in deltas])
    numels = [int(d.numel()) for d in deltas]
    d_off = torch.tensor([0, *torch.tensor(numels).cumsum(0).tolist()[:-1]], device=dev)
    if axis == "output":
        K, n_width = x.shape[1], max(sizes)
    else:
        K, n_width = y.shape[1], y.shape[1]
    grid = (tile_seg.numel(), triton.cdiv(max(n_width, 1), BN))
    _segmented_delta_kernel[grid](
        x, order.to(torch.int64), seg, tile_seg, tile_m, idx_cat, idx_off, d_cat, d_off, y,
        K, x.stride(0), y.stride(0),
        AXIS_OUT=(axis == "output"), BM=BM, BN=BN, BK=BK,
        UPCAST_DOT=interpreting() and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return y
