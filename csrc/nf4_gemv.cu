// NF4/FP4 small-batch GEMV with an unmerged sparse delta: see nf4_gemv.cuh for the contract.
//
// Work split. A block of `KS` warps owns 16·MT consecutive output rows; warp w takes the K
// chunks (128 inputs each) w, w + KS, … and the block sums the KS partial results in shared
// memory. Within a chunk, lane (g, t) (g = lane / 4, t = lane % 4) loads 16 bytes — inputs
// [32t, 32t + 32) — of rows g and g + 8 of each 16-row tile. Because the order of the inputs
// inside a dot product is free, those bytes feed the mma A fragment directly: at k-step s
// (0 … 7) lane (g, t) holds mma columns {2t, 2t+1} = inputs 32t + 4s + {0, 1} (byte 2s) and
// {2t+8, 2t+9} = inputs 32t + 4s + {2, 3} (byte 2s + 1). The B fragment (x) of token g then needs
// x[g, 32t + 4s … +4), four consecutive values: one 8-byte slice of a 64-byte load.
//
// Decode: a code's fp32 value comes from a 16-entry shared table (conflict-free) whose address
// one PRMT forms; × the fp32 absmax, rounded once to x's dtype. The chunk loop only adds a
// constant to 32-bit running offsets (weights and x below 2^31 elements; the bindings check),
// and a piece past K loads a valid piece and counts as zero, so it has no branches.
//
// Deltas: after the main loop, as fp32 products dv · x, so they are not rounded into the 16-bit
// weight (the result is within rounding of `nf4_dequantize_scatter` + a GEMM). A group of
// 2·KS/MT lanes owns one row and strides through its run of sorted entries (row_ptr), summing
// per token in registers, then the group sums its lanes: no division by K, no per-entry
// reduction.
//
// Measured alternatives (benchmarks/RESULTS.md), all slower or not worth their cost:
// * decode: a 256-entry byte-pair code table with the absmax applied after the mma (8-byte
//   pieces per lane at blocksize 64), or with 16-byte pieces through per-block mma columns (at
//   most 6% faster at 1-4 tokens, 1.9x slower at 16); deeper pipelining (probes in
//   benchmarks/probes: the load pattern streams at 2.4 TB/s; the time above it is the decode);
// * deltas: shared-memory atomics (they serialise); lanes on consecutive entries of the block's
//   run with a segmented warp reduction per token (the earlier kernel: 1.2-1.7x slower with 1%
//   deltas); adding them to a shared-memory copy of each decoded chunk; interleaving them with
//   the chunk steps; a warp of their own (it becomes the critical path); copying each block's
//   run to shared memory while the weight streams; x transposed for them past 8 tokens (3% at
//   16 tokens, for an extra op);
// * grid: clusters of 2-4 blocks splitting a row tile's K to even out the 5.2 blocks per SM.
#include "nf4_gemv.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_gemv_common.cuh"

namespace spft {
namespace {

using gemv::load_stream;

constexpr int kChunk = 128;        // inputs per warp per step
constexpr int kAbsmax2Block = 256; // absmax values per second-level scale (bitsandbytes)
// Warps per SM asked of the compiler, which caps registers at 65536 / (32 · warps): 24 (80
// registers) for one row tile and one token tile, fewer where the accumulators need more.
constexpr int min_warps_per_sm(int mt, int nt) { return mt * nt == 1 ? 24 : mt * nt == 2 ? 16 : 8; }

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The code table's shared-memory address with byte b of `offsets` (4 · nibble) as its low byte:
// the table is 256-byte aligned, so one PRMT forms the whole address.
__device__ __forceinline__ uint32_t code_address(uint32_t offsets, uint32_t table, int b) {
  return __byte_perm(offsets, table, 0x7650u | static_cast<uint32_t>(b));
}

// One fp32 code from the 16-entry table: 16 words in 16 banks, so lookups never conflict.
__device__ __forceinline__ float lds_f32(uint32_t address) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(address));
  return v;
}

