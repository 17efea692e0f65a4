// Small-batch 4-bit GEMV with an unmerged sparse delta on the serving layout of
// `spft.ops.nf4_gemv_pack`: see nf4_gemv.cuh for the contract.
//
// Why a second layout. On the bitsandbytes layout one mma k-step spans two absmax blocks, so
// every weight must be multiplied by its absmax before the mma, and the code is looked up per
// weight in shared memory: about six instructions per weight, which is what bounds
// nf4_gemv.cu (benchmarks/RESULTS.md). Here a warp reads one 16-row × 64-input tile per 16-byte
// load per lane, every mma k-step lies inside one absmax block, and
// * the absmax is applied once per tile to the fp32 mma result (4 FFMA per lane per 32 weights);
// * the code is looked up in registers: the 16 code values, rounded to x's type, are held as
//   two 16-byte tables (low and high bytes); PRMT picks four bytes from eight, so a 16-entry
//   lookup of four codes is two PRMTs and a third that picks by the codes' top bit, and two
//   more PRMTs interleave low and high bytes into the two 16-bit pairs the mma takes.
// That is about 3.4 SASS instructions per weight in the main loop, none of them shared-memory
// lookups, but 2.6 of them on the ALU pipe, which Nsight Compute shows as the limit. So the
// kernel also has a second decode (kPairTable): a shared-memory table of code pairs, one LDS
// per two weights addressed by a byte extract and an IMAD (2.3 instructions per weight, 0.6 on
// the ALU pipe). In 32 copies (no bank conflicts, 32 KB) shared by the six row tiles of a block
// it is the default up to 8 tokens (see nf4_gemv_tiled_default_config).
//
// Lane (g, t) (g = lane / 4, t = lane % 4) of the warp holds, for each tile, word s (k-step s,
// 0 … 3) = eight codes: rows g and g + 8, inputs 16t + 4s + {0, 1, 2, 3} of the tile's group,
// as nibbles (g, 0) (g, 1) (g+8, 0) (g+8, 1) (g, 2) (g, 3) (g+8, 2) (g+8, 3). So the A fragment
// column pair {2t, 2t+1} is inputs 16t + 4s + {0, 1} and {2t+8, 2t+9} is 16t + 4s + {2, 3}, and
// the B fragment (x) of token g at step s is words 2s and 2s + 1 of x[g, 16t … 16t + 16) of the
// group: one 32-byte slice of x per lane per tile.
//
// Deltas: as in nf4_gemv.cu (nf4_gemv_common.cuh), fp32 products dv · x summed by row groups.
//
// Tail split. All of a layer's tiles are worked on at once (six per SM), so the SMs that hold
// one tile more than the others set the time: 11008 rows are 688 tiles, 5.21 per SM of an H200,
// and cost as much as 6 per SM (benchmarks/RESULTS.md, eighth session). The last tiles % SMs
// tiles can instead be split along K over `parts` tile groups each (SplitTiles): each writes its
// fp32 sums to the workspace, and the one that arrives last at the tile's counter adds them up,
// plus the bias, and writes y. Part 0 adds the deltas.
#include "nf4_gemv.cuh"

#include <atomic>
#include <cstdlib>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_gemv_common.cuh"

