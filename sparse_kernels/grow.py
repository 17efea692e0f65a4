"""SpIEL growth selection without dense [m, n] buffers.

* `ma_select(row_acc, col_acc, active_idx, num_grow)` (SpIEL-MA): the `num_grow` non-active
  flat positions with the largest fp32 `row_acc[r] · col_acc[c]`, exactly, ties to the smaller
  flat index. The threshold t* (the num_grow-th largest non-active product) is found by a
  radix-32 bisection over the bit patterns of non-negative fp32 values, entirely on the device:
  each round one launch counts, for 31 thresholds at once, the pairs with product ≥ t (per row,
  a binary search over the sorted columns: fl(a·b) is monotone in b) minus the active ones, and a
  one-program launch narrows [lo, hi). Seven rounds cover all 2^31 patterns. The pairs above t*
  (fewer than num_grow + k) and the ties of the first rows (≤ num_grow + n + k) are then
  enumerated. Memory O(m + n + k + num_grow); the reference builds the m·n product.
* `grad_topk_candidates(dy, x, num_candidates)` (SpIEL-AG): the positions of the largest |dW|,
  dW = dyᵀ x, from a tensor-core tile GEMM that never writes dW: each [BM, BN] tile keeps the
  `per_segment` largest |values| of each of its BM rows (an argmax-and-mask loop in registers);
  a top-k over those (M · ⌈N/BN⌉ · per_segment values) gives the global candidates. Exact when
  no (row, BN-column segment) holds more than `per_segment` of the global top k; the launcher
  checks this and reports it (`exact`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparse_kernels.sddmm import interpreting

MA_NT = 32  # thresholds per bisection round (31 evaluated + the bracket)
MA_ROUNDS = math.ceil(31 / math.log2(MA_NT))


@triton.jit
def _first_ge(a, t, cs_ptr, n, LOG_N: tl.constexpr):
    """For each (row value a, threshold t): first position p in ascending cs with a·cs[p] ≥ t."""
    lo = tl.zeros(a.shape, dtype=tl.int32)
    hi = tl.zeros(a.shape, dtype=tl.int32) + n
    for _ in tl.static_range(LOG_N + 1):
        mid = (lo + hi) // 2
        open_ = lo < hi
        v = tl.load(cs_ptr + mid, mask=open_ & (mid < n), other=0.0)
        pred = (a * v) >= t
        hi = tl.where(open_ & pred, mid, hi)
        lo = tl.where(open_ & (~pred), mid + 1, lo)
    return lo


@triton.jit
def _ma_count_kernel(row_ptr, cs_ptr, pa_ptr, lohi_ptr, counts_ptr, m, n, k,
                     n_row_progs, NT: tl.constexpr, BR: tl.constexpr, BA: tl.constexpr,
                     LOG_N: tl.constexpr):
    pid = tl.program_id(0)
    lo = tl.load(lohi_ptr)
    hi = tl.load(lohi_ptr + 1)
    step = tl.maximum((hi - lo + NT - 1) // NT, 1)
    tj = lo + (tl.arange(0, NT) + 1).to(tl.int64) * step
    valid = tj < hi
    tf = tl.where(valid, tj, 0).to(tl.int32).to(tl.float32, bitcast=True)
    if pid < n_row_progs:
        r = pid * BR + tl.arange(0, BR)
        a = tl.load(row_ptr + r, mask=r < m, other=0.0)
        a2 = tl.broadcast_to(a[:, None], (BR, NT))
        t2 = tl.broadcast_to(tf[None, :], (BR, NT))
        p = _first_ge(a2, t2, cs_ptr, n, LOG_N)
        cnt = tl.where((r < m)[:, None], n - p, 0).to(tl.int64)
        tl.atomic_add(counts_ptr + tl.arange(0, NT), tl.sum(cnt, axis=0), mask=valid)
    else:
        j = (pid - n_row_progs).to(tl.int64) * BA + tl.arange(0, BA)
        act = j < k
        pa = tl.load(pa_ptr + j, mask=act, other=0.0)
        ge = (pa[:, None] >= tf[None, :]) & act[:, None]
        tl.atomic_add(counts_ptr + tl.arange(0, NT), -tl.sum(ge.to(tl.int64), axis=0),
                      mask=valid)


@triton.jit
def _ma_narrow_kernel(lohi_ptr, counts_ptr, need, NT: tl.constexpr):
    lo = tl.load(lohi_ptr)
    hi = tl.load(lohi_ptr + 1)
    step = tl.maximum((hi - lo + NT - 1) // NT, 1)
    tj = lo + (tl.arange(0, NT) + 1).to(tl.int64) * step
    valid = tj < hi
    c = tl.load(counts_ptr + tl.arange(0, NT))
    new_lo = tl.maximum(lo, tl.max(tl.where(valid & (c >= need), tj, lo), axis=0))
    new_hi = tl.minimum(hi, tl.min(tl.where(valid & (c < need), tj, hi), axis=0))
    tl.store(lohi_ptr, new_lo)
    tl.store(lohi_ptr + 1, new_hi)
    tl.store(counts_ptr + tl.arange(0, NT), tl.zeros((NT,), dtype=tl.int64))


@triton.jit
def _ma_row_counts_kernel(row_ptr, cs_ptr, lohi_ptr, out_ptr, m, n, BR: tl.constexpr,
                          LOG_N: tl.constexpr):
    """out[r] = (#c: a_r·b_c ≥ t*, #c: a_r·b_c > t*), t* = lo."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    a = tl.load(row_ptr + r, mask=r < m, other=0.0)
    lo = tl.load(lohi_ptr)
    t_ge = lo.to(tl.int32).to(tl.float32, bitcast=True)
    t_gt = (lo + 1).to(tl.int32).to(tl.float32, bitcast=True)
    p_ge = _first_ge(a, tl.zeros(a.shape, dtype=tl.float32) + t_ge, cs_ptr, n, LOG_N)
    p_gt = _first_ge(a, tl.zeros(a.shape, dtype=tl.float32) + t_gt, cs_ptr, n, LOG_N)
    tl.store(out_ptr + 2 * r, n - p_ge, mask=r < m)
    tl.store(out_ptr + 2 * r + 1, n - p_gt, mask=r < m)


def _expand(rows: torch.Tensor, counts: torch.Tensor, start: torch.Tensor, order: torch.Tensor,
            n: int) -> torch.Tensor:
    """Flat indices r·n + order[start[r] + j] for j < counts[r], rows given in `rows`."""
    counts = counts.long()
    total = int(counts.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.long, device=counts.device)
    rep = torch.repeat_interleave(rows, counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    off = torch.arange(total, device=counts.device) - torch.repeat_interleave(
        first, counts, output_size=total)
    pos = torch.repeat_interleave(start.long(), counts, output_size=total) + off
    return rep * n + order[pos]


def _not_in(flat: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    if active.numel() == 0 or flat.numel() == 0:
        return flat
    at = torch.searchsorted(active, flat).clamp_(max=active.numel() - 1)
    return flat[active[at] != flat]


def ma_select(row_acc: torch.Tensor, col_acc: torch.Tensor, active_idx: torch.Tensor,
              num_grow: int) -> torch.Tensor:
    """Exact SpIEL-MA growth: sorted int64 [num_grow] flat indices (see module docstring).

    row_acc: [m] and col_acc: [n] non-negative fp32 accumulators; active_idx: [k] int32/int64
    sorted unique flat indices into [m, n] (excluded from the choice).
    """
    if row_acc.dim() != 1 or col_acc.dim() != 1:
        raise ValueError("row_acc and col_acc must be 1-D")
    m, n = row_acc.numel(), col_acc.numel()
    k = active_idx.numel()
    if not 0 <= num_grow <= m * n - k:
        raise ValueError(f"num_grow must be in [0, {m * n - k}] (non-active positions), "
                         f"got {num_grow}")
    device = row_acc.device
    if num_grow == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    row = row_acc.float().contiguous()
    col = col_acc.float().contiguous()
    active = active_idx.long().contiguous()
    cs, corder = torch.sort(col)
    top = (row.max() * cs[-1]).reshape(1)
    lohi = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                      top.view(torch.int32).long() + 1])
    counts = torch.zeros(MA_NT, dtype=torch.long, device=device)
    BR, BA = 64, 1024
    log_n = max(1, math.ceil(math.log2(n + 1)))
    n_row = triton.cdiv(m, BR)
    grid = (n_row + triton.cdiv(k, BA),)
    pa = row[active // n] * col[active % n]  # the active products, once (fp32, as the kernel)
    for _ in range(MA_ROUNDS):
        _ma_count_kernel[grid](row, cs, pa, lohi, counts, m, n, k, n_row,
                               NT=MA_NT, BR=BR, BA=BA, LOG_N=log_n, num_warps=4)
        _ma_narrow_kernel[(1,)](lohi, counts, num_grow, NT=MA_NT, num_warps=1)
    per_row = torch.empty(m, 2, dtype=torch.int32, device=device)
    _ma_row_counts_kernel[(triton.cdiv(m, 256),)](row, cs, lohi, per_row, m, n, BR=256,
                                                  LOG_N=log_n, num_warps=4)
    c_ge, c_gt = per_row[:, 0].long(), per_row[:, 1].long()
    rows = torch.arange(m, device=device)
    above = _not_in(_expand(rows, c_gt, n - c_gt, corder, n), active)
    need_tie = num_grow - above.numel()
    if need_tie <= 0:
        return above.sort().values
    t_star = lohi[:1].to(torch.int32).view(torch.float32)
    act_ties = torch.bincount(active[pa == t_star] // n, minlength=m)
    free = c_ge - c_gt - act_ties
    last = int(torch.searchsorted(torch.cumsum(free, 0), torch.tensor(
        [need_tie], device=device)).item())
    sel = slice(0, last + 1)
    ties = _not_in(_expand(rows[sel], (c_ge - c_gt)[sel], (n - c_ge)[sel], corder, n), active)
    ties = ties.sort().values[:need_tie]
    return torch.cat([above, ties]).sort().values


# --------------------------------------------------------------------------- SpIEL-AG
@triton.jit
def _grad_topk_tiles_kernel(
    dy_ptr, x_ptr, val_ptr, pos_ptr, T, M, N,
    stride_dy_t, stride_dy_m, stride_x_t, stride_x_n,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    TOPC: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_pid_m = tl.cdiv(M, BM)
    n_pid_n = tl.cdiv(N, BN)
    width = GROUP_M * n_pid_n
    group = pid // width
    first_m = group * GROUP_M
    group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = dy_ptr + rm[:, None].to(tl.int64) * stride_dy_m + rk[None, :] * stride_dy_t
    b_ptrs = x_ptr + rk[:, None] * stride_x_t + rn[None, :].to(tl.int64) * stride_x_n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, T, BK):
        t_ok = (t + rk) < T
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & t_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=t_ok[:, None] & (rn[None, :] < N), other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_dy_t
        b_ptrs += BK * stride_x_t
    cols = tl.arange(0, BN)
    score = tl.where((rn < N)[None, :], tl.abs(acc), -1.0)
    out = (rm.to(tl.int64) * n_pid_n + pid_n) * TOPC
    row_ok = rm < M
    for c in tl.static_range(TOPC):
        best, arg = tl.max(score, axis=1, return_indices=True)
        hit = cols[None, :] == arg[:, None]
        val = tl.sum(tl.where(hit, acc, 0.0), axis=1)
        pos = rm.to(tl.int64) * N + pid_n * BN + arg
        pos = tl.where(best >= 0, pos, -1)
        tl.store(val_ptr + out + c, val, mask=row_ok)
        tl.store(pos_ptr + out + c, pos, mask=row_ok)
        score = tl.where(hit, -1.0, score)


def grad_topk_candidates(dy: torch.Tensor, x: torch.Tensor, num_candidates: int,
                         per_segment: int = 4, block_m: int = 128, block_n: int = 128,
                         num_warps: int = 8, num_stages: int = 3
                         ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top-|dW| positions of dW = dyᵀ x without forming dW.

    dy: [T, out], x: [T, in] (fp16/bf16/fp32, one dtype, any strides); num_candidates ≤ out·in.
    Returns (idx [c] int64 sorted, grad [c] fp32 (the dW values there), exact) where exact is
    False when some (row, block_n-column segment) filled all its `per_segment` slots with values
    ≥ the c-th largest (then more of the true top c may have been cut off; raise per_segment).
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy [T, out] and x [T, in] must be 2-D with equal T, got "
                         f"{tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.dtype != x.dtype or dy.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dy and x must share a dtype in fp16/bf16/fp32, got {dy.dtype}, "
                        f"{x.dtype}")
    T, M = dy.shape
    N = x.shape[1]
    if not 0 <= num_candidates <= M * N:
        raise ValueError(f"num_candidates must be in [0, {M * N}], got {num_candidates}")
    if per_segment < 1:
        raise ValueError(f"per_segment must be >= 1, got {per_segment}")
    device = dy.device
    if num_candidates == 0:
        return (torch.empty(0, dtype=torch.long, device=device),
                torch.empty(0, dtype=torch.float32, device=device), True)
    BM, BN, BK, GROUP_M = block_m, block_n, 64, 8
    topc = min(per_segment, BN)
    n_m, n_n = triton.cdiv(M, BM), triton.cdiv(N, BN)
    vals = torch.empty(M * n_n * topc, dtype=torch.float32, device=device)
    pos = torch.empty(M * n_n * topc, dtype=torch.long, device=device)
    _grad_topk_tiles_kernel[(n_m * n_n,)](
        dy, x, vals, pos, T, M, N, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M, TOPC=topc,
        UPCAST_DOT=interpreting() and dy.dtype == torch.bfloat16,
        IEEE=dy.dtype == torch.float32, num_warps=num_warps,
        num_stages=min(num_stages, 2) if dy.dtype == torch.float32 else num_stages)
    score = torch.where(pos >= 0, vals.abs(), -1.0)
    full = topc >= min(BN, N)  # every position of the gradient was a candidate
    take = min(num_candidates, score.numel())
    top_score, top = torch.topk(score, take, sorted=False)
    top = top[top_score >= 0]
    if full:
        exact = True
    elif top.numel() < num_candidates:
        exact = False
    else:
        kth = top_score.min()
        exact = bool((score.view(-1, topc)[:, -1] < kth).all())
    chosen = pos[top]
    order = torch.argsort(chosen)
    return chosen[order], vals[top][order], exact
