"""Gradient of the sparse deltas: a sampled dense-dense matmul (SDDMM) that never forms dW.

    grad[j] = Σ_t dy[t, r_j] · x[t, c_j],   r_j = idx_j // in,  c_j = idx_j % in

Two strategies, both reading `dy` [T, out] and `x` [T, in] in the layout they are given (any
strides; no transpose pass):

* `tiles` (high density): a tensor-core GEMM per [BM, BN] tile of the virtual dW = dyᵀ x, with
  fp32 accumulation; the tile never leaves the SM. A searchsorted over per-(row, column-tile)
  boundaries gives each tile row its run of indices; the tile gathers them from registers along
  its columns (`tl.gather`, warp-local). Tiles that hold no index skip the GEMM. Cost ≈ one
  dense dW GEMM, minus the write of dW and the separate gather.
* `sampled` (low density): each program owns BI consecutive sorted indices and reduces
  dy[t, r_j]·x[t, c_j] over t on CUDA cores; it touches only the needed rows/columns, so its cost
  scales with k · T instead of out · in · T.

`idx` must be sorted ascending and unique; out-of-range indices are masked (their gradient is 0).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    # The Triton interpreter (CI, CPU) mis-multiplies bf16 operands in tl.dot; the kernels then
    # upcast to fp32 before the dot. Compiled kernels keep bf16 on the tensor cores.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"

# Below this density the sampled kernel is chosen by `strategy="auto"` (measured on the H100:
# see benchmarks/RESULTS.md).
SAMPLED_MAX_DENSITY = 0.0002


@triton.jit
def _tile_coords(M, n_col_tiles, BM: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share the x column tiles they read while in L2."""
    pid = tl.program_id(0)
    n_pid_m = tl.cdiv(M, BM)
    width = GROUP_M * n_col_tiles
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def _tile_index_runs(bounds_ptr, pid_m, pid_n, M, n_col_tiles, BM: tl.constexpr):
    """bounds[r, c] is the first position in idx of row r at or after column tile c, so the
    indices of tile (pid_m, pid_n) in row r are idx[lo_r:hi_r], sorted by column."""
    rm = pid_m * BM + tl.arange(0, BM)
    row_ok = rm < M
    b_ptrs = bounds_ptr + rm.to(tl.int64) * (n_col_tiles + 1) + pid_n
    lo = tl.load(b_ptrs, mask=row_ok, other=0)
    hi = tl.load(b_ptrs + 1, mask=row_ok, other=0)
    return rm, row_ok, lo, hi - lo


@triton.jit
def _gather_tile(acc, idx_ptr, out_ptr, lo, count, most, col0, N):
    """Write acc[r, idx_j % N - col0] to out[j] for the runs idx[lo_r : lo_r + count_r].

    One index per row per step, gathered along the tile's columns: warp-local in the MMA
    accumulator layout, so the tile never leaves registers."""
    for j in range(0, most):
        active = j < count
        i = tl.load(idx_ptr + lo + j, mask=active, other=0).to(tl.int64)
        c = tl.where(active, i % N - col0, 0).to(tl.int32)
        vals = tl.gather(acc, c[:, None], 1)
        tl.store(out_ptr + lo[:, None] + j, vals, mask=active[:, None])


@triton.jit
def _sparse_delta_grad_tiles_kernel(
    dy_ptr, x_ptr, idx_ptr, bounds_ptr, out_ptr,
    T, M, N, n_col_tiles,
    stride_dy_t, stride_dy_m, stride_x_t, stride_x_n,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, n_col_tiles, BM, GROUP_M)
    rm, row_ok, lo, count = _tile_index_runs(bounds_ptr, pid_m, pid_n, M, n_col_tiles, BM)
    most = tl.max(count, axis=0)
    if most > 0:
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = dy_ptr + rm[:, None].to(tl.int64) * stride_dy_m + rk[None, :] * stride_dy_t
        x_ptrs = x_ptr + rk[:, None] * stride_x_t + rn[None, :].to(tl.int64) * stride_x_n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(0, T, BK):
            t_ok = (t + rk) < T
            a = tl.load(a_ptrs, mask=row_ok[:, None] & t_ok[None, :], other=0.0)
            b = tl.load(x_ptrs, mask=t_ok[:, None] & (rn[None, :] < N), other=0.0)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BK * stride_dy_t
            x_ptrs += BK * stride_x_t
        _gather_tile(acc, idx_ptr, out_ptr, lo, count, most, pid_n * BN, N)