namespace spft {
namespace {


constexpr int kGroup = 64;  // inputs per tile
constexpr int kTileBytes = 512;

// Warps per SM asked of the compiler (it caps registers at 65536 / (32 · warps)): fewer when a
// warp keeps more than four tiles in flight.
constexpr int tiled_min_warps_per_sm(int nt, int tiles_in_flight) {
  return (nt == 1 ? 24 : 16) * (tiles_in_flight <= 4 ? 4 : 3) / 4;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// Programmatic dependent launch (Hopper): a kernel launched with it starts while its predecessor
// in the stream still runs (once all of the predecessor's blocks have allowed it), and waits for
// the predecessor to finish only where it reads what the predecessor wrote.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// x transposed, xt [K][kVecs] 16-byte vectors: tokens 8q … 8q + 7 of column c in vector
// c · kVecs + q, two to a 32-bit word, tokens past T repeating token T - 1 (their sums are never
// written). A delta's gathers of x then become kVecs 16-byte loads instead of T 2-byte loads
// from T cache lines. This writes vector q of columns 2c (even) and 2c + 1 (odd), from two
// 4-byte loads per token pair (coalesced over c).
template <typename T>
__device__ __forceinline__ void transpose_column_pair(const T* x, int64_t ldx, int tokens, int c,
                                                      int q, uint4& even, uint4& odd) {
  uint32_t lo[4];
  uint32_t hi[4];
#pragma unroll
  for (int tp = 0; tp < 4; ++tp) {
    const int t0 = min(8 * q + 2 * tp, tokens - 1);
    const int t1 = min(8 * q + 2 * tp + 1, tokens - 1);
    const uint32_t a = __ldg(reinterpret_cast<const uint32_t*>(x + t0 * ldx + 2 * c));
    const uint32_t b = __ldg(reinterpret_cast<const uint32_t*>(x + t1 * ldx + 2 * c));
    lo[tp] = prmt(a, b, 0x5410u);  // column 2c, tokens t0 and t1
    hi[tp] = prmt(a, b, 0x7632u);  // column 2c + 1
  }
  even = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  odd = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}

// xt in the workspace, for row_deltas_kernel: thread (q, c) writes vector q of column pair c.
template <typename T, int kVecs>
__global__ void __launch_bounds__(256) transpose_x_kernel(const T* __restrict__ x, int64_t ldx,
                                                          int tokens, int in_features,
                                                          uint4* __restrict__ xt) {
  allow_dependent_launch();
  const int pairs = in_features / 2;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= pairs * kVecs) return;
  const int q = i / pairs;
  const int c = i % pairs;
  transpose_column_pair(x, ldx, tokens, c, q, xt[2 * c * kVecs + q], xt[(2 * c + 1) * kVecs + q]);
}

// The deltas apart from the GEMV (Nf4TiledGemvParams::deltas_apart): delta_sums[row · 16 + t] =
// Σ dv · x[t, column] over the row's entries, eight threads a row, a block of 128 threads taking
// 16 rows at a time, blocks striding over the rows. Launched before the GEMV, which starts
// streaming its weight once every block here has started, shares the SMs with it and adds these
// sums in its epilogue: few blocks, so that they take few of the registers the GEMV's blocks
// need. xt (from transpose_x_kernel, which this kernel then overlaps) or nullptr to read x
// itself (one token).
constexpr int kRowDeltasThreads = 128;

template <typename T, int kTokens>
__global__ void __launch_bounds__(kRowDeltasThreads) row_deltas_kernel(const Nf4TiledGemvParams p,
                                                                       const uint4* xt,
                                                                       float* delta_sums) {
  using H = Half2<T>;
  constexpr int kRows = 16;
  allow_dependent_launch();
  if (xt != nullptr) grid_dependency_wait();
  for (int row0 = blockIdx.x * kRows; row0 < p.out_features; row0 += gridDim.x * kRows) {
    gemv::block_deltas<H, T, kRows, kTokens, kRowDeltasThreads>(
        p, row0, min(kRows, p.out_features - row0), gemv::TileThreads::block(), xt,
        [&](int r) { return gemv::row_run(p, row0 + r); },
        [&](int r, int token, float sum) { delta_sums[(row0 + r) * 16 + token] = sum; });
  }
}

// The 16 code values rounded to x's type, split into low bytes (lo[i] = codes 4i … 4i + 3) and
// high bytes (hi[i]).
struct CodeBytes {
  uint32_t lo[4];
  uint32_t hi[4];
};

template <typename H>
__device__ __forceinline__ CodeBytes code_bytes(const float* code) {
  CodeBytes c;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    c.lo[i] = 0;
    c.hi[i] = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const auto v = H::from_float(__ldg(code + 4 * i + j));
      const uint32_t bits = *reinterpret_cast<const uint16_t*>(&v);
      c.lo[i] |= (bits & 0xFFu) << (8 * j);
      c.hi[i] |= (bits >> 8) << (8 * j);
    }
  }
  return c;
}

// Eight codes (one word, nibble order above) → the four 16-bit-pair registers of an mma A
// fragment. PRMT's selector nibbles use bit 3 for sign replication, so the table lookups take
// the codes' low three bits (s7), and the merge selector m picks byte i of the first lookup
// (codes 0-7) or of the second (codes 8-15) by the code's top bit.
__device__ __forceinline__ void decode_word(uint32_t w, const CodeBytes& c, uint32_t (&a)[4]) {
  const uint32_t s7 = w & 0x77777777u;
  const uint32_t m = ((w >> 1) & 0x44444444u) | 0x32103210u;
#pragma unroll
  for (int half = 0; half < 2; ++half) {  // nibbles 0-3, then 4-7
    const uint32_t s = half == 0 ? s7 : s7 >> 16;
    const uint32_t pick = half == 0 ? m : m >> 16;
    const uint32_t lo = prmt(prmt(c.lo[0], c.lo[1], s), prmt(c.lo[2], c.lo[3], s), pick);
    const uint32_t hi = prmt(prmt(c.hi[0], c.hi[1], s), prmt(c.hi[2], c.hi[3], s), pick);
    a[2 * half] = prmt(lo, hi, 0x5140u);      // codes of nibbles 0, 1 (row g)
    a[2 * half + 1] = prmt(lo, hi, 0x7362u);  // nibbles 2, 3 (row g + 8)
  }
}

__device__ __forceinline__ uint32_t lds_u32(uint32_t address) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(address));
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Blocks [0, whole) own tile blockIdx.x over all of K; block whole + s owns K-part s % parts of
// tile whole + s / parts. counters[i] and partials[i][part][16 rows][16 tokens] belong to split
// tile whole + i.
struct SplitTiles {
  int whole;
  int parts;  // 2, 4 or 8 (divides the counters' 3-bit count)
  int units;  // whole + split tiles · parts: the tile groups with work
  unsigned long long* counters;
  float* partials;
  unsigned long long epoch;  // < 2^61
};

// Arrival at a split tile's counter: {epoch (61 bits), count (3 bits)}. A word from another call
// (or uninitialised memory) has another epoch and counts as zero. True for the block that
// completes a multiple of `parts` arrivals: the last of this call's, also when a CUDA graph
// replays the call with the same epoch (the count runs on modulo 8).
__device__ __forceinline__ bool arrive_last(unsigned long long* counter,
                                            unsigned long long epoch, int parts) {
  unsigned long long seen = *reinterpret_cast<volatile unsigned long long*>(counter);
  while (true) {
    const unsigned long long count = (seen >> 3) == epoch ? (seen & 7ull) : 0ull;
    const unsigned long long next = (epoch << 3) | ((count + 1) & 7ull);
    const unsigned long long before = atomicCAS(counter, seen, next);
    if (before == seen) return (count + 1) % parts == 0;
    seen = before;
  }
}

