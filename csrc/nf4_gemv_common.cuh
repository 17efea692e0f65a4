// Device helpers shared by the two small-batch 4-bit GEMV kernels (nf4_gemv.cu on the
// bitsandbytes layout, nf4_gemv_tiled.cu on the serving layout): the streaming weight load
// and the unmerged sparse deltas summed per row (the 16-bit types live in half2.cuh).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half2.cuh"
#include "nf4_gemv.cuh"

namespace spft {
namespace gemv {

// The threads that work on one row tile: a whole block, or one of the tile groups of a block
// (nf4_gemv_tiled.cu), which synchronise on a named barrier of their own.
struct TileThreads {
  int thread;   // index within the group
  int count;    // threads in the group, a multiple of 32
  int barrier;  // 0: the whole block (__syncthreads); else the group's named barrier
  __device__ __forceinline__ void sync() const {
    if (barrier == 0) {
      __syncthreads();
    } else {
      asm volatile("bar.sync %0, %1;\n" ::"r"(barrier), "r"(count) : "memory");
    }
  }
  static __device__ __forceinline__ TileThreads block() {
    return TileThreads{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), 0};
  }
};

// The weight is read exactly once: keep it out of L1 (x and absmax live there) and fetch whole
// 256-byte L2 lines, which the neighbouring warps of the block consume.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ float load_delta(const void* dv, FloatKind kind, int64_t j) {
  switch (kind) {
    case FloatKind::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(dv)[j]);
    case FloatKind::kFloat16:
      return __half2float(static_cast<const __half*>(dv)[j]);
    default:
      return static_cast<const float*>(dv)[j];
  }
}

__device__ __forceinline__ int64_t load_index(const void* idx, bool is_int64, int64_t j) {
  return is_int64 ? static_cast<const int64_t*>(idx)[j] : static_cast<const int32_t*>(idx)[j];
}

// Adds dv · x[token, col] of entries j = first, first + stride, … < end (one row's run of
// sorted deltas, the row starting at flat index row_first) to sum[token]. Branch-free: an entry
// outside the row (only from an inconsistent row_ptr or unsorted indices) reads column 0 and
// adds zero; tokens past T read token T - 1 (or staged padding) into sums that are never used.
// With xt (x transposed, staged in shared memory or copied to global memory: column c's kTokens
// values in xt[c · kTokens / 8 …], 16 bytes per 8 tokens) an entry's tokens are one or two
// 16-byte loads, where from x itself each token is a 2-byte gather from its own cache line.
template <typename H, typename T, int kTokens, typename LoadIndex, typename LoadDelta>
__device__ __forceinline__ void add_row_deltas(float (&sum)[kTokens], const T* x, int32_t ldx,
                                               const uint4* xt, int tokens, int K,
                                               int32_t row_first, int first, int end, int stride,
                                               LoadIndex load_index_at, LoadDelta load_delta_at) {
  // Entries go in batches whose idx and dv loads are all issued before any is used (a load's
  // predicate depends on j only), so a lane's run costs one round trip per batch, then the x
  // gathers: a loop unrolled by the compiler would take its short runs (a few entries per lane)
  // one dependent chain at a time in its remainder loop.
  constexpr int kBatch = kTokens <= 8 ? 8 : 4;
  for (int j0 = first; j0 < end; j0 += kBatch * stride) {
    int32_t col[kBatch];
    float v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int j = j0 + u * stride;
      const bool here = j < end;
      const auto c = here ? load_index_at(j) - row_first : decltype(load_index_at(j)){-1};
      const float dv = here ? load_delta_at(j) : 0.f;
      const bool ok = c >= 0 && c < K;
      col[u] = ok ? static_cast<int32_t>(c) : 0;
      v[u] = ok ? dv : 0.f;
    }
    if (xt != nullptr) {
      constexpr int kVecs = kTokens / 8;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
#pragma unroll
        for (int q = 0; q < kVecs; ++q) {
          const uint4 w = xt[col[u] * kVecs + q];
          const float2 f[4] = {H::unpack(w.x), H::unpack(w.y), H::unpack(w.z), H::unpack(w.w)};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            sum[8 * q + 2 * i] += v[u] * f[i].x;
            sum[8 * q + 2 * i + 1] += v[u] * f[i].y;
          }
        }
      }
      continue;
    }
    if (tokens == 1) {
#pragma unroll
      for (int u = 0; u < kBatch; ++u) sum[0] += v[u] * H::to_float(x[col[u]]);
      continue;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
#pragma unroll
      for (int t4 = 0; t4 < kTokens; t4 += 4) {
        if (t4 < tokens) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            sum[t4 + i] += v[u] * H::to_float(x[min(t4 + i, tokens - 1) * ldx + col[u]]);
          }
        }
      }
    }
  }
}