// The state one pipeline slot holds: a 16-byte piece of rows g and g + 8 of each row tile, and
// the absmax (or its 8-bit code and second-level scale) of each piece.
template <int MT>
struct Slot {
  uint4 w[MT][2];
  float scale[MT][2];
  uint32_t qscale[MT][2];
  bool valid;  // the piece lies inside K (else it holds the row's last piece and counts as zero)
};

template <typename T, int MT, int NT, int KS, int D>
__global__ void __launch_bounds__(KS * 32, min_warps_per_sm(MT, NT) / KS)
nf4_gemv_kernel(const Nf4GemvParams p) {
  using H = Half2<T>;
  constexpr int kRows = 16 * MT;
  constexpr int kTokens = 8 * NT;
  constexpr bool kDeltasFirst = NT == 1;  // see add_deltas

  // The 4-bit code (words 0-15) and, with double quantisation, the absmax code (16-271), so one
  // base address serves both lookups.
  __shared__ __align__(256) float s_code[16 + 256];
  __shared__ float s_partial[KS][kRows][kTokens];
  __shared__ int32_t s_row_ptr[kRows + 1];  // the block's rows' runs of deltas
  static_assert(kRows + 1 <= KS * 32, "one thread per row pointer");
  // The deltas' sums per row and token when they are added before the chunk loop (else they go
  // straight into warp 0's partials after it).
  __shared__ float s_delta[kDeltasFirst ? kRows : 1][kTokens];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row0 = blockIdx.x * kRows;
  const int K = p.in_features;
  const int N = p.out_features;
  const int rows_here = min(kRows, N - row0);  // rows of this block that exist
  const bool dq = p.qabsmax != nullptr;
  const float absmax_offset = dq ? __ldg(p.offset) : 0.f;

  if (threadIdx.x < 16) s_code[threadIdx.x] = p.code[threadIdx.x];
  if (dq) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[16 + i] = p.code2[i];
  }
  __syncthreads();

  const uint32_t table = static_cast<uint32_t>(__cvta_generic_to_shared(s_code));
  const int n_chunks = (K + kChunk - 1) / kChunk;
  const int my_chunks = warp < n_chunks ? (n_chunks - warp + KS - 1) / KS : 0;
  constexpr int kStep = KS * kChunk;  // inputs between a warp's consecutive chunks
  const int log2_block = p.blocksize_log2;

  // Running 32-bit element offsets (the bindings send weights of 2^31 or more elements
  // elsewhere) on the parameters' base pointers, so each chunk only adds a constant. Rows past N
  // read row N - 1 and tokens past T read token T - 1: their sums are never written, so only K
  // needs a check per piece.
  const uint32_t k_first = warp * kChunk + 32 * t;  // the lane's first input
  uint32_t next_element[MT][2];  // flat index of the next piece to load
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      next_element[mt][h] = static_cast<uint32_t>(min(row0 + mt * 16 + g + 8 * h, N - 1)) * K +
                            k_first;
    }
  }
  uint32_t next_x[NT];  // offset in x of the next piece to compute
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    next_x[nt] = static_cast<uint32_t>(min(nt * 8 + g, p.tokens - 1) * p.ldx) + k_first;
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  Slot<MT> slots[D];  // every field a compute reads is written by the load before it

  // Issue the loads of the lane's next piece into `slot`. A piece at or past K (the tail lanes
  // of a partial last chunk, or a chunk past the warp's last) is marked invalid and loads the
  // row's last valid piece instead, `back` inputs back (no branch; an L2 hit): its scale becomes
  // zero, so it contributes nothing.
  uint32_t k_load = k_first;
  auto load = [&](Slot<MT>& slot) {
    const bool ok = k_load + 32 <= static_cast<uint32_t>(K);
    const uint32_t back = ok ? 0u : k_load + 32 - K;
    k_load += kStep;
    slot.valid = ok;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t element = next_element[mt][h];
        next_element[mt][h] += kStep;
        const uint32_t at = element - back;
        const uint32_t block = at >> log2_block;
        slot.w[mt][h] = load_stream(p.packed + (at >> 1));
        if (dq) {
          slot.qscale[mt][h] = __ldg(p.qabsmax + block);
          slot.scale[mt][h] = __ldg(p.absmax2 + block / kAbsmax2Block);
        } else {
          slot.scale[mt][h] = __ldg(p.absmax + block);
        }
      }
    }
  };

  // Decode the lane's current piece and multiply it with x on the tensor cores.
  uint32_t k_compute = k_first;
  auto compute = [&](const Slot<MT>& slot) {
    // An invalid piece reads a valid x slice (its scale is zero).
    const uint32_t back = k_compute + 32 <= static_cast<uint32_t>(K) ? 0u : k_compute + 32 - K;
    k_compute += kStep;
    uint4 xv[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4* src =
          reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + (next_x[nt] - back));
      next_x[nt] += kStep;
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[nt][q] = __ldg(src + q);
    }
    float scale[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // round(round(code2[q] · absmax2) + offset), as bitsandbytes; no fused multiply-add.
        const float s = dq ? __fadd_rn(__fmul_rn(lds_f32(table + 64 + 4 * slot.qscale[mt][h]),
                                                 slot.scale[mt][h]),
                                       absmax_offset)
                           : slot.scale[mt][h];
        scale[mt][h] = slot.valid ? s : 0.f;
      }
    }
    // Per 32-bit word (8 codes): the table offsets 4·nibble of the high and low nibbles sit in
    // the word's bytes after two shift-and-mask ops; one PRMT per code then pulls one out.
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      uint32_t hi4[MT][2], lo4[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t w = word_of(slot.w[mt][h], word);
          hi4[mt][h] = (w >> 2) & 0x3C3C3C3Cu;
          lo4[mt][h] = (w << 2) & 0x3C3C3C3Cu;
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // k-step s = 2·word + half uses bytes 2·half, +1
        const int b = 2 * half;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float sc = scale[mt][h];
            // Low half of each register = the even input = the high nibble.
            a[h] = H::pack(lds_f32(code_address(hi4[mt][h], table, b)) * sc,
                           lds_f32(code_address(lo4[mt][h], table, b)) * sc);
            a[h + 2] = H::pack(lds_f32(code_address(hi4[mt][h], table, b + 1)) * sc,
                               lds_f32(code_address(lo4[mt][h], table, b + 1)) * sc);
          }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4& xq = xv[nt][word];
            H::mma(acc[mt][nt], a, word_of(xq, b), word_of(xq, b + 1));
          }
        }
      }
    }
  };

  // Deltas (nf4_gemv_common.cuh): up to 8 tokens they are summed before the chunk loop, while
  // the first chunks' loads are in flight (measured: 3% faster at 1 token), into s_delta; past 8
  // after it (their x gathers then cost more than the loads' latency hides), into warp 0's
  // partials.