// One pipeline slot: the lane's 16 bytes of U consecutive tiles and their rows' absmax.
template <int U>
struct TileSlot {
  uint4 w[U];
  float2 scale[U];
};

// kCopies: 0 decodes by register PRMT tables; 16 or 32 by a shared-memory pair table of that
// many copies per entry. kDeltasFirst: the deltas are summed before the main loop, while its
// first slots load (their sums wait in shared memory), else after it, their idx and dv
// prefetched into L1 at the start. TB: tile groups per block (KS warps each), sharing the pair
// table; group tg of block b works on unit tg · gridDim.x + b (a tile, or a part of a split one).
template <typename T, int NT, int KS, int U, int D, int kCopies, bool kDeltasFirst, int TB>
__global__ void __launch_bounds__(TB * KS * 32,
                                  tiled_min_warps_per_sm(NT, U * D) / (TB * KS) > 0
                                      ? tiled_min_warps_per_sm(NT, U * D) / (TB * KS)
                                      : 1)
nf4_gemv_tiled_kernel(const Nf4TiledGemvParams p, const SplitTiles split, const bool stage_x,
                      const float* apart_sums) {
  using H = Half2<T>;
  constexpr int kRows = 16;
  constexpr int kTokens = 8 * NT;
  constexpr int kDepth = D;  // slots in flight per warp
  constexpr int kTileThreads = KS * 32;

  __shared__ float s_partial[TB][KS][kRows][kTokens];
  __shared__ int32_t s_row_ptr[TB][kRows + 1];
  __shared__ float s_delta[TB][kDeltasFirst ? kRows : 1][kTokens];
  __shared__ bool s_last[TB];
  extern __shared__ uint4 s_xt[];  // stage_x: x transposed, [K][kTokens / 8] 16-byte vectors
  static_assert(kRows + 1 <= kTileThreads, "one thread per row pointer");

  const int tg = threadIdx.x / kTileThreads;
  const gemv::TileThreads tt{static_cast<int>(threadIdx.x) % kTileThreads, kTileThreads,
                             TB == 1 ? 0 : tg + 1};
  const int lane = tt.thread & 31;
  const int warp = tt.thread >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int groups = p.in_features / kGroup;
  // The group's tile and its groups [part_first, part_end); none for a group without a unit.
  const int unit = tg * gridDim.x + blockIdx.x;
  const bool active = unit < split.units;
  int tile = active ? unit : 0;
  int part = 0;
  int part_first = 0;
  int part_end = active ? groups : 0;
  const bool is_split = tile >= split.whole;
  if (is_split) {
    const int s = tile - split.whole;
    tile = split.whole + s / split.parts;
    part = s % split.parts;
    const int per_part = (groups + split.parts - 1) / split.parts;
    part_first = min(part * per_part, groups);
    part_end = min(part_first + per_part, groups);
  }
  const int row0 = tile * kRows;
  const int N = p.out_features;
  const int rows_here = min(kRows, N - row0);
  // delta_sums: the deltas' products, summed per row and token by row_deltas_kernel (not with
  // kDeltasFirst, whose registers are at their cap).
  const float* const delta_sums = kDeltasFirst ? nullptr : apart_sums;
  const bool deltas_here = active && p.dv != nullptr && part == 0 && delta_sums == nullptr;

  // The warp's contiguous run of groups [first, end): `steps` slots of U groups, then the
  // remaining (end - first) % U groups one at a time. Running pointers: a step only adds
  // constants.
  const int per_warp = (part_end - part_first + KS - 1) / KS;
  const int first = min(part_first + warp * per_warp, part_end);
  const int end = min(first + per_warp, part_end);
  const int steps = (end - first) / U;

  const uint8_t* next_codes =
      p.codes + (static_cast<int64_t>(tile) * groups + first) * kTileBytes + lane * 16;
  const float2* next_scale = reinterpret_cast<const float2*>(p.absmax) +
                             (static_cast<int64_t>(tile) * groups + first) * 8 + g;
  const T* next_x[NT];  // x[token g (+ 8), 16t …] of the next group to compute; tokens past T
                        // read token T - 1 into sums that are never written
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    next_x[nt] = static_cast<const T*>(p.x) + min(nt * 8 + g, p.tokens - 1) * p.ldx + 16 * t +
                 first * kGroup;
  }

  auto load = [&](TileSlot<U>& slot) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      slot.w[u] = gemv::load_stream(next_codes + u * kTileBytes);
      slot.scale[u] = __ldg(next_scale + u * 8);
    }
    next_codes += U * kTileBytes;
    next_scale += U * 8;
  };

  // The first slots' loads go out before anything else, so that their memory latency overlaps
  // the table fill and the deltas.
  TileSlot<U> slots[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    if (d < steps) load(slots[d]);
  }

  // stage_x: x transposed into shared memory for the deltas' gathers (the layout of
  // transpose_column_pair). Thread c takes column pair c: two values of every token row
  // (coalesced over the threads), written as the two columns' whole vectors.
  const uint4* xt = nullptr;
  if (TB > 1 && stage_x) {  // compiled only where one staged x serves several tiles
    constexpr int kVecs = kTokens / 8;
    const T* x = static_cast<const T*>(p.x);
    for (int c = threadIdx.x; c < p.in_features / 2; c += blockDim.x) {
      uint4 even[kVecs];
      uint4 odd[kVecs];
#pragma unroll
      for (int q = 0; q < kVecs; ++q) {
        transpose_column_pair(x, p.ldx, p.tokens, c, q, even[q], odd[q]);
      }
#pragma unroll
      for (int q = 0; q < kVecs; ++q) {
        s_xt[2 * c * kVecs + q] = even[q];
        s_xt[(2 * c + 1) * kVecs + q] = odd[q];
      }
    }
    xt = s_xt;
  }

  const CodeBytes table = code_bytes<H>(p.code);
  // The byte-pair table (kCopies > 0): entry e = the 16-bit pair (code[e & 15], code[e >> 4]),
  // the A-fragment register of one code byte, in kCopies copies: copy c of entry e is word
  // e · kCopies + c, and lane l reads copy l % kCopies. One LDS per two weights, addressed by one
  // byte extract (ALU) and one IMAD (FMA pipe), where the register decode keeps the ALU pipe
  // busy (2.6 ALU ops per weight). With 16 copies lanes l and l + 16 share a bank and meet there
  // whenever their entries differ with equal parity, so most warp LDS take two wavefronts; 32
  // copies (32 KB per block) take one.
  // The fill is one 16-byte store (four copies of one entry) per chunk, consecutive lanes on
  // consecutive chunks (no bank conflicts), where storing word by word from a table of the 16
  // codes cost a third as many shared-memory operations as the block's whole main loop.
  constexpr bool kPairTable = kCopies > 0;
  __shared__ __align__(16) uint32_t s_pairs[kPairTable ? 256 * kCopies : 4];
  uint32_t pair_base = 0;
  if constexpr (kPairTable) {
    static_assert(kCopies % 4 == 0, "whole 16-byte chunks per entry");
    constexpr int kChunksPerEntry = kCopies / 4;
    for (int chunk = threadIdx.x; chunk < 256 * kChunksPerEntry; chunk += TB * kTileThreads) {
      const int e = chunk / kChunksPerEntry;
      const auto lo = H::from_float(__ldg(p.code + (e & 15)));
      const auto hi = H::from_float(__ldg(p.code + (e >> 4)));
      const uint32_t v = *reinterpret_cast<const uint16_t*>(&lo) |
                         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
      reinterpret_cast<uint4*>(s_pairs)[chunk] = make_uint4(v, v, v, v);
    }
    __syncthreads();
    pair_base =
        static_cast<uint32_t>(__cvta_generic_to_shared(s_pairs)) + 4 * (lane % kCopies);
  } else {
    if (TB > 1 && stage_x) __syncthreads();
  }

  if (!active) return;  // after the table fill's barrier, which counts every thread

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  // One tile: decode its four k-steps into the mma, then scale the fp32 result by the rows'
  // absmax.
  auto compute_tile = [&](const uint4& w, const float2& scale) {
    uint4 xv[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4* src = reinterpret_cast<const uint4*>(next_x[nt]);
      xv[nt][0] = __ldg(src);
      xv[nt][1] = __ldg(src + 1);
      next_x[nt] += kGroup;
    }
    float part[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[nt][i] = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t a[4];
      if constexpr (kPairTable) {
        const uint32_t word = word_of(w, s);
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t entry = __byte_perm(word, 0u, 0x4440u | b);
          a[b] = lds_u32(pair_base + entry * (4 * kCopies));
        }
      } else {
        decode_word(word_of(w, s), table, a);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4& xq = xv[nt][s >> 1];
        H::mma(part[nt], a, word_of(xq, 2 * (s & 1)), word_of(xq, 2 * (s & 1) + 1));
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      acc[nt][0] = fmaf(scale.x, part[nt][0], acc[nt][0]);
      acc[nt][1] = fmaf(scale.x, part[nt][1], acc[nt][1]);
      acc[nt][2] = fmaf(scale.y, part[nt][2], acc[nt][2]);
      acc[nt][3] = fmaf(scale.y, part[nt][3], acc[nt][3]);
    }
  };

  if (deltas_here && kDeltasFirst) {
    gemv::block_deltas<H, T, kRows, kTokens, kTileThreads>(
        p, row0, rows_here, tt, xt, [&](int r) { return gemv::row_run(p, row0 + r); },
        [&](int r, int token, float sum) { s_delta[tg][r][token] = sum; });
  } else if (deltas_here) {
    gemv::stage_deltas(p, row0, rows_here, s_row_ptr[tg], tt);
  }

  for (int base = 0; base < steps; base += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (base + d < steps) {
#pragma unroll
        for (int u = 0; u < U; ++u) compute_tile(slots[d].w[u], slots[d].scale[u]);
        if (base + d + kDepth < steps) load(slots[d]);
      }
    }
  }
  // The tail groups (next_codes points past the last slot loaded, which was the last step's).
  for (int tail = 0; tail < end - first - steps * U; ++tail) {
    compute_tile(gemv::load_stream(next_codes + tail * kTileBytes), __ldg(next_scale + tail * 8));
  }

  if (delta_sums != nullptr) grid_dependency_wait();
  auto plus_deltas = [&](int r, int token, float sum) {
    return delta_sums != nullptr ? sum + delta_sums[(row0 + r) * 16 + token] : sum;
  };
  // c0, c1 = row g, tokens 2t, 2t + 1; c2, c3 = row g + 8.
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int c = nt * 8 + 2 * t;
    s_partial[tg][warp][g][c] = acc[nt][0];
    s_partial[tg][warp][g][c + 1] = acc[nt][1];
    s_partial[tg][warp][g + 8][c] = acc[nt][2];
    s_partial[tg][warp][g + 8][c + 1] = acc[nt][3];
  }
  if (!is_split) {
    gemv::sum_block<H, T, kRows, kTokens, KS, kDeltasFirst>(
        p, row0, rows_here, deltas_here, tt, xt, s_partial[tg], s_row_ptr[tg], s_delta[tg],
        [&](int r, int token, float sum) {
          gemv::store_output<H, T>(p, row0, r, token, plus_deltas(r, token, sum));
        });
    return;
  }

  // A split tile: publish this part's sums (L2, past the non-coherent L1), count the arrival,
  // and let the last part's block add all of them up.
  const int split_index = tile - split.whole;
  float* partials = split.partials + static_cast<int64_t>(split_index) * split.parts * kRows * 16;
  gemv::sum_block<H, T, kRows, kTokens, KS, kDeltasFirst>(
      p, row0, rows_here, deltas_here, tt, xt, s_partial[tg], s_row_ptr[tg], s_delta[tg],
      [&](int r, int token, float sum) {
        __stcg(partials + (part * kRows + r) * 16 + token, sum);
      });
  __threadfence();
  tt.sync();
  if (tt.thread == 0) {
    s_last[tg] = arrive_last(split.counters + split_index, split.epoch, split.parts);
  }
  tt.sync();
  if (!s_last[tg]) return;
  __threadfence();
  for (int o = tt.thread; o < kRows * p.tokens; o += tt.count) {
    const int token = o / kRows;
    const int r = o % kRows;
    if (r >= rows_here) continue;
    float sum = 0.f;
    for (int q = 0; q < split.parts; ++q) sum += __ldcg(partials + (q * kRows + r) * 16 + token);
    gemv::store_output<H, T>(p, row0, r, token, plus_deltas(r, token, sum));
  }
}

