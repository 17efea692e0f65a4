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
// the ALU pipe). In 32 copies (no bank conflicts) it is the default up to 8 tokens without
// deltas and up to 2 with them; 16 copies at 3-6 tokens with deltas (see
// nf4_gemv_tiled_default_config).
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
// Tail split. All blocks of a layer's grid are resident at once (6 per SM with the 32 KB table),
// so the SMs that hold one tile more than the others set the time: 11008 rows are 688 tiles,
// 5.21 per SM of an H200, and cost as much as 6 per SM (benchmarks/RESULTS.md, eighth session).
// The last tiles % SMs tiles can instead be split along K over `parts` blocks each (SplitTiles):
// each block writes its fp32 sums to the workspace, and the one that arrives last at the tile's
// counter adds them up, plus the bias, and writes y. Part 0 adds the deltas.
#include "nf4_gemv.cuh"

#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nf4_gemv_common.cuh"

namespace spft {
namespace {

using gemv::Half2;

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
// prefetched into L1 at the start.
template <typename T, int NT, int KS, int U, int D, int kCopies, bool kDeltasFirst>
__global__ void __launch_bounds__(KS * 32, tiled_min_warps_per_sm(NT, U * D) / KS)
nf4_gemv_tiled_kernel(const Nf4TiledGemvParams p, const SplitTiles split) {
  using H = Half2<T>;
  constexpr int kRows = 16;
  constexpr int kTokens = 8 * NT;
  constexpr int kDepth = D;  // slots in flight per warp

  __shared__ float s_partial[KS][kRows][kTokens];
  __shared__ int32_t s_row_ptr[kRows + 1];
  __shared__ float s_delta[kDeltasFirst ? kRows : 1][kTokens];
  __shared__ bool s_last;
  static_assert(kRows + 1 <= KS * 32, "one thread per row pointer");

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int groups = p.in_features / kGroup;
  // The block's tile and its groups [part_first, part_end).
  int tile = blockIdx.x;
  int part = 0;
  int part_first = 0;
  int part_end = groups;
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
  const bool deltas_here = p.dv != nullptr && part == 0;

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
    for (int chunk = threadIdx.x; chunk < 256 * kChunksPerEntry; chunk += KS * 32) {
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
  }

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
    gemv::block_deltas<H, T, kRows, kTokens, KS * 32>(
        p, row0, rows_here, [&](int r) { return gemv::row_run(p, row0 + r); },
        [&](int r, int token, float sum) { s_delta[r][token] = sum; });
  } else if (deltas_here) {
    gemv::stage_deltas(p, row0, rows_here, s_row_ptr);
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

  // c0, c1 = row g, tokens 2t, 2t + 1; c2, c3 = row g + 8.
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int c = nt * 8 + 2 * t;
    s_partial[warp][g][c] = acc[nt][0];
    s_partial[warp][g][c + 1] = acc[nt][1];
    s_partial[warp][g + 8][c] = acc[nt][2];
    s_partial[warp][g + 8][c + 1] = acc[nt][3];
  }
  if (!is_split) {
    gemv::finish_block<H, T, kRows, kTokens, KS, kDeltasFirst>(
        p, row0, rows_here, deltas_here, s_partial, s_row_ptr, s_delta);
    return;
  }

  // A split tile: publish this part's sums (L2, past the non-coherent L1), count the arrival,
  // and let the last part's block add all of them up.
  const int split_index = tile - split.whole;
  float* partials = split.partials + static_cast<int64_t>(split_index) * split.parts * kRows * 16;
  gemv::sum_block<H, T, kRows, kTokens, KS, kDeltasFirst>(
      p, row0, rows_here, deltas_here, s_partial, s_row_ptr, s_delta,
      [&](int r, int token, float sum) { __stcg(partials + (part * kRows + r) * 16 + token, sum); });
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = arrive_last(split.counters + split_index, split.epoch, split.parts);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int o = threadIdx.x; o < kRows * p.tokens; o += blockDim.x) {
    const int token = o / kRows;
    const int r = o % kRows;
    if (r >= rows_here) continue;
    float sum = 0.f;
    for (int q = 0; q < split.parts; ++q) sum += __ldcg(partials + (q * kRows + r) * 16 + token);
    gemv::store_output<H, T>(p, row0, r, token, sum);
  }
}

