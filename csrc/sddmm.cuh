// Gradient of SpIEL's sparse deltas, staged through shared memory onto the tensor cores:
//   grad[j] = Σ_t dy[t, r_j] · x[t, c_j],   r_j = idx_j / N,  c_j = idx_j % N
// without forming the dense dW = dyᵀ x. Plain CUDA runtime API, no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "nf4_gemv.cuh"  // FloatKind

namespace spft {

// The weight is cut into tiles of kSddmmTile × kSddmmTile; `bounds` tells each tile row where
// its run of indices starts and ends.
constexpr int kSddmmTile = 512;
// The blocked operand's row stride (elements) must stay below this; larger ones are rejected.
constexpr int64_t kSddmmMaxRowStride = int64_t{1} << 27;

// How the blocks share the work (SddmmParams::schedule):
// * splits: `splits` blocks per tile, each a fixed share of the tokens (tiles · splits blocks,
//   as many output planes as splits);
// * segments: the tiles' 16-token stages laid end to end and cut into `blocks` equal segments
//   (one wave: a block per SM), a block working through every tile its segment touches; a
//   tile's pieces write consecutive planes. Fewer tiles per block than splits need, and no
//   wave left part-empty.
constexpr int kSddmmScheduleSplits = 0, kSddmmScheduleSegments = 1;
// Segment schedules keep units · blocks in 64 bits.
constexpr int64_t kSddmmMaxSegmentUnits = int64_t{1} << 40;

// The kernel gathers the features of one operand, transposed beforehand and blocked by
// 16-token stage (see SddmmPrepareParams), and reads the other as it lies in memory
// ([tokens][features]).
struct SddmmParams {
  const void* gathered;   // [ceil(T/16)][2][F_g][8] bf16/fp16: x (gather_cols) or dy, F_g its
                          // features; 16-byte aligned
  const void* blocked;    // [T][F_b] same dtype, unit column stride, row stride ldb: dy or x
  const void* idx;        // [k] sorted flat row-major indices into [M, N], int32 or int64
  const int32_t* bounds;  // [M][ceil(N / kSddmmTile) + 1]: bounds[r][c] = first position
                          // in idx at or after r·N + min(c·kSddmmTile, N) (searchsorted)
  float* out;             // [planes][k] fp32, zeroed (SddmmPrepareParams::zero), planes =
                          // splits or SddmmSegments::planes: each plane gets its tokens' share
                          // of every position (0 for indices outside the weight); their sum is
                          // the result. With `accumulate`, [k]: the result.
  int64_t k;
  int64_t ldb;            // < kSddmmMaxRowStride, a multiple of 8
  int tokens;             // T
  int rows;               // M, a multiple of 8
  int cols;               // N, a multiple of 8
  int schedule;           // kSddmmScheduleSplits or kSddmmScheduleSegments
  int splits;             // splits: blocks per tile along T; each must hold at least one token
  int tokens_per_split;   // splits: a multiple of the 16-token stage
  int blocks, planes;     // segments: as sddmm_segments gives them
  int stages;             // segments: ceil(T / 16)
  int64_t units;          // segments: tiles · stages
  FloatKind kind;         // kBFloat16 or kFloat16
  bool idx_is_int64;
  bool gather_cols;       // gathered = xᵀ, blocked = dy; otherwise gathered = dyᵀ, blocked = x
  int fill;               // how the token stages are handed over (see sddmm.cu): 0 a block
                          // barrier per stage, 1 per-stage full / empty barriers
  // out is one [k] plane that every piece adds its share to. Only with at most two planes'
  // worth of pieces per tile: two additions onto 0 give the same bits in either order
  // (a + b = b + a), more would depend on timing.
  bool accumulate;
};

// Blocks per tile along T: the fewest that fill their waves of `sms` blocks to 90 % (each
// split keeping at least 128 tokens).
int sddmm_default_splits(int tokens, int rows, int cols, int sms);

// The segment schedule for `blocks` blocks (at most one per unit); blocks == 0 when there is
// no work or more tiles · stages than kSddmmMaxSegmentUnits (use splits then).
struct SddmmSegments {
  int blocks, planes, stages;
  int64_t units;
};
SddmmSegments sddmm_segments(int tokens, int rows, int cols, int blocks);

// Enqueues the kernel on `stream`.
cudaError_t sddmm_staged(const SddmmParams& p, cudaStream_t stream);

// What sddmm_prepare fills in before the kernel, in one launch.
struct SddmmPrepareParams {
  // SddmmParams::bounds for a sorted idx of k (< 2^31) entries, int32 or int64, into
  // [rows, cols]: n_bounds = rows · (ceil(cols / kSddmmTile) + 1) binary searches.
  const void* idx;
  int32_t* bounds;
  int64_t k;
  int64_t n_bounds;
  int rows, cols;
  bool idx_is_int64;
  // The stage-blocked transposition of src [tokens][features] (features a multiple of 8, unit
  // column stride, row stride ld_src a multiple of 8, 16-byte aligned, 16-bit elements):
  // dst[s][h][f][j] = src[16s + 8h + j][f], 16 bytes per (s, h, f), so dst holds
  // ceil(tokens / 16) · 16 · features elements. Chunks past the last token: the one holding it
  // is zero-filled after it; later ones are not written.
  const void* src;
  int64_t ld_src;
  void* dst;
  int tokens, features;
  // zero_count floats at zero set to 0 (the staged kernel's output; 0: none). Needs
  // n_bounds > 0.
  float* zero;
  int64_t zero_count;
};

// Enqueues the preparation on `stream` (one launch).
cudaError_t sddmm_prepare(const SddmmPrepareParams& q, cudaStream_t stream);

}  // namespace spft