// The deltas apart from the GEMV (row_deltas_kernel) from this many tokens on: at 16 tokens
// 25.6 / 34.3 / 16.1 / 42.5 µs against 27.0 / 50.9 / 18.0 / 50.3 for each tile summing its own
// after its weight (4096 → 11008 / 11008 → 4096 / 4096 → 4096 / 5120 → 13824). Up to 8 tokens
// only for one tile per block (more tiles than six per SM; 5120 → 13824 at 8 tokens: 30.8
// against 34.2 µs): with six, the fused deltas on x staged in shared memory cost less than two
// more launches (4096 → 11008 at 8 tokens: 16.9 against 21.9 µs; eleventh session).
constexpr int kDeltasApartMinTokens = 9;

// SPFT_GEMV_NO_PDL=1 launches each kernel of the deltas-apart chain (transpose_x_kernel,
// row_deltas_kernel, the GEMV) after its predecessor ends instead of alongside it (for measuring
// what the overlap gains: at 16 tokens 1-6 µs, benchmarks/RESULTS.md).
bool use_pdl() {
  static const bool enabled = [] {
    const char* value = std::getenv("SPFT_GEMV_NO_PDL");
    return value == nullptr || value[0] != '1';
  }();
  return enabled;
}

// Blocks per SM of row_deltas_kernel. At 16 tokens (µs, 4096 → 11008 / 11008 → 4096 / 4096 →
// 4096 / 5120 → 13824): one 32.9 / 33.9 / 15.9 / 51.4, two 25.6 / 34.3 / 16.1 / 42.5, four
// 26.1 / 34.3 / 16.1 / 38.8, one block per 16 rows 27.6 / 34.3 / 16.0 / 40.7: more blocks take
// registers from the GEMV's (benchmarks/RESULTS.md, eleventh session).
constexpr int kRowDeltasBlocksPerSm = 2;