// The run [first, last) of row `row`'s sorted deltas, read from row_ptr and clamped to
// [0, n_deltas]: an inconsistent row_ptr cannot cause an access out of bounds (only a wrong
// answer).
template <typename Params>
__device__ __forceinline__ int2 row_run(const Params& p, int row) {
  const int64_t first = min(max(static_cast<int64_t>(p.row_ptr[row]), int64_t{0}), p.n_deltas);
  const int64_t last = min(max(static_cast<int64_t>(p.row_ptr[row + 1]), first), p.n_deltas);
  return make_int2(static_cast<int>(first), static_cast<int>(last));
}

// For deltas summed after the weight has streamed by: the tile's clamped row pointers
// (rows_here + 1 of them) go to shared memory, and the cache lines of the tile's idx and dv
// are prefetched into L1 while the weight loads are in flight.
template <typename Params>
__device__ __forceinline__ void stage_deltas(const Params& p, int row0, int rows_here,
                                             int32_t* s_row_ptr, const TileThreads& tt) {
  if (tt.thread <= rows_here) {
    const int64_t j = p.row_ptr[row0 + tt.thread];
    s_row_ptr[tt.thread] = static_cast<int32_t>(min(max(j, int64_t{0}), p.n_deltas));
  }
  const int idx_bytes = p.idx_is_int64 ? 8 : 4;
  const int dv_bytes = p.dv_kind == FloatKind::kFloat32 ? 4 : 2;
  const int64_t j_begin = min(max(static_cast<int64_t>(p.row_ptr[row0]), int64_t{0}), p.n_deltas);
  const int64_t j_end =
      min(max(static_cast<int64_t>(p.row_ptr[row0 + rows_here]), j_begin), p.n_deltas);
  const int64_t lines = (j_end - j_begin) * 8 / 128 + 2;
  for (int64_t l = tt.thread; l < lines; l += tt.count) {
    const int64_t j = min(j_begin + l * 128 / 8, j_end - 1);
    if (j < j_begin) break;
    asm volatile("prefetch.global.L1 [%0];" ::"l"(static_cast<const char*>(p.idx) + j * idx_bytes));
    asm volatile("prefetch.global.L1 [%0];" ::"l"(static_cast<const char*>(p.dv) + j * dv_bytes));
  }
}

// The deltas of the tile's rows [row0, row0 + rows_here): a group of kLanes = kThreads / kRows
// consecutive threads owns one row and strides through its run of sorted entries (`run(r)`),
// each thread summing dv · x per token in registers; the group then sums its lanes (butterfly)
// and its first thread hands the row's sums to store(r, token, sum). Every one of the tile's
// kThreads threads must call this (the butterfly shuffles over full warps). xt: x transposed
// (add_row_deltas), or nullptr.
template <typename H, typename T, int kRows, int kTokens, int kThreads, typename Params,
          typename Run, typename Store>
__device__ __forceinline__ void block_deltas(const Params& p, int row0, int rows_here,
                                             const TileThreads& tt, const uint4* xt, Run run,
                                             Store store) {
  constexpr int kLanes = kThreads / kRows;
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0,
                "a power of two of lanes per row, within a warp");
  const int r = tt.thread / kLanes;
  const int sub = tt.thread % kLanes;
  const int K = p.in_features;
  float sum[kTokens];
