// Small-batch GEMV on a 4-bit (NF4/FP4, bitsandbytes layout) weight with an unmerged sparse delta.
//
//   y [T, N] = x [T, K] @ (W + scatter(dv, idx))ᵀ + bias,   1 ≤ T ≤ 16
//
// W is read once as packed codes (K/2 bytes per row, even element in the high nibble), decoded in
// registers (fp32 code × fp32 absmax, rounded once to x's dtype: the same values as
// `dequantize_4bit`) and multiplied on the tensor cores (mma.sync m16n8k16, fp32 accumulation);
// the deltas' products dv · x are added in fp32.
// Plain CUDA runtime API only: torch-facing checks live in bindings.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace spft {

enum class FloatKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Nf4GemvParams {
  const void* x;           // [T, K] bf16/fp16, row stride ldx elements (16-byte aligned rows)
  const uint8_t* packed;   // [N * K / 2] packed codes, 16-byte aligned
  const float* absmax;     // [ceil(N*K/blocksize)] fp32, or nullptr when qabsmax is given
  const uint8_t* qabsmax;  // double quantisation: 8-bit absmax codes
  const float* absmax2;    // [ceil(n_blocks / 256)] fp32 scales of qabsmax
  const float* code2;      // [256] fp32 code of qabsmax
  const float* offset;     // [1] fp32 mean added back to the dequantised absmax
  const float* code;       // [16] fp32 4-bit code (NF4 or FP4)
  const void* dv;          // [k] deltas (dv_kind), or nullptr
  const void* idx;         // [k] sorted flat row-major indices, int32 or int64 (idx_is_int64)
  const int32_t* row_ptr;  // [N + 1] CSR row pointer of idx, required with dv
  int64_t n_deltas;        // k: entries of dv and idx (row_ptr values are clamped to it)
  const void* bias;        // [N] in x's dtype, or nullptr
  void* y;                 // [T, N] in x's dtype, row stride ldy elements
  int64_t ldx;
  int64_t ldy;
  int tokens;              // T
  int out_features;        // N
  int in_features;         // K, a multiple of 32
  int blocksize_log2;      // log2(blocksize), 5 … 12
  FloatKind x_kind;        // kBFloat16 or kFloat16
  FloatKind dv_kind;
  bool idx_is_int64;
};

// Launch configuration: each warp owns 16·row_tiles output rows over 1/ksplit of K and keeps
// `depth` chunks of 128 inputs in flight. Only the triples listed in nf4_gemv.cu are compiled.
struct Nf4GemvConfig {
  int row_tiles;  // 16-row tiles per warp
  int ksplit;     // warps per block, splitting K
  int depth;      // chunks in flight per warp
};

// Heuristic default for T tokens (measured on the H100, benchmarks/RESULTS.md).
Nf4GemvConfig nf4_gemv_default_config(int tokens);

// Writes up to `capacity` compiled configurations to `out`; returns how many there are.
int nf4_gemv_configs(Nf4GemvConfig* out, int capacity);

// Whether the triple names a compiled instantiation.
bool nf4_gemv_config_supported(Nf4GemvConfig config);

// Enqueues the kernel on `stream`. Returns cudaErrorInvalidValue for parameters the kernel
// cannot serve (the bindings check them first and say why), else the launch status.
cudaError_t nf4_gemv(const Nf4GemvParams& params, Nf4GemvConfig config, cudaStream_t stream);