struct SplitPlan {
  int whole;        // tiles owned by one tile group each
  int split_tiles;  // tiles after them, split into `parts`
  int parts;
  int units() const { return whole + split_tiles * parts; }
};

size_t split_workspace_bytes(const SplitPlan& plan) {
  return plan.split_tiles == 0 ? 0
                               : static_cast<size_t>(plan.split_tiles) *
                                     (sizeof(unsigned long long) + plan.parts * 16 * 16 * 4);
}

int sm_count(int device) {
  static std::atomic<int> cached[64];
  if (device < 0 || device >= 64) return 0;
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;
    }
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// What one kernel instantiation remembers of its dynamic shared memory: on which devices its
// limit was raised, and its last answer of staged_blocks_per_sm, (dynamic << 8 | blocks).
struct DynamicSmemCache {
  std::atomic<bool> raised[64];
  std::atomic<unsigned long long> last;
};

// Blocks of `kernel` (`threads` each) an SM holds with `dynamic` bytes of dynamic shared memory,
// 0 if they do not fit. Raises the kernel's dynamic shared memory limit to what the device
// allows beside its static shared memory, once per kernel and device.
template <typename Kernel>
cudaError_t staged_blocks_per_sm(Kernel kernel, int device, int threads, size_t dynamic,
                                 DynamicSmemCache& cache, int* blocks) {
  std::atomic<bool>* raised = cache.raised;
  std::atomic<unsigned long long>& last = cache.last;
  *blocks = 0;
  if (device < 0 || device >= 64) return cudaSuccess;
  const unsigned long long seen = last.load(std::memory_order_relaxed);
  if (seen != 0 && (seen >> 8) == dynamic && raised[device].load(std::memory_order_relaxed)) {
    *blocks = static_cast<int>(seen & 0xFF);
    return cudaSuccess;
  }
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t room = static_cast<size_t>(optin) - attributes.sharedSizeBytes;
  if (dynamic <= room) {
    if (!raised[device].load(std::memory_order_relaxed)) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(room));
      if (err != cudaSuccess) return err;
      raised[device].store(true, std::memory_order_relaxed);
    }
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, dynamic);
    if (err != cudaSuccess) return err;
  }
  last.store((static_cast<unsigned long long>(dynamic) << 8) | (*blocks & 0xFF),
             std::memory_order_relaxed);
  return cudaSuccess;
}