#pragma unroll
  for (int d = 0; d < D; ++d) load(slots[d]);

  // The deltas, once the first weight loads are in flight: summed now (up to 8 tokens), or their
  // rows' runs read and their cache lines prefetched into L1 for use after the weight has
  // streamed by. Row pointers are clamped, so an inconsistent row_ptr cannot cause an access out
  // of bounds (only a wrong answer).
  if (p.dv != nullptr && kDeltasFirst) {
    gemv::block_deltas<H, T, kRows, kTokens, KS * 32>(
        p, row0, rows_here, gemv::TileThreads::block(), nullptr,
        [&](int r) { return gemv::row_run(p, row0 + r); },
        [&](int r, int token, float sum) { s_delta[r][token] = sum; });
  } else if (p.dv != nullptr) {
    gemv::stage_deltas(p, row0, rows_here, s_row_ptr, gemv::TileThreads::block());
  }

  for (int base = 0; base < my_chunks; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (base + d < my_chunks) {
        compute(slots[d]);
        load(slots[d]);
      }
    }
  }

  // Partial sums of this warp: c0, c1 = row g, tokens 2t, 2t+1; c2, c3 = row g + 8.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = mt * 16 + g;
      const int c = nt * 8 + 2 * t;
      s_partial[warp][r][c] = acc[mt][nt][0];
      s_partial[warp][r][c + 1] = acc[mt][nt][1];
      s_partial[warp][r + 8][c] = acc[mt][nt][2];
      s_partial[warp][r + 8][c + 1] = acc[mt][nt][3];
    }
  }
  gemv::finish_block<H, T, kRows, kTokens, KS, kDeltasFirst>(
      p, row0, rows_here, p.dv != nullptr, gemv::TileThreads::block(), nullptr, s_partial,
      s_row_ptr, s_delta);
}

