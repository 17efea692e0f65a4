"""Fused multi-tensor optimizer steps for SpIEL sparse deltas: one launch for all tensors.

Layout (chosen over one flat buffer of all deltas, because autograd hands every Parameter its
own `.grad` tensor and the controller replaces index tensors at each reselection): a packed
**pointer table** `meta` [T, 16] int64 holds, per tensor, the addresses of its dv, grad, idx,
state and (merged mode) weight/base buffers plus its sizes; `hyper` [T, 8] fp32 holds its
hyperparameters (runtime values, never constexpr: lr changes every step); the cumulative
program counts per tensor follow the table, and each program finds its (tensor, block) by a
binary search over them (no per-block host table). SM3's accumulator blocks come first in each
tensor, then its delta blocks (folding early lets more delta atomics be skipped). Tensors of
one launch share the dtypes of dv, grad, idx, state and weight (the launcher groups by that
signature, and SM3 by its int32 index math: one launch in the common case). The kernels cast
table entries to typed pointers, so every tensor must stay alive and must not be resized during
the call.

SM3 without read-after-update races, in one launch: each tensor's accumulators live in a
[2, m] (rows) and [2, n] (columns) ping-pong buffer. A step reads nu from the `old` half (never
written during the step) and atomically maxes into the `new` half, which holds the accumulator
of two steps ago. Accumulators never decrease, so max(acc_{t-2}, acc_{t-1}, nus) equals
max(acc_{t-1}, nus): the accumulator blocks fold `old` into `new` with the same atomic max, in any
order relative to the delta blocks. Values that do not beat the old accumulator need no atomic
(the fold covers them); for the rest a plain load of `new` first skips atomics that cannot raise
the value (values only grow during the step, so a stale read is safe). Floats are non-negative,
so the max is an int32 atomic on their bit patterns. Rows need one atomic per run of equal rows
in a block (indices are sorted); columns one per surviving delta. Index math runs in int32 when
every tensor of the launch has int32 indices and (m + 2)·n < 2**31 (int64 division costs more
than the rest of the delta's work).

Host time: a Triton launch costs more than the whole step of a 1%-dense 4096×11008 matrix, so
`capture_fused_sparse_sm3` records a plan's launch as a CUDA graph for the optimizers to replay.

Merged layers (`base` pointer non-zero): the same program then writes
`W[idx] = round(base + dv)` (the refresh of `spft.ops.sparse_delta_refresh_`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NF = 16  # int64 fields per tensor in `meta`
NH = 8  # fp32 hyperparameters per tensor in `hyper`
# meta fields
F_DV, F_GRAD, F_IDX, F_K, F_NCOLS = 0, 1, 2, 3, 4
F_ROW_OLD, F_ROW_NEW, F_COL_OLD, F_COL_NEW, F_M, F_NACC = 5, 6, 7, 8, 9, 10
F_S1, F_S2, F_STEP, F_W, F_BASE = 11, 12, 13, 14, 15
# hyper fields
H_LR, H_WD, H_EPS, H_B1, H_B2 = 0, 1, 2, 3, 4

DEFAULT_BLOCK = 1024
SM3_BLOCK = 512  # measured on H100: 512/4 warps beat 1024/4, 1024/8, 2048 and 4096
SM3_NUM_WARPS = 4
_I32_LIMIT = 2**31


@triton.jit
def _typed(meta, field, ref):
    return tl.load(meta + field).to(tl.pointer_type(ref.dtype.element_ty))


@triton.jit
def _f32(meta, field):
    return tl.load(meta + field).to(tl.pointer_type(tl.float32))


@triton.jit
def _i32(meta, field):
    return tl.load(meta + field).to(tl.pointer_type(tl.int32))


@triton.jit
def _max_into(new_f, new_i, offs, val, mask):
    # Callers mask out values that cannot beat the old accumulator (the fold raises `new` to
    # it anyway); the plain load then skips values already beaten in `new` (values only grow
    # during the step, so a stale read is safe). The rest: int32 atomic max on the bit
    # pattern (val >= 0).
    cur = tl.load(new_f + offs, mask=mask, other=0.0)
    tl.atomic_max(new_i + offs, val.to(tl.int32, bitcast=True), mask=mask & (val > cur),
                  sem="relaxed")


@triton.jit
def _refresh(meta, j, i, p, act, w_ref):
    if tl.load(meta + 14) != 0:
        w = _typed(meta, 14, w_ref)
        base = _f32(meta, 15)
        b = tl.load(base + j, mask=act, other=0.0)
        tl.store(w + i, (b + p).to(w_ref.dtype.element_ty), mask=act)


@triton.jit
def _locate(meta_ptr, n_tensors, log_t, BLOCK: tl.constexpr):
    """This program's (tensor, block): a binary search over the cumulative program counts
    stored after the [T, 16] table (`cum[t]` = first program of tensor t, cum[T] = total).
    A tensor's first programs are its accumulator blocks (returned as -(b + 1)), then its
    delta blocks."""
    pid = tl.program_id(0).to(tl.int64)
    cum = meta_ptr + n_tensors * 16
    lo = pid * 0
    hi = lo + n_tensors
    for _ in range(log_t):
        mid = (lo + hi) // 2
        go_right = tl.load(cum + mid + 1) <= pid
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    b = pid - tl.load(cum + lo)
    # accumulator blocks first: folding old into new early lets most delta atomics be skipped
    row = meta_ptr + lo * 16
    na = (tl.load(row + 9) + tl.load(row + 10) + BLOCK - 1) // BLOCK
    blk = tl.where(b < na, -b - 1, b - na)
    return lo, blk


@triton.jit
def _seg_max(r1, v1, r2, v2):
    # running max within runs of equal (non-decreasing) row keys
    return r2, tl.where(r1 == r2, tl.maximum(v1, v2), v2)


@triton.jit
def _fused_sparse_sm3_kernel(meta_ptr, hyper_ptr, n_tensors, log_t, flip, dv_ref, g_ref,
                             idx_ref, w_ref, BLOCK: tl.constexpr, IDX32: tl.constexpr):
    # flip = 1 swaps the old/new halves of every tensor (a cached table, one step later).
    # IDX32: int32 indices and every (m + 2)·n < 2**31, so all index math runs in int32.
    t, blk = _locate(meta_ptr, n_tensors, log_t, BLOCK)
    meta = meta_ptr + t * 16
    hyp = hyper_ptr + t * 8
    has_cols = tl.load(meta + 7) != 0
    if blk >= 0:
        k = tl.load(meta + 3)
        n_cols = tl.load(meta + 4)
        if IDX32:
            k = k.to(tl.int32)
            n_cols = n_cols.to(tl.int32)
            j = blk.to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
        else:
            j = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        act = j < k
        idx_p = _typed(meta, 2, idx_ref)
        i = tl.load(idx_p + j, mask=act, other=0)
        if not IDX32:
            i = i.to(tl.int64)
        r = i // n_cols
        c = i - r * n_cols
        g = tl.load(_typed(meta, 1, g_ref) + j, mask=act, other=0.0).to(tl.float32)
        ra = tl.load(_f32(meta, 5 + flip) + r, mask=act, other=0.0)
        if has_cols:
            ca = tl.load(_f32(meta, 7 + flip) + c, mask=act, other=0.0)
            nu = tl.minimum(ra, ca) + g * g
            _max_into(_f32(meta, 8 - flip), _i32(meta, 8 - flip), c, nu, act & (nu > ca))
        else:
            nu = ra + g * g
        # Indices are sorted, so rows come in runs: one atomic per run and block, at the run's
        # last element (the next index lies at or past the next row's start).
        rkey = tl.where(act, r, -1)
        _, run_max = tl.associative_scan((rkey, nu), 0, _seg_max)
        nxt = j + 1
        i_next = tl.load(idx_p + nxt, mask=nxt < k, other=0)
        if not IDX32:
            i_next = i_next.to(tl.int64)
        last = act & ((nxt >= k) | (i_next >= (r + 1) * n_cols)
                      | (tl.arange(0, BLOCK) == BLOCK - 1))
        _max_into(_f32(meta, 6 - flip), _i32(meta, 6 - flip), r, run_max, last & (run_max > ra))
        lr = tl.load(hyp + 0)
        wd = tl.load(hyp + 1)
        eps = tl.load(hyp + 2)
        beta = tl.load(hyp + 3)
        u = g * tl.math.rsqrt(nu + eps)
        if tl.load(meta + 11) != 0:
            mom = _f32(meta, 11)
            mv = tl.load(mom + j, mask=act, other=0.0)
            u = (1 - beta) * u + beta * mv
            tl.store(mom + j, u, mask=act)
        dvp = _typed(meta, 0, dv_ref)
        p = tl.load(dvp + j, mask=act, other=0.0).to(tl.float32)
        p = p * (1 - lr * wd) - lr * u
        tl.store(dvp + j, p.to(dv_ref.dtype.element_ty), mask=act)
        _refresh(meta, j, i, p.to(dv_ref.dtype.element_ty).to(tl.float32), act, w_ref)
    else:
        e = (-blk - 1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = tl.load(meta + 9)
        is_row = e < m
        old = tl.load(_f32(meta, 5 + flip) + e, mask=is_row, other=0.0)
        _max_into(_f32(meta, 6 - flip), _i32(meta, 6 - flip), e, old, is_row)
        if has_cols:
            n = tl.load(meta + 10)
            ec = e - m
            is_col = (ec >= 0) & (ec < n)
            ec = tl.where(is_col, ec, 0)
            oldc = tl.load(_f32(meta, 7 + flip) + ec, mask=is_col, other=0.0)
            _max_into(_f32(meta, 8 - flip), _i32(meta, 8 - flip), ec, oldc, is_col)


@triton.jit
def _fused_sparse_adamw_kernel(meta_ptr, hyper_ptr, n_tensors, log_t, dv_ref, g_ref, idx_ref,
                               s_ref, w_ref, BLOCK: tl.constexpr):
    t, blk = _locate(meta_ptr, n_tensors, log_t, BLOCK)
    meta = meta_ptr + t * 16
    hyp = hyper_ptr + t * 8
    k = tl.load(meta + 3)
    j = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    act = j < k
    lr = tl.load(hyp + 0)
    wd = tl.load(hyp + 1)
    eps = tl.load(hyp + 2)
    b1 = tl.load(hyp + 3)
    b2 = tl.load(hyp + 4)
    g = tl.load(_typed(meta, 1, g_ref) + j, mask=act, other=0.0).to(tl.float32)
    stp = _i32(meta, 13)
    s = tl.load(stp + j, mask=act, other=0) + 1
    tl.store(stp + j, s, mask=act)
    m_ptr = _typed(meta, 11, s_ref)
    v_ptr = _typed(meta, 12, s_ref)
    m = b1 * tl.load(m_ptr + j, mask=act, other=0.0).to(tl.float32) + (1 - b1) * g
    v = b2 * tl.load(v_ptr + j, mask=act, other=0.0).to(tl.float32) + (1 - b2) * g * g
    m = m.to(s_ref.dtype.element_ty)
    v = v.to(s_ref.dtype.element_ty)
    tl.store(m_ptr + j, m, mask=act)
    tl.store(v_ptr + j, v, mask=act)
    sf = s.to(tl.float32)
    bc1 = 1 - tl.exp2(sf * tl.log2(b1))
    bc2 = 1 - tl.exp2(sf * tl.log2(b2))
    upd = (m.to(tl.float32) / bc1) / (tl.sqrt(v.to(tl.float32) / bc2) + eps)
    dvp = _typed(meta, 0, dv_ref)
    p = tl.load(dvp + j, mask=act, other=0.0).to(tl.float32)
    p = (p * (1 - lr * wd) - lr * upd).to(dv_ref.dtype.element_ty)
    tl.store(dvp + j, p, mask=act)
    if tl.load(meta + 14) != 0:
        i = tl.load(_typed(meta, 2, idx_ref) + j, mask=act, other=0).to(tl.int64)
        _refresh(meta, j, i, p.to(tl.float32), act, w_ref)


# --------------------------------------------------------------------------- host side
def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _upload(values: list, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype).view(shape)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_meta(meta: list[int], programs: list[int], device: torch.device
                 ) -> tuple[torch.Tensor, int]:
    """Append the cumulative program counts to the table and upload it (one copy)."""
    cum = [0]
    for p in programs:
        cum.append(cum[-1] + p)
    return _upload(meta + cum, torch.int64, device, (-1,)), cum[-1]


def _check_1d(name: str, t: torch.Tensor, k: int, device: torch.device) -> None:
    if t.dim() != 1 or t.numel() != k or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name} must be a contiguous 1-D tensor of {k} elements on {device}, "
                         f"got shape {tuple(t.shape)} on {t.device}")


def _signature(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t.dtype for t in tensors)


def prepare_fused_sparse_sm3(dvs: list[torch.Tensor], grads: list[torch.Tensor],
                             idxs: list[torch.Tensor], row_accs: list[torch.Tensor],
                             col_accs: list[torch.Tensor | None],
                             momentum_buffers: list[torch.Tensor | None],
                             weights: list[torch.Tensor | None],
                             base_values: list[torch.Tensor | None], n_cols: list[int],
                             parities: list[int], lrs: list[float], weight_decays: list[float],
                             epss: list[float], momentums: list[float],
                             block: int = SM3_BLOCK) -> list:
    """Validate and upload the tables of one fused step (run it with
    `launch_fused_sparse_sm3`). The step, in place, for every tensor t: the sparse SM3 step
    of `spft.reference.optim.sm3_sparse_step_` on dvs[t] ([k_t], fp32/bf16/fp16) with
    grads[t] ([k_t]) at sorted unique idxs[t] ([k_t] int32/int64, flat into [m_t, n_cols[t]]).

    row_accs[t]: [2, m_t] fp32 ping-pong (read half `parities[t]`, write the other);
    col_accs[t]: [2, n_cols[t]] fp32 or None (row cover only); momentum_buffers[t]: [k_t] fp32 or
    None (no momentum); weights[t]/base_values[t]: merged weight [m_t, n_cols[t]] and fp32
    W0[idx] [k_t], or None. One launch per dtype signature.
    """
    n = len(dvs)
    lists = (grads, idxs, row_accs, col_accs, momentum_buffers, weights, base_values, n_cols,
             parities, lrs, weight_decays, epss, momentums)
    if any(len(x) != n for x in lists):
        raise ValueError("all per-tensor lists must have one entry per dv")
    groups: dict[tuple, list[int]] = {}
    for t in range(n):
        dv, idx = dvs[t], idxs[t]
        k = dv.numel()
        dev = dv.device
        _check_1d("grads[t]", grads[t], k, dev)
        _check_1d("idxs[t]", idx, k, dev)
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"idxs[{t}] must be int32 or int64, got {idx.dtype}")
        ra = row_accs[t]
        if ra.dim() != 2 or ra.shape[0] != 2 or ra.dtype != torch.float32 or \
                not ra.is_contiguous():
            raise ValueError(f"row_accs[{t}] must be a contiguous fp32 [2, m] tensor")
        ca = col_accs[t]
        if ca is not None and (ca.shape != (2, n_cols[t]) or ca.dtype != torch.float32
                               or not ca.is_contiguous()):
            raise ValueError(f"col_accs[{t}] must be a contiguous fp32 [2, {n_cols[t]}] tensor")
        if momentum_buffers[t] is not None:
            _check_1d("momentum_buffers[t]", momentum_buffers[t], k, dev)
        w = weights[t]
        if w is not None and (base_values[t] is None or not w.is_contiguous()):
            raise ValueError(f"weights[{t}] must be contiguous and come with base_values")
        m = ra.shape[1]
        idx32 = idx.dtype == torch.int32 and (m + 2) * n_cols[t] < _I32_LIMIT
        key = (*_signature(dv, grads[t], idx, w), idx32)
        groups.setdefault(key, []).append(t)
    return [_prepare_sm3(members, dvs, grads, idxs, row_accs, col_accs, momentum_buffers,
                         weights, base_values, n_cols, parities, lrs, weight_decays, epss,
                         momentums, block, key[-1]) for key, members in groups.items()]


def launch_fused_sparse_sm3(plan: list, flip: int = 0) -> None:
    """Run a plan of `prepare_fused_sparse_sm3`. `flip=1` swaps every tensor's old/new
    accumulator halves, so a plan cached at step s serves steps s+1, s+2, ... with flip =
    (steps since s) % 2, as long as no tensor was replaced, resized or re-pointed."""
    flip = int(flip) & 1
    for meta_t, hyper_t, n, total, refs, _, _, consts in plan:
        if total:
            _fused_sparse_sm3_kernel[(total,)](meta_t, hyper_t, n, max(1, n.bit_length()), flip,
                                               *refs, **consts)


def capture_fused_sparse_sm3(plan: list, flip: int) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph of `launch_fused_sparse_sm3(plan, flip)` (replay it on any stream), or None
    where graphs do not apply: CPU tensors, the Triton interpreter, an empty plan, or a capture
    already in progress (then launch directly, into that capture). The plan must have been
    launched once (the kernel compiled) and its tables must stay as they are: hyperparameters
    change in place (`refresh_plan_hyperparameters`), so a graph sees them."""
    if not plan or plan[0][0].device.type != "cuda" or \
            os.environ.get("TRITON_INTERPRET", "0") == "1" or \
            torch.cuda.is_current_stream_capturing():
        return None
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(plan[0][0].device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # thread_local: other threads (data loaders) may keep calling CUDA meanwhile
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            launch_fused_sparse_sm3(plan, flip)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def refresh_plan_hyperparameters(plan: list, *columns: list[float]) -> None:
    """Re-upload only the hyperparameters of a plan (e.g. after an lr scheduler step).

    columns: per-tensor lists in the order of the prepare call (SM3: lrs, weight_decays,
    epss, momentums; AdamW: lrs, weight_decays, epss, beta1s, beta2s).
    """
    for entry in plan:
        hyper: list[float] = []
        for t in entry[6]:
            vals = [float(c[t]) for c in columns]
            hyper += vals + [0.0] * (NH - len(vals))
        # in place: captured graphs of the plan read this buffer
        new = torch.tensor(hyper, dtype=torch.float32).view(-1, NH)
        if entry[1].device.type == "cuda":
            new = new.pin_memory()
        entry[1].copy_(new, non_blocking=True)


def fused_sparse_sm3_(*args, **kwargs) -> None:
    """`launch_fused_sparse_sm3(prepare_fused_sparse_sm3(...))`: one step (same arguments)."""
    launch_fused_sparse_sm3(prepare_fused_sparse_sm3(*args, **kwargs))


def _prepare_sm3(members, dvs, grads, idxs, row_accs, col_accs, moms, weights, bases, n_cols,
                parities, lrs, wds, epss, momentums, block, idx32) -> list:
    meta: list[int] = []
    hyper: list[float] = []
    blocks = []
    for t in members:
        ra, ca = row_accs[t], col_accs[t]
        m = ra.shape[1]
        par = int(parities[t]) & 1
        rbase = ra.data_ptr()
        roff = m * 4
        cbase = _ptr(ca)
        coff = n_cols[t] * 4 if ca is not None else 0
        n_acc = n_cols[t] if ca is not None else 0
        k = dvs[t].numel()
        w = weights[t]
        meta += (dvs[t].data_ptr(), grads[t].data_ptr(), idxs[t].data_ptr(), k, n_cols[t],
                 rbase + par * roff, rbase + (1 - par) * roff,
                 cbase + par * coff if ca is not None else 0,
                 cbase + (1 - par) * coff if ca is not None else 0,
                 m, n_acc, _ptr(moms[t]), 0, 0, _ptr(w), _ptr(bases[t]) if w is not None else 0)
        hyper += (lrs[t], wds[t], epss[t], momentums[t], 0.0, 0.0, 0.0, 0.0)
        blocks.append(_cdiv(k, block) + _cdiv(m + n_acc, block))
    t0 = members[0]
    device = dvs[t0].device
    meta_t, total = _launch_meta(meta, blocks, device)
    hyper_t = _upload(hyper, torch.float32, device, (-1, NH))
    w_ref = weights[t0] if weights[t0] is not None else dvs[t0]
    consts = dict(BLOCK=block, IDX32=idx32, num_warps=SM3_NUM_WARPS)
    return [meta_t, hyper_t, len(members), total, (dvs[t0], grads[t0], idxs[t0], w_ref), block,
            members, consts]


def launch_fused_sparse_adamw(plan: list) -> None:
    """Run a plan of `prepare_fused_sparse_adamw` (reusable while no tensor is replaced)."""
    for meta_t, hyper_t, n, total, refs, block, _ in plan:
        if total == 0:
            continue
        _fused_sparse_adamw_kernel[(total,)](
            meta_t, hyper_t, n, max(1, n.bit_length()), *refs, BLOCK=block, num_warps=4)


def fused_sparse_adamw_(*args, **kwargs) -> None:
    """`launch_fused_sparse_adamw(prepare_fused_sparse_adamw(...))`: one step."""
    launch_fused_sparse_adamw(prepare_fused_sparse_adamw(*args, **kwargs))


def prepare_fused_sparse_adamw(dvs: list[torch.Tensor], grads: list[torch.Tensor],
                               exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                               steps: list[torch.Tensor], idxs: list[torch.Tensor],
                               weights: list[torch.Tensor | None],
                               base_values: list[torch.Tensor | None], lrs: list[float],
                               beta1s: list[float], beta2s: list[float], epss: list[float],
                               weight_decays: list[float], block: int = DEFAULT_BLOCK) -> list:
    """Validate and upload the tables of one fused step; the step, in place, for every tensor t:
    `spft.reference.optim.adamw_sparse_step_` on dvs[t] [k_t]
    with grads[t], state exp_avgs[t]/exp_avg_sqs[t] ([k_t] fp32 or bf16) and per-index
    steps[t] ([k_t] int32). idxs[t] ([k_t] int32/int64) is read only to refresh a merged
    weights[t] from base_values[t] (both None otherwise). One launch per dtype signature.
    """
    n = len(dvs)
    lists = (grads, exp_avgs, exp_avg_sqs, steps, idxs, weights, base_values, lrs, beta1s,
             beta2s, epss, weight_decays)
    if any(len(x) != n for x in lists):
        raise ValueError("all per-tensor lists must have one entry per dv")
    groups: dict[tuple, list[int]] = {}
    for t in range(n):
        k = dvs[t].numel()
        dev = dvs[t].device
        for name, x in (("grads", grads[t]), ("exp_avgs", exp_avgs[t]),
                        ("exp_avg_sqs", exp_avg_sqs[t]), ("steps", steps[t]),
                        ("idxs", idxs[t])):
            _check_1d(f"{name}[{t}]", x, k, dev)
        if steps[t].dtype != torch.int32:
            raise TypeError(f"steps[{t}] must be int32, got {steps[t].dtype}")
        if exp_avgs[t].dtype != exp_avg_sqs[t].dtype:
            raise TypeError(f"exp_avgs[{t}] and exp_avg_sqs[{t}] must share a dtype")
        if weights[t] is not None and base_values[t] is None:
            raise ValueError(f"weights[{t}] needs base_values[{t}]")
        key = _signature(dvs[t], grads[t], idxs[t], exp_avgs[t], weights[t])
        groups.setdefault(key, []).append(t)
    plan = []
    for members in groups.values():
        meta: list[int] = []
        hyper: list[float] = []
        blocks = []
        for t in members:
            k = dvs[t].numel()
            w = weights[t]
            meta += (dvs[t].data_ptr(), grads[t].data_ptr(), idxs[t].data_ptr(), k, 0,
                     0, 0, 0, 0, 0, 0, exp_avgs[t].data_ptr(), exp_avg_sqs[t].data_ptr(),
                     steps[t].data_ptr(), _ptr(w), _ptr(base_values[t]) if w is not None else 0)
            hyper += (lrs[t], weight_decays[t], epss[t], beta1s[t], beta2s[t], 0.0, 0.0, 0.0)
            blocks.append(_cdiv(k, block))
        t0 = members[0]
        device = dvs[t0].device
        meta_t, total = _launch_meta(meta, blocks, device)
        hyper_t = _upload(hyper, torch.float32, device, (-1, NH))
        w_ref = weights[t0] if weights[t0] is not None else dvs[t0]
        plan.append([meta_t, hyper_t, len(members), total,
                     (dvs[t0], grads[t0], idxs[t0], exp_avgs[t0], w_ref), block, members])
    return plan