// The split for `tiles` row tiles of `groups` groups each on `sms` SMs that hold `resident`
// tile groups each. Requested parts (2, 4, 8) split the tail unconditionally. Automatic (-1): the
// parts that most shorten the busiest SM's share, in eighths of a tile, with the whole grid
// resident at once; none if no choice shortens it.
SplitPlan plan_split(int tiles, int groups, int requested, int sms, int resident) {
  const SplitPlan none{tiles, 0, 1};
  if (requested == 0 || requested == 1 || sms <= 0) return none;
  const int whole = tiles / sms * sms;
  const int tail = tiles - whole;
  if (tail == 0) return none;
  if (requested > 1) return SplitPlan{whole, tail, requested};
  SplitPlan best = none;
  int best_eighths = 8 * (tiles / sms + 1);
  for (int parts = 2; parts <= 8 && parts <= groups; parts *= 2) {
    if (static_cast<int64_t>(whole) + static_cast<int64_t>(tail) * parts >
        static_cast<int64_t>(sms) * resident) {
      continue;
    }
    const int eighths = 8 * (tiles / sms) + (tail * parts + sms - 1) / sms * (8 / parts);
    if (eighths < best_eighths) {
      best_eighths = eighths;
      best = SplitPlan{whole, tail, parts};
    }
  }
  return best;
}