#pragma unroll
  for (int token = 0; token < kTokens; ++token) sum[token] = 0.f;
  if (r < rows_here) {
    const int2 entries = run(r);
    const int32_t row_first = (row0 + r) * K;
    const T* x = static_cast<const T*>(p.x);
    const int32_t ldx = static_cast<int32_t>(p.ldx);
    if (!p.idx_is_int64 && p.dv_kind == FloatKind::kFloat32) {  // what spft's modules hold
      const int32_t* idx = static_cast<const int32_t*>(p.idx);
      const float* dv = static_cast<const float*>(p.dv);
      add_row_deltas<H>(sum, x, ldx, xt, p.tokens, K, row_first, entries.x + sub, entries.y,
                        kLanes, [&](int j) { return idx[j]; }, [&](int j) { return dv[j]; });
    } else {
      add_row_deltas<H>(sum, x, ldx, xt, p.tokens, K, row_first, entries.x + sub, entries.y,
                        kLanes, [&](int j) { return load_index(p.idx, p.idx_is_int64, j); },
                        [&](int j) { return load_delta(p.dv, p.dv_kind, j); });
    }
  }
#pragma unroll
  for (int token = 0; token < kTokens; ++token) {
    if (token < p.tokens) {
#pragma unroll
      for (int o = kLanes / 2; o > 0; o /= 2) {
        sum[token] += __shfl_xor_sync(0xffffffffu, sum[token], o);
      }
    }
  }
  if (sub == 0 && r < rows_here) {
#pragma unroll
    for (int token = 0; token < kTokens; ++token) {
      if (token < p.tokens) store(r, token, sum[token]);
    }
  }
}

// y[token, row0 + r] = sum (+ bias), rounded to x's type.
template <typename H, typename T, typename Params>
__device__ __forceinline__ void store_output(const Params& p, int row0, int r, int token,
                                             float sum) {
  const T* bias = static_cast<const T*>(p.bias);
  if (bias != nullptr) sum += H::to_float(bias[row0 + r]);
  static_cast<T*>(p.y)[token * p.ldy + row0 + r] = H::from_float(sum);
}

// Sums the tile's rows, once every warp has written its partial sums per row and token to
// s_partial: the deltas summed after the weight (kDeltasFirst false; their runs staged in
// s_row_ptr) go into warp 0's partials; then emit(r, token, Σ partials (+ s_delta)) for every
// row r < rows_here and token < T. `with_deltas` must be the same for all of the tile's threads
// (KS warps).
template <typename H, typename T, int kRows, int kTokens, int KS, bool kDeltasFirst,
          typename Params, typename Emit>
__device__ __forceinline__ void sum_block(const Params& p, int row0, int rows_here,
                                          bool with_deltas, const TileThreads& tt,
                                          const uint4* xt,
                                          float (&s_partial)[KS][kRows][kTokens],
                                          const int32_t* s_row_ptr,
                                          const float (*s_delta)[kTokens], Emit emit) {
  if constexpr (!kDeltasFirst) {
    if (with_deltas) {
      tt.sync();  // s_row_ptr and warp 0's partials are written
      block_deltas<H, T, kRows, kTokens, KS * 32>(
          p, row0, rows_here, tt, xt,
          [&](int r) { return make_int2(s_row_ptr[r], max(s_row_ptr[r + 1], s_row_ptr[r])); },
          [&](int r, int token, float sum) { s_partial[0][r][token] += sum; });
    }
  }
  tt.sync();

  for (int o = tt.thread; o < kRows * p.tokens; o += tt.count) {
    const int token = o / kRows;
    const int r = o % kRows;
    if (r >= rows_here) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < KS; ++w) sum += s_partial[w][r][token];
    if constexpr (kDeltasFirst) {
      if (with_deltas) sum += s_delta[r][token];
    }
    emit(r, token, sum);
  }
}

// The tile's epilogue when it owns its rows' whole K: y = Σ partials (+ deltas) (+ bias).
template <typename H, typename T, int kRows, int kTokens, int KS, bool kDeltasFirst,
          typename Params>
__device__ __forceinline__ void finish_block(const Params& p, int row0, int rows_here,
                                             bool with_deltas, const TileThreads& tt,
                                             const uint4* xt,
                                             float (&s_partial)[KS][kRows][kTokens],
                                             const int32_t* s_row_ptr,
                                             const float (*s_delta)[kTokens]) {
  sum_block<H, T, kRows, kTokens, KS, kDeltasFirst>(
      p, row0, rows_here, with_deltas, tt, xt, s_partial, s_row_ptr, s_delta,
      [&](int r, int token, float sum) { store_output<H, T>(p, row0, r, token, sum); });
}

}  // namespace gemv
}  // namespace spft