// ---- The same GEMV on the serving layout of `spft.ops.nf4_gemv_pack` (nf4_gemv_tiled.cu).
//
// The weight is cut into tiles of 16 rows × 64 inputs; tile (r, grp) holds 512 bytes, 16 per
// lane of a warp, in exactly the order the kernel's mma A fragments consume them, and one fp32
// absmax per row of the tile. in_features is a multiple of 64; rows past N are zero padding.
struct Nf4TiledGemvParams {
  const void* x;           // [T, K] bf16/fp16, row stride ldx elements (16-byte aligned rows)
  const uint8_t* codes;    // [ceil(N/16)][K/64][32 lanes][16 bytes], 16-byte aligned
  const float* absmax;     // [ceil(N/16)][K/64][8][2]: rows g and g + 8 of each tile
  const float* code;       // [16] fp32 4-bit code (NF4 or FP4)
  const void* dv;          // [k] deltas (dv_kind), or nullptr
  const void* idx;         // [k] sorted flat row-major indices into [N, K], int32 or int64
  const int32_t* row_ptr;  // [N + 1] CSR row pointer of idx, required with dv
  int64_t n_deltas;        // k
  const void* bias;        // [N] in x's dtype, or nullptr
  void* y;                 // [T, N] in x's dtype, row stride ldy elements
  int64_t ldx;
  int64_t ldy;
  int tokens;              // T, 1 … 16
  int out_features;        // N
  int in_features;         // K, a multiple of 64
  FloatKind x_kind;        // kBFloat16 or kFloat16
  FloatKind dv_kind;
  bool idx_is_int64;
  // Tail split (load balance): when the row tiles do not divide evenly over the SMs, the last
  // tiles % SMs tiles can each be split along K over `parts` blocks, the last of which to finish
  // sums their fp32 partials. split_parts: -1 chooses (only when it shortens the busiest SM's
  // share and the grid stays one wave), 0 or 1 never splits, 2, 4 or 8 always splits the tail
  // (for tests). The split needs `workspace` (nf4_gemv_tiled_workspace_bytes, any contents, not
  // shared with a launch that may run at the same time) and a split_epoch in [0, 2^61) that
  // differs from call to call (the split's arrival counters recognise their own call by it, so
  // the workspace needs no zeroing; a CUDA graph replays one epoch, and the counters wrap).
  void* workspace;
  int split_parts;
  uint64_t split_epoch;
  // Deltas' x gathers from a transposed copy of x in shared memory (K · 16 or K · 32 bytes per
  // block), only with several tiles per block: -1 chooses (from 2 tokens), 0 never, 1 whenever
  // it fits. Not with deltas_apart.
  int stage_x;
  // The deltas summed apart, by a kernel launched before the GEMV that runs alongside it (fp32
  // sums per row and token in the workspace, added in the GEMV's epilogue; from 2 tokens on it
  // gathers x from a transposed copy that a third kernel writes to the workspace first), instead
  // of by each tile after its weight has streamed by: -1 chooses (from 9 tokens, or from 2 with
  // one tile per block on more tiles than six per SM), 0 never, 1 always (but not in the
  // configurations that sum the deltas first).
  int deltas_apart;
};

// Launch configuration of the tiled kernel: a block of `ksplit` warps owns one 16-row tile, each
// warp a contiguous run of its 64-input groups, loading `groups` of them per pipeline slot and
// keeping `depth` slots in flight; `table` 0 decodes codes with register PRMT tables, 1 with a
// shared-memory table of code pairs in 16 copies (16 KB per block), 2 in 32 copies (32 KB,
// no bank conflicts); `deltas_first` 1 sums the deltas before the main loop (while its first
// loads are in flight), 0 after it (their idx and dv prefetched into L1 at the start). `tiles`:
// row tiles per block (each on its own ksplit warps), sharing one pair table, so that fewer
// copies of it take L1's room (at most 3 past 8 tokens).
struct Nf4TiledGemvConfig {
  int ksplit;
  int groups;
  int depth;
  int table;
  int deltas_first;
  int tiles;
};

// The configuration measured fastest for T tokens and out_features rows on the current device
// (the same with and without deltas: both were measured).
Nf4TiledGemvConfig nf4_gemv_tiled_default_config(int tokens, int out_features);
int nf4_gemv_tiled_configs(Nf4TiledGemvConfig* out, int capacity);
bool nf4_gemv_tiled_config_supported(Nf4TiledGemvConfig config);
// Bytes of `workspace` the launch of these params and config needs (0 when it neither splits
// tiles nor copies x);
// cudaErrorInvalidValue as nf4_gemv_tiled for parameters it cannot serve.
cudaError_t nf4_gemv_tiled_workspace_bytes(const Nf4TiledGemvParams& params,
                                           Nf4TiledGemvConfig config, size_t* bytes);
cudaError_t nf4_gemv_tiled(const Nf4TiledGemvParams& params, Nf4TiledGemvConfig config,
                           cudaStream_t stream);

}  // namespace spft