// Launches the instantiation, or with `workspace_bytes` only says how much workspace it needs.
// Past 8 tokens a block holds at most 3 tiles with a table (static shared memory) and 4 without
// (registers: 16 warps of up to 128 registers per SM).
template <typename T, int NT, int KS, int U, int D, int TABLE, int FIRST, int TILES>
cudaError_t launch(const Nf4TiledGemvParams& p, cudaStream_t stream, size_t* workspace_bytes) {
  constexpr int kMaxTB = NT == 1 ? TILES : TABLE != 0 ? 3 : 4;
  constexpr int kTB = TILES < kMaxTB ? TILES : kMaxTB;
  const auto kernel = nf4_gemv_tiled_kernel<T, NT, KS, U, D, TABLE == 0 ? 0 : TABLE == 1 ? 16 : 32,
                                            FIRST == 1, kTB>;
  constexpr int kThreads = kTB * KS * 32;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::atomic<int> blocks_cache{0};  // blocks per SM: the same on every device in use
  int blocks_per_sm = blocks_cache.load(std::memory_order_relaxed);
  if (blocks_per_sm == 0) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    blocks_cache.store(blocks_per_sm, std::memory_order_relaxed);
  }
  // stage_x, only with several tiles per block (one staged x per SM): automatic with deltas
  // from 2 tokens on, for a large x (over 96 KB staged, K > 6144) only from 8 tokens on (each
  // block reads all of it: K 11008 → N 4096 at 2 and 4 tokens was 1.2 µs slower staged, at 8
  // 2.6 µs faster); and only if x fits beside the static shared memory and a block still fits.
  const size_t xt_bytes = static_cast<size_t>(p.in_features) * (8 * NT) * 2;
  // deltas_apart: the deltas summed by row_deltas_kernel alongside the GEMV (see
  // Nf4TiledGemvParams); automatic from kDeltasApartMinTokens tokens.
  const int tiles = (p.out_features + 15) / 16;
  const int sms = sm_count(device);
  const bool auto_apart = p.tokens >= kDeltasApartMinTokens ||
                          (kTB == 1 && p.tokens >= 2 && tiles > 6 * sms);
  const bool apart = p.dv != nullptr && FIRST == 0 &&
                     (p.deltas_apart == 1 || (p.deltas_apart == -1 && auto_apart));
  const bool auto_x = p.tokens >= 2 && (xt_bytes <= (96u << 10) || p.tokens >= 8);
  const bool want_x = kTB > 1 && p.dv != nullptr && !apart &&
                      (p.stage_x == 1 || (p.stage_x == -1 && auto_x));
  bool stage_x = false;
  if (want_x) {
    static DynamicSmemCache cache{};  // one per instantiation
    int blocks_staged = 0;
    err = staged_blocks_per_sm(kernel, device, kThreads, xt_bytes, cache, &blocks_staged);
    if (err != cudaSuccess) return err;
    if (blocks_staged > 0) {
      stage_x = true;
      blocks_per_sm = blocks_staged;
    }
  }
  // The deltas apart gather x from a copy transposed into the workspace by transpose_x_kernel
  // (from 2 tokens on). The GEMV's own deltas do not: reading that copy was never faster than
  // gathering x (2 to 16 tokens, four shapes; eleventh session), and its code path alone took
  // the 16-token kernel from 80 to 108 registers (24.8 against 18.2 µs without deltas).
  const bool global_x = apart && p.tokens >= 2;
  const SplitPlan plan =
      plan_split(tiles, p.in_features / kGroup, p.split_parts, sms, blocks_per_sm * kTB);
  // The workspace: split counters and partials, x transposed, the deltas' sums (fp32 [N][16]).
  const size_t xt_offset = (split_workspace_bytes(plan) + 15) / 16 * 16;
  const size_t sums_offset = xt_offset + (global_x ? xt_bytes : 0);
  const size_t total_bytes =
      apart ? sums_offset + static_cast<size_t>(p.out_features) * 16 * sizeof(float)
            : split_workspace_bytes(plan);
  if (workspace_bytes != nullptr) {
    *workspace_bytes = total_bytes;
    return cudaSuccess;
  }
  const int units = plan.units();
  SplitTiles split{plan.whole, plan.parts, units, nullptr, nullptr, p.split_epoch};
  if (plan.split_tiles > 0) {
    if (p.workspace == nullptr || p.split_epoch >= (1ull << 61)) return cudaErrorInvalidValue;
    split.counters = static_cast<unsigned long long*>(p.workspace);
    split.partials = reinterpret_cast<float*>(split.counters + plan.split_tiles);
  }
  // As many blocks as fit at once (at most one per unit), unless the units need more: unit u runs
  // in block u % grid, so consecutive units go to different blocks (different SMs while the grid
  // fills them in order), and each block's groups take units of different rounds.
  const int grid = max((units + kTB - 1) / kTB, min(units, max(sms * blocks_per_sm, 1)));
  const size_t dynamic = stage_x ? xt_bytes : 0;
  if (!apart) {
    kernel<<<grid, kThreads, dynamic, stream>>>(p, split, stage_x, nullptr);
    return cudaGetLastError();
  }
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  char* workspace = static_cast<char*>(p.workspace);
  const uint4* xt = global_x ? reinterpret_cast<const uint4*>(workspace + xt_offset) : nullptr;
  float* sums = reinterpret_cast<float*>(workspace + sums_offset);
  // Each kernel after the first is launched while its predecessor runs (programmatic dependent
  // launch) and waits for it only where it reads what the predecessor wrote.
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  bool overlap = false;  // whether a kernel of ours precedes the next launch
  auto config_of = [&](dim3 blocks, dim3 threads, size_t shared) {
    cudaLaunchConfig_t c{};
    c.gridDim = blocks;
    c.blockDim = threads;
    c.dynamicSmemBytes = shared;
    c.stream = stream;
    c.attrs = &attribute;
    c.numAttrs = overlap && use_pdl() ? 1 : 0;
    return c;
  };
  if (global_x) {
    const int transpose_threads = p.in_features / 2 * NT;
    transpose_x_kernel<T, NT><<<(transpose_threads + 255) / 256, 256, 0, stream>>>(
        static_cast<const T*>(p.x), p.ldx, p.tokens, p.in_features,
        reinterpret_cast<uint4*>(workspace + xt_offset));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    overlap = true;
  }
  const int row_groups = (p.out_features + 15) / 16;
  const int deltas_blocks = min(row_groups, max(sms, 1) * kRowDeltasBlocksPerSm);
  const cudaLaunchConfig_t deltas_config =
      config_of(dim3(deltas_blocks), dim3(kRowDeltasThreads), 0);
  err = cudaLaunchKernelEx(&deltas_config, row_deltas_kernel<T, 8 * NT>, p, xt, sums);
  if (err != cudaSuccess) return err;
  overlap = true;
  const cudaLaunchConfig_t gemv_config = config_of(dim3(grid), dim3(kThreads), dynamic);
  return cudaLaunchKernelEx(&gemv_config, kernel, p, split, stage_x,
                            static_cast<const float*>(sums));
}

// The compiled configurations: (warps splitting K, groups per slot, slots in flight, decode:
// 0 registers, 1 shared byte-pair table of 16 copies, 2 of 32 copies; deltas: 0 after the main
// loop, 1 before it; tiles per block).
// The defaults (4, 2, 2, 2, 0, 6) and (4, 1, 2, 0, 0, 1), and three that show what each choice
// costs. The 16-copy table, and the other combinations measured in the ninth and tenth sessions,
// never won at any token count (benchmarks/RESULTS.md) and are not compiled.
#define SPFT_TILED_CONFIGS(X) \
  X(4, 2, 2, 2, 0, 6)         \
  X(4, 2, 2, 2, 1, 6)         \
  X(4, 2, 2, 2, 0, 1)         \
  X(4, 2, 2, 0, 0, 1)         \
  X(4, 1, 2, 0, 0, 1)