template <typename T, int MT, int NT, int KS, int D>
cudaError_t launch(const Nf4GemvParams& p, cudaStream_t stream) {
  const int rows = 16 * MT;
  const dim3 grid((p.out_features + rows - 1) / rows);
  nf4_gemv_kernel<T, MT, NT, KS, D><<<grid, KS * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// The compiled (row tiles, warps splitting K, chunks in flight per warp) triples.
#define SPFT_NF4_CONFIGS(X) \
  X(1, 4, 2)                \
  X(1, 2, 2)                \
  X(1, 8, 2)                \
  X(2, 4, 2)                \
  X(2, 8, 2)                \
  X(4, 4, 2)

template <typename T, int NT>
cudaError_t dispatch_config(const Nf4GemvParams& p, Nf4GemvConfig c, cudaStream_t stream) {
#define SPFT_NF4_CASE(MT, KS, D) \
  if (c.row_tiles == MT && c.ksplit == KS && c.depth == D) return launch<T, MT, NT, KS, D>(p, stream);
  SPFT_NF4_CONFIGS(SPFT_NF4_CASE)
#undef SPFT_NF4_CASE
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_tokens(const Nf4GemvParams& p, Nf4GemvConfig c, cudaStream_t stream) {
  return p.tokens <= 8 ? dispatch_config<T, 1>(p, c, stream) : dispatch_config<T, 2>(p, c, stream);
}

}  // namespace

bool nf4_gemv_config_supported(Nf4GemvConfig c) {
#define SPFT_NF4_KNOWN(MT, KS, D) \
  if (c.row_tiles == MT && c.ksplit == KS && c.depth == D) return true;
  SPFT_NF4_CONFIGS(SPFT_NF4_KNOWN)
#undef SPFT_NF4_KNOWN
  return false;
}

int nf4_gemv_configs(Nf4GemvConfig* out, int capacity) {
  int n = 0;
#define SPFT_NF4_LIST(MT, KS, D) \
  if (n < capacity) out[n] = Nf4GemvConfig{MT, KS, D}; \
  ++n;
  SPFT_NF4_CONFIGS(SPFT_NF4_LIST)
#undef SPFT_NF4_LIST
  return n;
}

Nf4GemvConfig nf4_gemv_default_config(int tokens) {
  return tokens <= 8 ? Nf4GemvConfig{1, 4, 2} : Nf4GemvConfig{2, 4, 2};
}

cudaError_t nf4_gemv(const Nf4GemvParams& p, Nf4GemvConfig c, cudaStream_t stream) {
  if (p.tokens < 1 || p.tokens > 16 || p.in_features % 32 != 0 || p.out_features < 1 ||
      p.blocksize_log2 < 5 || p.blocksize_log2 > 12 || !nf4_gemv_config_supported(c) ||
      (p.dv != nullptr && (p.idx == nullptr || p.row_ptr == nullptr))) {
    return cudaErrorInvalidValue;
  }
  switch (p.x_kind) {
    case FloatKind::kBFloat16:
      return dispatch_tokens<__nv_bfloat16>(p, c, stream);
    case FloatKind::kFloat16:
      return dispatch_tokens<__half>(p, c, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace spft