@triton.jit
def _sparse_delta_grad_tiles_tma_kernel(
    dy_desc, x_desc, idx_ptr, bounds_ptr, out_ptr,
    T, M, N, n_col_tiles,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Same as the pointer kernel, with dy/x tiles fetched by the Hopper bulk-copy engine (TMA
    descriptors over [T, out] and [T, in]; out-of-bounds rows read as zero)."""
    pid_m, pid_n = _tile_coords(M, n_col_tiles, BM, GROUP_M)
    _, _, lo, count = _tile_index_runs(bounds_ptr, pid_m, pid_n, M, n_col_tiles, BM)
    most = tl.max(count, axis=0)
    if most > 0:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(0, T, BK):
            a = dy_desc.load([t, pid_m * BM])
            b = x_desc.load([t, pid_n * BN])
            if UPCAST_DOT:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        _gather_tile(acc, idx_ptr, out_ptr, lo, count, most, pid_n * BN, N)


@triton.jit
def _sparse_delta_grad_sampled_kernel(
    dy_ptr, x_ptr, idx_ptr, out_ptr,
    k, T, M, N,
    stride_dy_t, stride_dy_m, stride_x_t, stride_x_n,
    BI: tl.constexpr, BT: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BI + tl.arange(0, BI)
    active = j < k
    i = tl.load(idx_ptr + j, mask=active, other=0).to(tl.int64)
    active = active & (i >= 0) & (i < M * N)
    r = tl.where(active, i // N, 0)
    c = tl.where(active, i % N, 0)
    rt = tl.arange(0, BT)
    a_ptrs = dy_ptr + rt[:, None] * stride_dy_t + (r * stride_dy_m)[None, :]
    b_ptrs = x_ptr + rt[:, None] * stride_x_t + (c * stride_x_n)[None, :]
    acc = tl.zeros((BI,), dtype=tl.float32)
    for t in range(0, T, BT):
        ok = ((t + rt) < T)[:, None] & active[None, :]
        a = tl.load(a_ptrs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=0)
        a_ptrs += BT * stride_dy_t
        b_ptrs += BT * stride_x_t
    tl.store(out_ptr + j, acc, mask=j < k)


def _tma_ok(t: torch.Tensor) -> bool:
    size = t.element_size()
    return (t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0)


def choose_strategy(k: int, out_features: int, in_features: int) -> str:
    density = k / max(1, out_features * in_features)
    return "sampled" if density <= SAMPLED_MAX_DENSITY else "tiles"


def sparse_delta_grad(dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, in_features: int,
                      strategy: str = "auto", out: torch.Tensor | None = None,
                      tile_config: tuple[int, int, int, int] | None = None,
                      num_warps: int = 8, num_stages: int | None = None,
                      use_tma: bool | None = None) -> torch.Tensor:
    """Gradient of the deltas at `idx` only; returns fp32 [k].

    dy: [T, out] and x: [T, in], fp16/bf16/fp32, one dtype, any strides; idx: [k] int32/int64,
    sorted ascending, unique. strategy: "auto" | "tiles" | "sampled". tile_config
    (BM, BN, BK, GROUP_M), num_warps and num_stages tune the tiles kernel (defaults by dtype);
    use_tma (default:
    on Hopper for 16-bit dy/x with unit column stride and 16-byte aligned rows) fetches tiles
    with TMA descriptors instead of pointer loads.
    """
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy [T, out] and x [T, in] must be 2-D with equal T, got "
                         f"{tuple(dy.shape)} and {tuple(x.shape)}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, expected in_features={in_features}")
    if dy.dtype != x.dtype or dy.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dy and x must share a dtype in {SUPPORTED_DTYPES}, got {dy.dtype} and "
                        f"{x.dtype}")
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1 or not idx.is_contiguous():
        raise TypeError(f"idx must be a contiguous 1-D int32/int64 tensor, got {idx.dtype}")
    if not (dy.device == x.device == idx.device):
        raise ValueError("dy, x and idx must be on one device")
    T, M = dy.shape
    N = in_features
    k = idx.numel()
    if out is None:
        out = torch.empty(k, dtype=torch.float32, device=dy.device)
    if k == 0:
        return out
    if T == 0:
        return out.zero_()
    if strategy == "auto":
        strategy = choose_strategy(k, M, N)
    if strategy == "tiles":
        # Shared memory per stage is (BM + BN)·BK·bytes: fp32 needs smaller tiles (H100 sweep).
        wide = dy.element_size() == 4
        BM, BN, BK, GROUP_M = tile_config or ((128, 128, 32, 8) if wide else (256, 128, 64, 8))
        num_stages = num_stages or (3 if wide else 4)
        n_col_tiles = triton.cdiv(N, BN)
        # One searchsorted over M·(n_col_tiles+1) tile boundaries: O(M·N/BN) int32, ~1/BN of
        # a weight, never a dense gradient.
        rows = torch.arange(M, device=idx.device, dtype=torch.int64)[:, None] * N
        cols = torch.arange(n_col_tiles + 1, device=idx.device, dtype=torch.int64) * BN
        starts = (rows + cols.clamp_(max=N)[None, :]).view(-1)
        bounds = torch.searchsorted(idx, starts.to(idx.dtype), out_int32=True)
        grid = (triton.cdiv(M, BM) * n_col_tiles,)
        flags = dict(BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M,
                     UPCAST_DOT=interpreting() and dy.dtype == torch.bfloat16,
                     INPUT_PRECISION="ieee" if dy.dtype == torch.float32 else "tf32",
                     num_warps=num_warps, num_stages=num_stages)
        if use_tma is None:
            use_tma = dy.is_cuda and dy.dtype != torch.float32 and _tma_ok(dy) and _tma_ok(x) \
                and torch.cuda.get_device_capability(dy.device)[0] >= 9
        if use_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor
            dy_desc = TensorDescriptor.from_tensor(dy, [BK, BM])
            x_desc = TensorDescriptor.from_tensor(x, [BK, BN])
            _sparse_delta_grad_tiles_tma_kernel[grid](
                dy_desc, x_desc, idx, bounds, out, T, M, N, n_col_tiles, **flags)
        else:
            _sparse_delta_grad_tiles_kernel[grid](
                dy, x, idx, bounds, out, T, M, N, n_col_tiles,
                dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), **flags)
    elif strategy == "sampled":
        BI, BT = 64, 32
        _sparse_delta_grad_sampled_kernel[(triton.cdiv(k, BI),)](
            dy, x, idx, out, k, T, M, N,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            BI=BI, BT=BT, num_warps=4,
        )
    else:
        raise ValueError(f"strategy must be 'auto', 'tiles' or 'sampled', got {strategy!r}")
    return out


# --------------------------------------------------------------------------- row-block gather
@triton.jit
def _gather_row_block_kernel(block_ptr, idx_ptr, out_ptr, k, lo, hi, BLOCK: tl.constexpr):
    """out[j] = block[idx[j] - lo] for the j whose idx[j] lies in [lo, hi); others untouched."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = j < k
    i = tl.load(idx_ptr + j, mask=live, other=-1).to(tl.int64)
    inside = live & (i >= lo) & (i < hi)
    v = tl.load(block_ptr + (i - lo), mask=inside, other=0.0)
    tl.store(out_ptr + j, v.to(out_ptr.dtype.element_ty), mask=inside)


GATHER_BLOCK = 1024  # indices per program of gather_row_block


def gather_row_block(block: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                     first_row: int, n_cols: int) -> torch.Tensor:
    """Copy the values of one block of rows of a virtual [rows, n_cols] matrix into `out` at the
    positions of the flat indices that fall in it; `out` elsewhere is left as it is.

    block: [r, n_cols] contiguous (rows first_row .. first_row + r - 1); idx: [k] int32/int64
    flat row-major indices (any order); out: [k] contiguous, any float dtype.
    """
    if block.dim() != 2 or block.shape[1] != n_cols or not block.is_contiguous():
        raise ValueError(f"block must be a contiguous [rows, {n_cols}] tensor, got "
                         f"{tuple(block.shape)}")
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be a 1-D int32/int64 tensor, got {idx.dtype} "
                        f"{tuple(idx.shape)}")
    if out.shape != idx.shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor shaped like idx {tuple(idx.shape)}")
    if first_row < 0:
        raise ValueError(f"first_row must be >= 0, got {first_row}")
    k = idx.numel()
    if k == 0 or block.numel() == 0:
        return out
    lo = first_row * n_cols
    _gather_row_block_kernel[(triton.cdiv(k, GATHER_BLOCK),)](
        block, idx, out, k, lo, lo + block.numel(), BLOCK=GATHER_BLOCK, num_warps=4)
    return out