#define SPFT_TILED_MATCHES(c, KS, U, D, TABLE, FIRST, TILES)                      \
  ((c).ksplit == KS && (c).groups == U && (c).depth == D && (c).table == TABLE && \
   (c).deltas_first == FIRST && (c).tiles == TILES)

template <typename T, int NT>
cudaError_t dispatch_config(const Nf4TiledGemvParams& p, Nf4TiledGemvConfig c,
                            cudaStream_t stream, size_t* workspace_bytes) {
#define SPFT_TILED_CASE(KS, U, D, TABLE, FIRST, TILES)         \
  if (SPFT_TILED_MATCHES(c, KS, U, D, TABLE, FIRST, TILES)) \
    return launch<T, NT, KS, U, D, TABLE, FIRST, TILES>(p, stream, workspace_bytes);
  SPFT_TILED_CONFIGS(SPFT_TILED_CASE)
#undef SPFT_TILED_CASE
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_tokens(const Nf4TiledGemvParams& p, Nf4TiledGemvConfig c,
                            cudaStream_t stream, size_t* workspace_bytes) {
  return p.tokens <= 8 ? dispatch_config<T, 1>(p, c, stream, workspace_bytes)
                       : dispatch_config<T, 2>(p, c, stream, workspace_bytes);
}

cudaError_t dispatch(const Nf4TiledGemvParams& p, Nf4TiledGemvConfig c, cudaStream_t stream,
                     size_t* workspace_bytes) {
  if (p.tokens < 1 || p.tokens > 16 || p.in_features % kGroup != 0 || p.in_features < kGroup ||
      p.out_features < 1 || !nf4_gemv_tiled_config_supported(c) ||
      (p.dv != nullptr && (p.idx == nullptr || p.row_ptr == nullptr)) ||
      !(p.split_parts == -1 || p.split_parts == 0 || p.split_parts == 1 || p.split_parts == 2 ||
        p.split_parts == 4 || p.split_parts == 8)) {
    return cudaErrorInvalidValue;
  }
  switch (p.x_kind) {
    case FloatKind::kBFloat16:
      return dispatch_tokens<__nv_bfloat16>(p, c, stream, workspace_bytes);
    case FloatKind::kFloat16:
      return dispatch_tokens<__half>(p, c, stream, workspace_bytes);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool nf4_gemv_tiled_config_supported(Nf4TiledGemvConfig c) {
#define SPFT_TILED_KNOWN(KS, U, D, TABLE, FIRST, TILES) \
  if (SPFT_TILED_MATCHES(c, KS, U, D, TABLE, FIRST, TILES)) return true;
  SPFT_TILED_CONFIGS(SPFT_TILED_KNOWN)
#undef SPFT_TILED_KNOWN
  return false;
}

int nf4_gemv_tiled_configs(Nf4TiledGemvConfig* out, int capacity) {
  int n = 0;
#define SPFT_TILED_LIST(KS, U, D, TABLE, FIRST, TILES)                          \
  if (n < capacity) out[n] = Nf4TiledGemvConfig{KS, U, D, TABLE, FIRST, TILES}; \
  ++n;
  SPFT_TILED_CONFIGS(SPFT_TILED_LIST)
#undef SPFT_TILED_LIST
  return n;
}

// Measured on the H200 at 1, 2, 4, 8 and 16 tokens (benchmarks/RESULTS.md, tenth session). Up
// to 8 tokens the 32-copy pair table, six tiles per block: one table per SM leaves the deltas'
// x gathers the L1 that six tables took (8 tokens with deltas: 17.0 against 35.6 µs with one
// tile per block, 21.7 for the register decode). Unless the tiles are more than six per SM:
// a second round of six-tile blocks would double the time, where a second wave of one-tile
// blocks adds one tile's; then one tile per block, the table up to 2 tokens and the register
// decode past them (5120 → 13824 at 4 tokens: 31.6 against 34.8 µs for six tiles per block).
// Past 8 tokens the register decode, one group per slot (16 tokens: 27.1 against 33.2 µs for
// the shared table).
Nf4TiledGemvConfig nf4_gemv_tiled_default_config(int tokens, int out_features) {
  if (tokens > 8) return Nf4TiledGemvConfig{4, 1, 2, 0, 0, 1};
  int device = 0;
  const int sms = cudaGetDevice(&device) == cudaSuccess ? sm_count(device) : 0;
  const int64_t tiles = (static_cast<int64_t>(out_features) + 15) / 16;
  if (sms > 0 && tiles > 6 * static_cast<int64_t>(sms)) {
    return tokens <= 2 ? Nf4TiledGemvConfig{4, 2, 2, 2, 0, 1}
                       : Nf4TiledGemvConfig{4, 2, 2, 0, 0, 1};
  }
  return Nf4TiledGemvConfig{4, 2, 2, 2, 0, 6};
}

cudaError_t nf4_gemv_tiled_workspace_bytes(const Nf4TiledGemvParams& p, Nf4TiledGemvConfig c,
                                           size_t* bytes) {
  *bytes = 0;
  return dispatch(p, c, nullptr, bytes);
}

cudaError_t nf4_gemv_tiled(const Nf4TiledGemvParams& p, Nf4TiledGemvConfig c,
                           cudaStream_t stream) {
  return dispatch(p, c, stream, nullptr);
}

}  // namespace spft