struct SplitPlan {
  int whole;        // tiles owned by one block each
  int split_tiles;  // tiles after them, split into `parts`
  int parts;
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

// The split for `tiles` row tiles of `groups` groups each on `sms` SMs that hold `resident`
// blocks each. Requested parts (2, 4, 8) split the tail unconditionally. Automatic (-1): the
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
template <typename T, int NT, int KS, int U, int D, int TABLE, int FIRST>
cudaError_t launch(const Nf4TiledGemvParams& p, cudaStream_t stream, size_t* workspace_bytes) {
  const auto kernel =
      nf4_gemv_tiled_kernel<T, NT, KS, U, D, TABLE == 0 ? 0 : TABLE == 1 ? 16 : 32, FIRST == 1>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::atomic<int> resident_cache{0};  // blocks per SM: the same on every device in use
  int resident = resident_cache.load(std::memory_order_relaxed);
  if (resident == 0) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, KS * 32, 0);
    if (err != cudaSuccess) return err;
    resident_cache.store(resident, std::memory_order_relaxed);
  }
  const int tiles = (p.out_features + 15) / 16;
  const SplitPlan plan =
      plan_split(tiles, p.in_features / kGroup, p.split_parts, sm_count(device), resident);
  if (workspace_bytes != nullptr) {
    *workspace_bytes = split_workspace_bytes(plan);
    return cudaSuccess;
  }
  SplitTiles split{plan.whole, plan.parts, nullptr, nullptr, p.split_epoch};
  if (plan.split_tiles > 0) {
    if (p.workspace == nullptr || p.split_epoch >= (1ull << 61)) return cudaErrorInvalidValue;
    split.counters = static_cast<unsigned long long*>(p.workspace);
    split.partials = reinterpret_cast<float*>(split.counters + plan.split_tiles);
  }
  kernel<<<plan.whole + plan.split_tiles * plan.parts, KS * 32, 0, stream>>>(p, split);
  return cudaGetLastError();
}

// The compiled configurations: (warps splitting K, groups per slot, slots in flight, decode:
// 0 registers, 1 shared byte-pair table of 16 copies, 2 of 32 copies; deltas: 0 after the main
// loop, 1 before it).
// These are the ones the defaults use. The other combinations measured in the ninth session
// (deltas first with registers or the 16-copy table, one group per slot with a table) never won
// at any token count (benchmarks/RESULTS.md) and are not compiled.
#define SPFT_TILED_CONFIGS(X) \
  X(4, 2, 2, 0, 0)            \
  X(4, 1, 2, 0, 0)            \
  X(4, 2, 2, 1, 0)            \
  X(4, 2, 2, 2, 1)            \
  X(4, 2, 2, 2, 0)

#define SPFT_TILED_MATCHES(c, KS, U, D, TABLE, FIRST)                                    \
  ((c).ksplit == KS && (c).groups == U && (c).depth == D && (c).table == TABLE && \
   (c).deltas_first == FIRST)

template <typename T, int NT>
cudaError_t dispatch_config(const Nf4TiledGemvParams& p, Nf4TiledGemvConfig c,
                            cudaStream_t stream, size_t* workspace_bytes) {
#define SPFT_TILED_CASE(KS, U, D, TABLE, FIRST)         \
  if (SPFT_TILED_MATCHES(c, KS, U, D, TABLE, FIRST)) \
    return launch<T, NT, KS, U, D, TABLE, FIRST>(p, stream, workspace_bytes);
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
#define SPFT_TILED_KNOWN(KS, U, D, TABLE, FIRST) \
  if (SPFT_TILED_MATCHES(c, KS, U, D, TABLE, FIRST)) return true;
  SPFT_TILED_CONFIGS(SPFT_TILED_KNOWN)
#undef SPFT_TILED_KNOWN
  return false;
}

int nf4_gemv_tiled_configs(Nf4TiledGemvConfig* out, int capacity) {
  int n = 0;
#define SPFT_TILED_LIST(KS, U, D, TABLE, FIRST)                          \
  if (n < capacity) out[n] = Nf4TiledGemvConfig{KS, U, D, TABLE, FIRST}; \
  ++n;
  SPFT_TILED_CONFIGS(SPFT_TILED_LIST)
#undef SPFT_TILED_LIST
  return n;
}

// Measured on the H200 at 1, 2, 4, 5, 6, 8 and 16 tokens (benchmarks/RESULTS.md, ninth session).
// Without deltas the 32-copy pair table is fastest up to 8 tokens. With deltas its 32 KB per
// block leave their x gathers too little L1 past 2 tokens (8 tokens: 30 against 22 µs): up to 6
// tokens the 16-copy table then wins (6 tokens: 20.5 against 21.3 µs for the register decode),
// at 8 the register decode (21.4 against 22.1 µs; 7 tokens, unmeasured, goes with 8). Past 8
// tokens the register decode throughout (the 16 KB table cost the gathers' L1 there too: 41
// against 27 µs). The deltas go first only at one token, where they are one x gather each.
Nf4TiledGemvConfig nf4_gemv_tiled_default_config(int tokens, bool deltas) {
  if (tokens > 8) return Nf4TiledGemvConfig{4, 1, 2, 0, 0};
  if (!deltas) return Nf4TiledGemvConfig{4, 2, 2, 2, 0};
  if (tokens == 1) return Nf4TiledGemvConfig{4, 2, 2, 2, 1};
  if (tokens == 2) return Nf4TiledGemvConfig{4, 2, 2, 2, 0};
  if (tokens <= 6) return Nf4TiledGemvConfig{4, 2, 2, 1, 0};
  return Nf4TiledGemvConfig{4, 2, 2, 0, 0};
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
