"""SpIEL growth selection without dense [m, n] buffers.

* `ma_select(row_acc, col_acc, active_idx, num_grow)` (SpIEL-MA): the `num_grow` non-active
  flat positions with the largest fp32 `row_acc[r] · col_acc[c]`, exactly, ties to the smaller
  flat index. No host synchronisation and a fixed number of launches (sort of the n columns,
  one memset, `MA_ROUNDS` + 3 Triton kernels):

  1. Threshold search. t* (the num_grow-th largest non-active product) is found by a radix-256
     bisection over the bit patterns of non-negative fp32 values: each round one launch
     evaluates 255 thresholds at once. Row programs count the pairs with product ≥ t (per row
     and threshold a binary search over the sorted columns, confined to the columns between
     the bracket ends' positions: fl(a·b) is monotone in b); active programs histogram, per
     active position, how many of the equally spaced thresholds lie at or below its product
     and subtract those. Every program replays the narrowing of the previous rounds from their
     counts (a few hundred loads), so no extra launch or grid synchronisation narrows
     [lo, hi). Four rounds cover all 2^31 patterns; then t* = lo.
  2. Per row: #products > t* and = t* (binary search), #active positions > t* and = t*
     (atomics from the active programs), the row's segment of the sorted active indices.
  3. One program: prefix sums over rows give each row's output offset and how many of its
     free ties it takes (ties go to the smallest flat indices, i.e. the first rows), and the
     list of rows that choose anything.
  4. Persistent programs take those rows one at a time, scan the row's columns in natural
     order, recompute the products, drop active columns (binary search in the row's active
     segment) and write the chosen flat indices at the row's offset: the output comes out
     sorted.

  Memory: an int64 scratch of 8m + 1028 entries and the [num_grow] output; no [m, n] buffer
  and no [k] temporaries (the reference builds the m·n product). Binary-search lengths are
  runtime arguments, so matrix shapes do not trigger recompilation.
* `grad_topk_candidates(dy, x, num_candidates)` (SpIEL-AG): the positions of the largest |dW|,
  dW = dyᵀ x, from a tensor-core tile GEMM that never writes dW: each [BM, BN] tile keeps the
  `per_segment` largest |values| of each of its BM rows (an argmax-and-mask loop in registers);
  a top-k over those (M · ⌈N/BN⌉ · per_segment values) gives the global candidates. Exact when
  no (row, BN-column segment) holds more than `per_segment` of the global top k; the launcher
  checks this and reports it (`exact`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparse_kernels.sddmm import _tile_coords, interpreting

MA_NT = 256  # thresholds per bisection round (255 evaluated + the bracket end)
MA_ROUNDS = 4  # 256^4 = 2^32 > the 0x7F800001 bit patterns of non-negative fp32 up to +inf
_MA_HB = 2 * MA_NT  # histogram bins (power of two > MA_NT)


@triton.jit
def _bit_length(w):
    """Bits of the non-negative int32 scalar w (= the steps a binary search over w items needs)."""
    nb = w * 0
    for i in tl.static_range(31):
        nb += ((w >> i) > 0).to(tl.int32)
    return nb


@triton.jit
def _lower_bound(sorted_ptr, target, lo, hi, steps):
    """For each target: the first position p in [lo, hi] of the ascending int array with
    sorted[p] ≥ target (hi when none), given steps ≥ bit_length(hi - lo)."""
    for _ in range(steps):
        mid = (lo + hi) // 2
        open_ = lo < hi
        less = tl.load(sorted_ptr + mid, mask=open_, other=0).to(tl.int64) < target
        lo = tl.where(open_ & less, mid + 1, lo)
        hi = tl.where(open_ & (~less), mid, hi)
    return lo


@triton.jit
def _first_ge(a, t, cs_ptr, lo, hi, steps):
    """For each (row value a, threshold t): the first position p in [lo, hi] of the ascending
    cs with a·cs[p] ≥ t, given that the answer lies in [lo, hi] (int32; hi when none below it
    qualifies) and steps ≥ bit_length(hi - lo)."""
    for _ in range(steps):
        mid = (lo + hi) // 2
        open_ = lo < hi
        v = tl.load(cs_ptr + mid, mask=open_, other=0.0)
        pred = (a * v) >= t
        hi = tl.where(open_ & pred, mid, hi)
        lo = tl.where(open_ & (~pred), mid + 1, lo)
    return lo


@triton.jit
def _ma_bracket(cnt_ptr, need, n_rounds, NT: tl.constexpr):
    """Replay the narrowing of the first `n_rounds` rounds: (lo, hi) int64 with
    #non-active products ≥ bits(lo) ≥ need > #non-active products ≥ bits(hi)."""
    lo = tl.program_id(0).to(tl.int64) * 0
    hi = lo + 0x7F800001
    ar = tl.arange(0, NT)
    for j in range(n_rounds):
        step = tl.maximum((hi - lo + NT - 1) // NT, 1)
        tj = lo + (ar + 1).to(tl.int64) * step
        valid = tj < hi
        c = tl.load(cnt_ptr + j * NT + ar)
        new_lo = tl.max(tl.where(valid & (c >= need), tj, lo), axis=0)
        new_hi = tl.min(tl.where(valid & (c < need), tj, hi), axis=0)
        lo = tl.maximum(lo, new_lo)
        hi = tl.minimum(hi, new_hi)
    return lo, hi


@triton.jit
def _active_products(act_ptr, row_ptr, col_ptr, j, k, n):
    """(row, fp32 product, in-range mask) of the active flat indices at positions j."""
    ok = j < k
    f = tl.load(act_ptr + j, mask=ok, other=0).to(tl.int64)
    r = f // n
    c = f - r * n
    p = tl.load(row_ptr + r, mask=ok, other=0.0) * tl.load(col_ptr + c, mask=ok, other=0.0)
    return r, p, ok


@triton.jit(do_not_specialize=["k", "need", "rnd", "log_n"])
def _ma_count_kernel(row_ptr, col_ptr, cs_ptr, act_ptr, cnt_ptr, m, n, k, need, rnd, log_n,
                     n_row_progs, n_act_progs, NT: tl.constexpr, HB: tl.constexpr,
                     BR: tl.constexpr, BA: tl.constexpr):
    """Round `rnd`: cnt[rnd, i] = #non-active pairs with product ≥ t_i (t_i: NT thresholds
    equally spaced in bit space over the bracket replayed from rounds < rnd). Per row, the
    searches are confined to the columns between the bracket ends' positions."""
    pid = tl.program_id(0)
    lo, hi = _ma_bracket(cnt_ptr, need, rnd, NT)
    step = tl.maximum((hi - lo + NT - 1) // NT, 1)
    ar = tl.arange(0, NT)
    tj = lo + (ar + 1).to(tl.int64) * step
    valid = tj < hi
    out = cnt_ptr + rnd * NT
    if pid < n_row_progs:
        tf = tl.where(valid, tj, 0).to(tl.int32).to(tl.float32, bitcast=True)
        t2 = tl.broadcast_to(tf[None, :], (BR, NT))
        f_lo = tl.zeros((BR,), dtype=tl.float32) + lo.to(tl.int32).to(tl.float32, bitcast=True)
        # every valid threshold is ≤ hi - 1 (≤ +inf), so its position is ≤ that of hi - 1
        f_hi = tl.zeros((BR,), dtype=tl.float32) + (hi - 1).to(tl.int32).to(tl.float32,
                                                                             bitcast=True)
        zero = tl.zeros((BR,), dtype=tl.int32)
        acc = tl.zeros((NT,), dtype=tl.int64)
        for rb in range(pid, tl.cdiv(m, BR), n_row_progs):
            r = rb * BR + tl.arange(0, BR)
            a = tl.load(row_ptr + r, mask=r < m, other=0.0)
            p_lo = _first_ge(a, f_lo, cs_ptr, zero, zero + n, log_n)
            p_hi = _first_ge(a, f_hi, cs_ptr, p_lo, zero + n, log_n)
            steps = _bit_length(tl.max(p_hi - p_lo, axis=0))
            a2 = tl.broadcast_to(a[:, None], (BR, NT))
            p = _first_ge(a2, t2, cs_ptr, tl.broadcast_to(p_lo[:, None], (BR, NT)),
                          tl.broadcast_to(p_hi[:, None], (BR, NT)), steps)
            cnt = tl.where((r < m)[:, None], n - p, 0)
            acc += tl.sum(cnt, axis=0).to(tl.int64)
        tl.atomic_add(out + ar, acc, mask=valid)
    else:
        hist = tl.zeros((HB,), dtype=tl.int32)
        for ab in range(pid - n_row_progs, tl.cdiv(k, BA), n_act_progs):
            j = (ab * BA + tl.arange(0, BA)).to(tl.int64)
            _, p, ok = _active_products(act_ptr, row_ptr, col_ptr, j, k, n)
            bits = tl.where(p > 0, p.to(tl.int32, bitcast=True), 0).to(tl.int64)
            # q = #thresholds t_i (i < NT) with t_i <= bits; this active counted for i < q
            q = tl.minimum(tl.maximum((bits - lo) // step, 0), NT)
            q = tl.where(ok, q, 0).to(tl.int32)
            hist += tl.histogram(q, HB)
        b = tl.arange(0, HB)
        above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)  # #(q > b)
        tl.atomic_add(out + b, -above.to(tl.int64), mask=(b < NT) & (above > 0)
                      & (lo + (b + 1).to(tl.int64) * step < hi))


@triton.jit(do_not_specialize=["k", "need", "log_n", "log_k"])
def _ma_rows_kernel(row_ptr, col_ptr, cs_ptr, act_ptr, cnt_ptr, tot_ptr, tstar_ptr,
                    cgt_ptr, cge_ptr, agt_ptr, aeq_ptr, astart_ptr, m, n, k, need, n_rounds,
                    log_n, log_k, n_row_progs, n_act_progs, NT: tl.constexpr,
                    BR: tl.constexpr, BA: tl.constexpr):
    """t* = the replayed bracket's lo. Row programs: cgt/cge[r] = #c with product >/≥ t*,
    astart[r] = first active position of row r (r ≤ m), tot += Σ cgt. Active programs:
    agt/aeq[row] += active products >/= t*, tot -= #active > t*."""
    pid = tl.program_id(0)
    lo = _ma_bracket(cnt_ptr, need, n_rounds, NT)[0]
    t_eq = lo.to(tl.int32).to(tl.float32, bitcast=True)
    if pid < n_row_progs:
        if pid == 0:
            tl.store(tstar_ptr, lo)
        is_inf = lo >= 0x7F800000  # nothing exceeds t* = +inf
        t_gt = tl.minimum(lo + 1, 0x7F800000).to(tl.int32).to(tl.float32, bitcast=True)
        tot = lo * 0
        for rb in range(pid, tl.cdiv(m + 1, BR), n_row_progs):
            r = rb * BR + tl.arange(0, BR)
            in_m = r < m
            a = tl.load(row_ptr + r, mask=in_m, other=0.0)
            zero = tl.zeros((BR,), dtype=tl.int32)
            p_ge = _first_ge(a, zero.to(tl.float32) + t_eq, cs_ptr, zero, zero + n, log_n)
            p_gt = _first_ge(a, zero.to(tl.float32) + t_gt, cs_ptr, p_ge, zero + n, log_n)
            c_gt = tl.where(is_inf, 0, n - p_gt)
            c_ge = n - p_ge
            tl.store(cgt_ptr + r, c_gt.to(tl.int64), mask=in_m)
            tl.store(cge_ptr + r, c_ge.to(tl.int64), mask=in_m)
            tot += tl.sum(tl.where(in_m, c_gt, 0).to(tl.int64), axis=0)
            # lower bound of r·n in the sorted active indices
            target = r.to(tl.int64) * n
            alo = tl.zeros((BR,), dtype=tl.int64)
            alo = _lower_bound(act_ptr, target, alo, alo + k, log_k)
            tl.store(astart_ptr + r, alo, mask=r <= m)
        tl.atomic_add(tot_ptr, tot)
    else:
        sub = lo * 0
        for ab in range(pid - n_row_progs, tl.cdiv(k, BA), n_act_progs):
            j = (ab * BA + tl.arange(0, BA)).to(tl.int64)
            r, p, ok = _active_products(act_ptr, row_ptr, col_ptr, j, k, n)
            gt = ok & (p > t_eq)
            eq = ok & (p == t_eq)
            tl.atomic_add(agt_ptr + r, gt.to(tl.int64), mask=gt)
            tl.atomic_add(aeq_ptr + r, eq.to(tl.int64), mask=eq)
            sub += tl.sum(gt.to(tl.int64), axis=0)
        tl.atomic_add(tot_ptr, -sub)


@triton.jit(do_not_specialize=["num_grow"])
def _ma_offsets_kernel(cgt_ptr, cge_ptr, agt_ptr, aeq_ptr, tot_ptr, off_ptr, take_ptr,
                       rows_ptr, n_rows_ptr, m, num_grow, BLOCK: tl.constexpr):
    """One program. Row r takes its free products > t* and the ties left over by rows < r
    (the first need_tie free ties in flat order); off[r] = exclusive prefix sum of sel[r] (the
    row's number of chosen positions); rows[:n_rows] = the rows with sel > 0, ascending.
    In-block sums are int32: the launcher keeps BLOCK·n below 2^31."""
    need_tie = num_grow - tl.load(tot_ptr)
    carry_free = need_tie * 0  # free ties of the rows before the block
    carry_sel = need_tie * 0
    carry_rows = need_tie * 0
    for r0 in range(0, m, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        ok = r < m
        c_gt = tl.load(cgt_ptr + r, mask=ok, other=0)
        s_gt = (c_gt - tl.load(agt_ptr + r, mask=ok, other=0)).to(tl.int32)
        free = (tl.load(cge_ptr + r, mask=ok, other=0) - c_gt
                - tl.load(aeq_ptr + r, mask=ok, other=0)).to(tl.int32)
        inc_free = tl.cumsum(free, axis=0)
        inc_gt = tl.cumsum(s_gt, axis=0)
        # ties taken by rows ≤ r (inclusive) and < r: the first need_tie free ties overall
        rem = tl.minimum(tl.maximum(need_tie - carry_free, 0), 2**31 - 1).to(tl.int32)
        t_inc = tl.minimum(inc_free, rem)
        take = t_inc - tl.minimum(inc_free - free, rem)
        sel = s_gt + take
        tl.store(off_ptr + r, carry_sel + (inc_gt + t_inc - sel), mask=ok)
        tl.store(take_ptr + r, take.to(tl.int64), mask=ok)
        busy = ok & (sel > 0)
        inc_rows = tl.cumsum(busy.to(tl.int32), axis=0)
        tl.store(rows_ptr + carry_rows + inc_rows - 1, r.to(tl.int64), mask=busy)
        carry_free += tl.sum(free, axis=0)
        carry_sel += tl.sum(sel, axis=0)
        carry_rows += tl.sum(busy.to(tl.int32), axis=0)
    tl.store(n_rows_ptr, carry_rows)


@triton.jit
def _ma_emit_kernel(row_ptr, col_ptr, act_ptr, tstar_ptr, off_ptr, take_ptr, rows_ptr,
                    n_rows_ptr, astart_ptr, out_ptr, n, n_progs, BC: tl.constexpr):
    """Persistent: each row r in rows[:n_rows] (one program per row at a time) writes its
    chosen flat indices, ascending, at out[off[r]:]: its free products > t* and its first
    take[r] free ties. BC < 2^16 (packed int32 prefix sums)."""
    t = tl.load(tstar_ptr).to(tl.int32).to(tl.float32, bitcast=True)
    for i in range(tl.program_id(0), tl.load(n_rows_ptr).to(tl.int32), n_progs):
        _ma_emit_row(row_ptr, col_ptr, act_ptr, off_ptr, take_ptr, astart_ptr, out_ptr,
                     tl.load(rows_ptr + i), t, n, BC)


@triton.jit
def _ma_emit_row(row_ptr, col_ptr, act_ptr, off_ptr, take_ptr, astart_ptr, out_ptr, r, t, n,
                 BC: tl.constexpr):
    """Row r: scan the columns in order, recompute the products, skip active columns (binary
    search in the row's segment of the sorted active indices) and write the chosen ones."""
    a = tl.load(row_ptr + r)
    base = tl.load(off_ptr + r)
    take = tl.load(take_ptr + r)
    s = tl.load(astart_ptr + r)
    e = tl.load(astart_ptr + r + 1)
    nbits = _bit_length((e - s).to(tl.int32))
    carry_sel = base * 0
    carry_eq = base * 0
    for c0 in range(0, n, BC):
        c = c0 + tl.arange(0, BC)
        inb = c < n
        p = a * tl.load(col_ptr + c, mask=inb, other=0.0)
        gt = inb & (p > t)
        eq = inb & (p == t)
        flat = r * n + c
        lo = tl.zeros((BC,), dtype=tl.int32) + s.to(tl.int32)
        lo = _lower_bound(act_ptr, flat, lo, tl.zeros((BC,), dtype=tl.int32) + e.to(tl.int32),
                          nbits)
        act = (lo < e) & (tl.load(act_ptr + lo, mask=lo < e, other=-1).to(tl.int64) == flat)
        gtf = gt & (~act)
        eqf = eq & (~act)
        inc = tl.cumsum(gtf.to(tl.int32) + (eqf.to(tl.int32) << 16), axis=0)
        inc_gt = inc & 0xFFFF
        inc_eq = inc >> 16
        rem = tl.minimum(tl.maximum(take - carry_eq, 0), BC).to(tl.int32)  # ties still due
        chosen = gtf | (eqf & (inc_eq <= rem))
        pos = base + carry_sel + (inc_gt + tl.minimum(inc_eq, rem) - 1)
        tl.store(out_ptr + pos, flat, mask=chosen)
        n_gt = tl.sum(gtf.to(tl.int32), axis=0)
        n_eq = tl.sum(eqf.to(tl.int32), axis=0)
        carry_eq += n_eq
        carry_sel += n_gt + tl.minimum(n_eq, rem)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def ma_select(row_acc: torch.Tensor, col_acc: torch.Tensor, active_idx: torch.Tensor,
              num_grow: int) -> torch.Tensor:
    """Exact SpIEL-MA growth: sorted int64 [num_grow] flat indices (see module docstring).

    row_acc: [m] and col_acc: [n] non-negative, finite fp32 accumulators (other float dtypes
    are converted to fp32); active_idx: [k] int32/int64 sorted unique flat indices into the
    row-major [m, n] weight (excluded from the choice). The launcher trusts these invariants
    (the public `spft.ops.grow.ma_select` checks them); it checks only shapes and num_grow.
    """
    if row_acc.dim() != 1 or col_acc.dim() != 1:
        raise ValueError("row_acc and col_acc must be 1-D")
    if active_idx.dim() != 1 or active_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"active_idx must be a 1-D int32/int64 tensor, got "
                        f"{active_idx.dtype} with shape {tuple(active_idx.shape)}")
    m, n = row_acc.numel(), col_acc.numel()
    k = active_idx.numel()
    if not 0 <= num_grow <= m * n - k:
        raise ValueError(f"num_grow must be in [0, {m * n - k}] (non-active positions), "
                         f"got {num_grow}")
    device = row_acc.device
    out = torch.empty(num_grow, dtype=torch.long, device=device)
    if num_grow == 0:
        return out
    row = row_acc.float().contiguous()
    col = col_acc.float().contiguous()
    active = active_idx.contiguous() if k else torch.zeros(1, dtype=torch.long, device=device)
    cs = torch.sort(col).values
    # int64 scratch, zeroed: [counts NT·ROUNDS | tot | t* | #busy rows | agt m | aeq m | cgt m |
    # cge m | off m | take m | busy rows m | astart m+1]
    nt = MA_NT * MA_ROUNDS
    ws = torch.zeros(nt + 3 + 8 * m + 1, dtype=torch.long, device=device)
    cnt, tot, tstar, n_busy = ws[:nt], ws[nt:nt + 1], ws[nt + 1:nt + 2], ws[nt + 2:nt + 3]
    agt, aeq, cgt, cge, off, take, busy = ws[nt + 3:nt + 3 + 7 * m].view(7, m)
    astart = ws[nt + 3 + 7 * m:]
    log_n = n.bit_length()
    log_k = k.bit_length()
    sms = _num_sms(device)
    BR, BA = 8, 1024
    n_row = min(triton.cdiv(m, BR), 4 * sms)
    n_act = min(triton.cdiv(k, BA), 4 * sms)
    for rnd in range(MA_ROUNDS):
        _ma_count_kernel[(n_row + n_act,)](
            row, col, cs, active, cnt, m, n, k, num_grow, rnd, log_n, n_row, n_act,
            NT=MA_NT, HB=_MA_HB, BR=BR, BA=BA, num_warps=8)
    BR2 = 128
    n_row2 = min(triton.cdiv(m + 1, BR2), 2 * sms)
    _ma_rows_kernel[(n_row2 + n_act,)](
        row, col, cs, active, cnt, tot, tstar, cgt, cge, agt, aeq, astart, m, n, k, num_grow,
        MA_ROUNDS, log_n, log_k, n_row2, n_act, NT=MA_NT, BR=BR2, BA=BA, num_warps=4)
    block = min(4096, 1 << max(0, ((2**31 - 1) // n).bit_length() - 1))  # BLOCK·n < 2^31
    _ma_offsets_kernel[(1,)](cgt, cge, agt, aeq, tot, off, take, busy, n_busy, m, num_grow,
                             BLOCK=block, num_warps=16 if block >= 2048 else 4)
    bc = min(1024, triton.next_power_of_2(n))
    n_emit = min(m, 6 * sms)
    _ma_emit_kernel[(n_emit,)](row, col, active, tstar, off, take, busy, n_busy, astart, out, n,
                               n_emit, BC=bc, num_warps=4)
    return out


# --------------------------------------------------------------------------- SpIEL-AG
@triton.jit
def _grad_topk_tiles_kernel(
    dy_ptr, x_ptr, val_ptr, pos_ptr, T, M, N,
    stride_dy_t, stride_dy_m, stride_x_t, stride_x_n,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    TOPC: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    n_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(M, n_pid_n, BM, GROUP_M)
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
