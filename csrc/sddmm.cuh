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
// Row strides of dy and x (elements) must stay below this; larger ones are rejected.
constexpr int64_t kSddmmMaxRowStride = int64_t{1} << 27;

struct SddmmParams {
  const void* dy;         // [T, M] bf16/fp16, unit column stride, row stride lddy (16-byte rows)
  const void* x;          // [T, N] same dtype, row stride ldx
  const void* idx;        // [k] sorted flat row-major indices into [M, N], int32 or int64
  const int32_t* bounds;  // [M][ceil(N / kSddmmTile) + 1]: bounds[r][c] = first position
                          // in idx at or after r·N + min(c·kSddmmTile, N) (searchsorted)
  float* out;             // [splits][k] fp32 (any contents): split s writes its tokens' share
                          // of every position (0 for indices outside the weight)
  int64_t k;
  int64_t lddy;           // < kSddmmMaxRowStride
  int64_t ldx;            // < kSddmmMaxRowStride
  int tokens;             // T
  int rows;               // M, a multiple of 8
  int cols;               // N, a multiple of 8
  int splits;             // blocks per tile along T; each must hold at least one token
  int tokens_per_split;   // a multiple of the 16-token stage
  FloatKind kind;         // kBFloat16 or kFloat16
  bool idx_is_int64;
};

// Blocks per tile along T: the fewest that fill their waves of `sms` blocks to 90 % (each
// split keeping at least 128 tokens).
int sddmm_default_splits(int tokens, int rows, int cols, int sms);

// Enqueues the kernel on `stream`.
cudaError_t sddmm_staged(const SddmmParams& p, cudaStream_t stream);

}  // namespace spft
