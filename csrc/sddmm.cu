// Sparse-delta gradient (SDDMM) on the tensor cores, without the dense dW: see sddmm.cuh.
//
// A dense tile of dW = dyᵀ x computes every product; at 1 % random density only one in a
// hundred is wanted. Here each mma.m16n8k16 computes C[16 × 8] += A[16 × 16 tokens] ·
// B[16 tokens × 8]. B holds 8 consecutive features of one operand (a "block": 8 dy rows or 8
// x columns), A the features of the other operand that the wanted entries in that block pair
// them with, gathered: entry i's gradient is C[i][its blocked feature − 8·block]. One mma
// yields up to 16 wanted values (a dense tile's yields about one), with exact bf16/fp16 products
// and fp32 accumulation.
//
// The gathered operand is read transposed and stage-blocked (made by sddmm_prepare),
// so that 16 bytes of a feature's tokens are one ldmatrix row and a stage's tile is contiguous;
// it is the smaller one (x when N ≤ M, else dy), which makes the transposition cheap.
//
// One block owns a tile of kTile × kTile of the weight and a range of tokens:
// 1. It lists the tile's indices (at most kPassEntries per pass), groups them by block and
//    deals each block's entries into 8-row matrices (two per mma group) so that the 8 rows an
//    ldmatrix phase gathers mostly sit on distinct shared-memory banks: an entry goes to matrix
//    ρ at position (its gathered feature's bank), ρ being its rank among the block's entries on
//    that bank; ranks past the block's matrices fill the positions left empty (a 2-way
//    conflict).
// 2. Each warp takes G consecutive groups (G = the pass's groups per warp, padded with empty
//    ones; the code is instantiated for G = 1 … 16 so the group loop has no exits). It keeps one
//    word per group (its A slot, its block and whether B changes there) and the fp32
//    accumulators in registers.
// 3. It streams its tokens in stages of 16 through a ring of four stages (cp.async). By
//    default (kFillStageBarriers) two stages are in flight and each stage has a full and an
//    empty barrier, so warps drift apart instead of meeting at a block barrier every stage.
//    A stage holds the gathered operand's tile features as two planes of 8 tokens,
//    16 bytes per feature per plane, XOR-swizzled (see slot), and the blocked operand's 16 token
//    rows as they lie in memory, chunks swizzled so that ldmatrix.trans (B, reloaded only where
//    the block changes) is conflict-free. The stage loop is unrolled by the ring's length, so
//    every shared address is a register plus a constant.
// 4. Each wanted C element is written to the block's split of the output.
#include "sddmm.cuh"

#include <algorithm>
#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "half2.cuh"

namespace spft {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = kSddmmTile;          // weight rows and columns per tile
constexpr int kBlocks = kTile / 8;         // blocks of 8 blocked features per tile
constexpr int kStage = 16;                 // tokens per stage
constexpr int kPlaneBytes = kTile * 16;    // 8 tokens of every gathered feature
constexpr int kGatheredBytes = 2 * kPlaneBytes;  // the gathered operand's 16 tokens
constexpr int kTokenRowBytes = kTile * 2;        // one token's blocked features, as in memory
constexpr int kRawBytes = kGatheredBytes + kStage * kTokenRowBytes;  // one ring stage
constexpr int kRing = 4;                         // stages: the one in use and 3 in flight
constexpr int kPassEntries = 3072;         // entries listed per pass over the tokens
// Groups per pass: Σ_blocks ceil(n_b / 16) ≤ kPassEntries / 16 + kBlocks; per warp, in registers.
constexpr int kMaxGroups = kPassEntries / 16 + kBlocks;
constexpr int kGroupsPerWarp = (kMaxGroups + kWarps - 1) / kWarps;

static_assert(kTile == kThreads, "one tile row per thread when listing the runs");
static_assert(kStage * kTile / 8 == 2 * kThreads, "two blocked chunks per thread and stage");
static_assert(2 * kTile == 2 * kThreads, "two gathered chunks per thread and stage");
static_assert(kGroupsPerWarp <= 16, "stream_pass is instantiated for up to 16 groups per warp");

struct SharedLayout {
  static constexpr size_t kRaw = 0;                                  // [kRing] stages
  static constexpr size_t kListed = kRaw + kRing * kRawBytes;        // u32 [kPassEntries]
  static constexpr size_t kListedAt = kListed + kPassEntries * 4;    // i32 [kPassEntries]
  static constexpr size_t kRecords = kListedAt + kPassEntries * 4;        // u32 [groups][16]
  static constexpr size_t kPositions = kRecords + kMaxGroups * 16 * 4;    // i32 [groups][16]
  static constexpr size_t kRowFirst = kPositions + kMaxGroups * 16 * 4;   // i32 [kTile]
  static constexpr size_t kRowOffset = kRowFirst + kTile * 4;             // i32 [kTile]
  static constexpr size_t kBankCount = kRowOffset + kTile * 4;            // i32 [kBlocks][8]
  static constexpr size_t kOverflow = kBankCount + kBlocks * 8 * 4;       // i32 [kBlocks]
  static constexpr size_t kGroupStart = kOverflow + kBlocks * 4;          // i32 [kBlocks + 1]
  static constexpr size_t kWarpSums = kGroupStart + (kBlocks + 1) * 4;    // i32 [kWarps + 1]
  // u64 [2][kRing]: the stages' full and empty barriers (kFillStageBarriers)
  static constexpr size_t kBarriers = (kWarpSums + (kWarps + 1) * 4 + 7) / 8 * 8;
  static constexpr size_t kBytes = kBarriers + 2 * kRing * 8;
};
static_assert(SharedLayout::kBytes <= 227 * 1024, "over the shared memory of a block");

// Where gathered feature r keeps its 8 tokens of plane h, in 16-byte slots. A gathering
// ldmatrix phase reads 8 features; the deal puts features with distinct r & 7 there, whose
// slots sit on distinct banks (plane 1 flips bit 2, the same permutation for all).
__device__ __forceinline__ int slot(int r, int h) { return r ^ (h << 2); }

// A thread's share of copying one stage into a ring slot:
// * gathered: feature f = thread's planes 0 and 1 (tokens 0-7 and 8-15 of the stage), 16 bytes
//   each; in the stage-blocked layout a warp reads 512 contiguous bytes per instruction;
// * blocked: 16-byte chunk c = thread % 64 of token rows t = thread / 64 and t + 8, as they lie
//   in memory (a warp copies 512 contiguous bytes per instruction); chunk c of token t goes to
//   position c ^ (t & 7), so the 8 token rows an ldmatrix.trans reads sit on distinct banks.
// Past the token range or the operand's width the copy fills zeros.
struct StageCopier {
  const char* g_src;       // its gathered plane-0 chunk in stage 0 (the operand's start if outside)
  const char* b_src;       // its first blocked chunk in stage 0 (the operand's start if outside)
  uint32_t g_plane_step;   // bytes from its plane-0 chunk to its plane-1 chunk
  uint32_t b_stage_step;   // bytes from one blocked stage to the next (16 rows); 0 outside
  uint32_t b_row_step;     // bytes from its first blocked chunk to its second (8 rows); 0 outside
  uint32_t g_dst;          // offset in a slot of its plane-0 chunk
  uint32_t b_dst;          // offset in a slot of its first blocked chunk (the second: + 8 rows)
  int token;               // its first blocked token row within a stage (0-7)
  uint32_t inside;         // bit 0: its gathered feature inside; bit 1: its blocked chunk

  __device__ __forceinline__ StageCopier(const SddmmParams& p, int t_begin, int row0, int col0) {
    const int g0 = p.gather_cols ? col0 : row0, b0 = p.gather_cols ? row0 : col0;
    const int g_dim = p.gather_cols ? p.cols : p.rows, b_dim = p.gather_cols ? p.rows : p.cols;
    const char* g_origin = static_cast<const char*>(p.gathered);
    const char* b_origin = static_cast<const char*>(p.blocked);
    const int f = threadIdx.x;
    const bool g_in = g0 + f < g_dim;
    g_src = g_in ? g_origin + (static_cast<int64_t>(t_begin / kStage) * 2 * g_dim + g0 + f) * 16
                 : g_origin;
    g_plane_step = static_cast<uint32_t>(g_dim) * 16u;
    g_dst = slot(f, 0) * 16;
    token = threadIdx.x / (kTile / 8);
    const int chunk = threadIdx.x % (kTile / 8);
    const int first = b0 + chunk * 8;
    const bool b_in = first < b_dim;
    inside = (g_in ? 1u : 0u) | (b_in ? 2u : 0u);
    b_src = b_in ? b_origin + (static_cast<int64_t>(t_begin + token) * p.ldb + first) * 2
                 : b_origin;
    b_stage_step = b_in ? static_cast<uint32_t>(p.ldb * kStage * 2) : 0u;
    b_row_step = b_in ? static_cast<uint32_t>(p.ldb * 8 * 2) : 0u;
    b_dst = kGatheredBytes + token * kTokenRowBytes + ((chunk ^ token) * 16);
  }

  // Issues stage st's copies (tokens t_begin + 16·st + …, clipped at t_end) into `raw`.
  // Zero-filled chunks read nothing and point at their own row (or the operand's start).
  __device__ __forceinline__ void copy(uint32_t raw, int st, int t_begin, int t_end) const {
    const int left = t_end - (t_begin + st * kStage);  // tokens of this stage in range
    const bool whole = left >= kStage;
    const char* g_base = g_src + static_cast<uint64_t>(st) * (2 * g_plane_step);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // This plane's tokens in range, 2 bytes each (none outside the operand).
      const uint32_t bytes = !(inside & 1) ? 0u
                             : whole       ? 16u
                                           : static_cast<uint32_t>(min(8, max(0, left - 8 * h)) * 2);
      copy_chunk(raw + h * kPlaneBytes + (g_dst ^ (h << 6)),
                 (inside & 1) ? g_base + h * g_plane_step : g_src, bytes);
    }
    const char* b_base = b_src + static_cast<uint64_t>(st) * b_stage_step;
    const uint32_t b_bytes = (inside & 2) ? 16u : 0u;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool in_range = whole || token + 8 * i < left;
      copy_chunk(raw + b_dst + i * 8 * kTokenRowBytes,
                 in_range ? b_base + i * b_row_step : b_src, in_range ? b_bytes : 0u);
    }
  }

  __device__ __forceinline__ static void copy_chunk(uint32_t to, const char* from,
                                                    uint32_t bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from),
                 "r"(bytes));
  }
};
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// How the ring's stages are filled and handed over (SddmmParams::fill):
// * kFillBlockBarrier: every thread copies its share of a stage with cp.async three stages
//   ahead; a block-wide barrier per stage makes a stage visible and frees the slot refilled.
// * kFillStageBarriers: the landing of each thread's copies arrives on the stage's "full"
//   barrier, which every warp waits on; after its last read of a stage a warp arrives on the
//   stage's "empty" barrier, which a thread waits on before it refills that slot. Copies run two
//   stages ahead, so the slot refilled was released a stage earlier: no warp waits for the
//   slowest one at every stage.
constexpr int kFillBlockBarrier = 0, kFillStageBarriers = 1;
template <int kFill>
constexpr int kAhead = kFill == kFillStageBarriers ? kRing - 2 : kRing - 1;

__device__ __forceinline__ void barrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n"
               ::"r"(bar) : "memory");
}
// The barrier's pending count drops by one once this thread's earlier cp.async copies land.
__device__ __forceinline__ void barrier_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase of the given parity has completed.
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT;\n}\n"
      ::"r"(bar), "r"(parity) : "memory");
#elif defined(__CUDA_ARCH__)
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT:\n"
      " mbarrier.test_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT;\n}\n"
      ::"r"(bar), "r"(parity) : "memory");
#endif
}

// kFillStageBarriers, per thread: the parity each slot's full barrier completes next, the slots
// filled before, and the parity their empty barriers complete next.
struct StagePhases {
  uint32_t full_parity = 0, empty_parity = 0, used = 0;
};

__device__ __forceinline__ uint32_t full_barrier(uint32_t smem_base, int slot) {
  return smem_base + static_cast<uint32_t>(SharedLayout::kBarriers) + slot * 8;
}
__device__ __forceinline__ uint32_t empty_barrier(uint32_t smem_base, int slot) {
  return full_barrier(smem_base, kRing + slot);
}

// kFillStageBarriers, every thread: its copies of stage st into `slot`, once every warp has
// released the slot's previous stage; their landing arrives on the slot's full barrier.
__device__ __forceinline__ void issue_stage(const StageCopier& copier, StagePhases& phases,
                                            uint32_t smem_base, int slot, int st, int t_begin,
                                            int t_end) {
  if ((phases.used >> slot) & 1u) {
    barrier_wait(empty_barrier(smem_base, slot), (phases.empty_parity >> slot) & 1u);
    phases.empty_parity ^= 1u << slot;
  }
  phases.used |= 1u << slot;
  copier.copy(smem_base + SharedLayout::kRaw + slot * kRawBytes, st, t_begin, t_end);
  barrier_arrive_on_copies(full_barrier(smem_base, slot));
}

// A group's fragments for one stage from its word (see stream_pass): A from `a_planes` plus
// the word's A offset; B, only where bit 31 is set (otherwise b0, b1 keep the previous group's),
// from `b_slot` plus the word's column chunk. The address arithmetic sits inside the asm so the
// compiler cannot hoist it out of the token loop as one more live register per group.
__device__ __forceinline__ void load_group_fragments(uint32_t (&a)[4], uint32_t& b0,
                                                     uint32_t& b1, uint32_t word,
                                                     uint32_t a_planes, uint32_t b_slot) {
  asm volatile(
      "{\n .reg .b32 a_at, b_at;\n .reg .pred reload;\n"
      " and.b32 a_at, %6, 0xFFFF;\n add.u32 a_at, a_at, %7;\n"
      " ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [a_at];\n"
      " shr.u32 b_at, %6, 12;\n and.b32 b_at, b_at, 0x3F0;\n add.u32 b_at, b_at, %8;\n"
      " setp.lt.s32 reload, %6, 0;\n"
      " @reload ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%4,%5}, [b_at];\n}\n"
      : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]), "+r"(b0), "+r"(b1)
      : "r"(word), "r"(a_planes), "r"(b_slot));
}

// Exclusive prefix sum of one value per thread over the block; returns the total.
__device__ __forceinline__ int block_exclusive_scan(int value, int& exclusive, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int own = lane < kWarps ? warp_sums[lane] : 0;
    int s = own;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s += other;
    }
    if (lane < kWarps) warp_sums[lane] = s - own;
    if (lane == kWarps - 1) warp_sums[kWarps] = s;
  }
  __syncthreads();
  exclusive = warp_sums[warp] + inclusive - value;
  const int total = warp_sums[kWarps];
  __syncthreads();  // warp_sums may be reused
  return total;
}

// Listed entry: its gathered feature in the tile (9 bits) | its blocked feature (9 bits) | its
// rank on its bank (14 bits).
__device__ __forceinline__ uint32_t pack_listed(int g, int b, int rank) {
  return static_cast<uint32_t>(g) | (static_cast<uint32_t>(b) << 9) |
         (static_cast<uint32_t>(rank) << 18);
}
// Group slot record: the group's block (bits 16-21) | the tile feature it gathers (bits 4-12)
// | valid (bit 3) | blocked feature in the block (bits 0-2). An empty position gathers feature
// `position`, whose slot sits on its own bank, and is not written.
constexpr uint32_t kValid = 8;
constexpr int kBlockShift = 16;
__device__ __forceinline__ uint32_t group_record(int block, int row, uint32_t valid_column) {
  return (static_cast<uint32_t>(block) << kBlockShift) | (static_cast<uint32_t>(row) << 4) |
         valid_column;
}

// What a pass hands to the token stream.
struct PassState {
  const uint32_t* records;  // [groups][16]
  const int32_t* positions; // [groups][16]
  float* out;               // the piece's plane of the output (zeroed; the gradients are added)
  uint32_t smem_base;       // shared address of the dynamic shared memory
  int t_begin, t_end, n_stages;
  bool prologue_issued;     // the first stages' copies (issue_prologue) are already in flight
};

// Issues the copies of the first kAhead stages (kFillBlockBarrier: and commits one group per
// stage).
template <int kFill>
__device__ __forceinline__ void issue_prologue(const StageCopier& copier, StagePhases& phases,
                                               uint32_t smem_base, int t_begin, int t_end,
                                               int n_stages) {
#pragma unroll
  for (int i = 0; i < kAhead<kFill>; ++i) {
    if constexpr (kFill == kFillStageBarriers) {
      if (i < n_stages) issue_stage(copier, phases, smem_base, i, i, t_begin, t_end);
    } else {
      if (i < n_stages) {
        copier.copy(smem_base + SharedLayout::kRaw + i * kRawBytes, i, t_begin, t_end);
      }
      commit_copies();
    }
  }
}

// Streams the block's tokens through the pass's groups, G per warp (a compile-time count, so
// the group loop has no exits and its accumulators and addresses stay in registers), and
// writes the wanted gradients.
template <typename T, int kFill, int G>
__device__ __forceinline__ void stream_pass(const PassState& ps, const StageCopier& copier,
                                            StagePhases& phases) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int my_first = warp * G;
  // A: lane l gathers feature (l & 7) + 8·((l >> 3) & 1) of its group in plane l >> 4.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int a_plane = lane >> 4;
  // B (ldmatrix.trans): lanes 0-15 point at token rows 0-15 of the block's 8 features.
  const int b_token = lane & 15;
  const uint32_t raw0 = ps.smem_base + SharedLayout::kRaw;
  const uint32_t b_base = raw0 + kGatheredBytes + b_token * kTokenRowBytes;
  // One word per group: this lane's A offset in a stage (bits 4-13), its B chunk (bits 16-21)
  // and, warp-uniform, whether the block differs from the previous group's (bit 31: B is
  // reloaded then).
  uint32_t group_word[G];
  int prev_block = -1;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const uint32_t record = ps.records[(my_first + g) * 16 + a_row];
    const int block = static_cast<int>(record >> kBlockShift);
    const int row = static_cast<int>((record >> 4) & 511u);
    group_word[g] = static_cast<uint32_t>(a_plane * kPlaneBytes + slot(row, a_plane) * 16) |
                    (static_cast<uint32_t>(block ^ (b_token & 7)) << 16) |
                    (block != prev_block ? 1u << 31 : 0u);
    prev_block = block;
  }
  float acc[G][4];
#pragma unroll
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f;

  // Ring: stage st in slot st % kRing; copies run kAhead stages ahead (three with the block
  // barrier, two with the stage barriers). The loop is unrolled by the ring's length so that
  // every shared address is a register plus a constant.
  if (!ps.prologue_issued) {
    issue_prologue<kFill>(copier, phases, ps.smem_base, ps.t_begin, ps.t_end, ps.n_stages);
  }
  for (int st0 = 0; st0 < ps.n_stages; st0 += kRing) {
#pragma unroll
    for (int u = 0; u < kRing; ++u) {
      const int st = st0 + u;
      if (st >= ps.n_stages) break;
      if constexpr (kFill == kFillStageBarriers) {
        barrier_wait(full_barrier(ps.smem_base, u), (phases.full_parity >> u) & 1u);
        phases.full_parity ^= 1u << u;
        if (st + kAhead<kFill> < ps.n_stages) {
          issue_stage(copier, phases, ps.smem_base, (u + kAhead<kFill>) % kRing,
                      st + kAhead<kFill>, ps.t_begin, ps.t_end);
        }
      } else {
        wait_copies<kRing - 2>();  // stage st has landed (this thread's copies) …
        __syncthreads();           // … everyone's; slot st − 1 is free
        if (st + kRing - 1 < ps.n_stages) {
          copier.copy(raw0 + ((u + kRing - 1) % kRing) * kRawBytes, st + kRing - 1, ps.t_begin,
                      ps.t_end);
        }
        commit_copies();
      }
      uint32_t b0 = 0, b1 = 0;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        uint32_t a[4];
        load_group_fragments(a, b0, b1, group_word[g], raw0 + u * kRawBytes,
                             b_base + u * kRawBytes);
        Half2<T>::mma(acc[g], a, b0, b1);
      }
      if constexpr (kFill == kFillStageBarriers) {
        __syncwarp();
        if (lane == 0) barrier_arrive(empty_barrier(ps.smem_base, u));
      }
    }
  }
  if constexpr (kFill == kFillBlockBarrier) wait_copies<0>();

  // C[i][j] of lane l: i = l / 4 (+8 for values 2, 3), j = 2·(l % 4) (+1 for odd values).
  // Padding groups (past the pass's last) hold no valid record.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int group = my_first + g;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = (lane >> 2) + 8 * (v >> 1);
      const uint32_t record = ps.records[group * 16 + i];
      if ((record & kValid) && static_cast<int>(record & 7) == 2 * (lane & 3) + (v & 1)) {
        atomicAdd(ps.out + ps.positions[group * 16 + i], acc[g][v]);
      }
    }
  }
}

// stream_pass for the pass's groups per warp, 1 … kGroupsPerWarp.
template <typename T, int kFill, int G = 1>
__device__ __forceinline__ void stream_pass_for(int per_warp, const PassState& ps,
                                                const StageCopier& copier, StagePhases& phases) {
  if constexpr (G < kGroupsPerWarp) {
    if (per_warp > G) {
      stream_pass_for<T, kFill, G + 1>(per_warp, ps, copier, phases);
      return;
    }
  }
  stream_pass<T, kFill, G>(ps, copier, phases);
}

// Segments: the tiles' stages in a row (tile-major), units = tiles · stages; block b owns
// units [b·units / blocks, (b + 1)·units / blocks), and unit u lies in block
// ((u + 1)·blocks − 1) / units. Every tile's stage counts the same: weighing a partial tile's
// stages by its area was slower (its gathered copy is whole; benchmarks/RESULTS.md).
__host__ __device__ inline int64_t segment_start(int64_t b, int64_t units, int64_t blocks) {
  return b * units / blocks;
}
__host__ __device__ inline int64_t segment_of(int64_t u, int64_t units, int64_t blocks) {
  return ((u + 1) * blocks - 1) / units;
}

// One piece of a block's work: a tile over a range of its tokens, added to one plane of the
// output (or, accumulating, to the output).
struct Piece {
  int tile;
  int t_begin, t_end;
  int plane;
};

// A piece without entries streams nothing: the prologue's stages land, and (kFillStageBarriers)
// their slots are released, before the block moves on.
template <int kFill>
__device__ __forceinline__ void drain_prologue(StagePhases& phases, uint32_t smem_base,
                                               int n_stages) {
  if constexpr (kFill == kFillStageBarriers) {
    for (int i = 0; i < kAhead<kFill> && i < n_stages; ++i) {
      barrier_wait(full_barrier(smem_base, i), (phases.full_parity >> i) & 1u);
      phases.full_parity ^= 1u << i;
      __syncwarp();
      if ((threadIdx.x & 31) == 0) barrier_arrive(empty_barrier(smem_base, i));
    }
  } else {
    wait_copies<0>();
  }
}

template <typename T, int kFill>
__device__ __forceinline__ void run_piece(const SddmmParams& p, const Piece& piece,
                                          uint8_t* smem, uint32_t smem_base,
                                          StagePhases& phases) {
  uint32_t* listed = reinterpret_cast<uint32_t*>(smem + SharedLayout::kListed);
  int32_t* listed_at = reinterpret_cast<int32_t*>(smem + SharedLayout::kListedAt);
  uint32_t* records = reinterpret_cast<uint32_t*>(smem + SharedLayout::kRecords);
  int32_t* positions = reinterpret_cast<int32_t*>(smem + SharedLayout::kPositions);
  int32_t* row_first = reinterpret_cast<int32_t*>(smem + SharedLayout::kRowFirst);
  int32_t* row_offset = reinterpret_cast<int32_t*>(smem + SharedLayout::kRowOffset);
  int32_t* bank_count = reinterpret_cast<int32_t*>(smem + SharedLayout::kBankCount);
  int32_t* overflow = reinterpret_cast<int32_t*>(smem + SharedLayout::kOverflow);
  int32_t* group_start = reinterpret_cast<int32_t*>(smem + SharedLayout::kGroupStart);
  int32_t* warp_sums = reinterpret_cast<int32_t*>(smem + SharedLayout::kWarpSums);

  const int col_tiles = (p.cols + kTile - 1) / kTile;
  const int tile_col = piece.tile % col_tiles;
  const int row0 = (piece.tile / col_tiles) * kTile;
  const int col0 = tile_col * kTile;
  const int t_begin = piece.t_begin, t_end = piece.t_end;
  // The output starts zeroed (sddmm_prepare): indices outside the weight lie in no tile and
  // keep their 0.
  float* out = p.accumulate ? p.out : p.out + static_cast<int64_t>(piece.plane) * p.k;
  if (t_begin >= t_end) return;
  const int n_stages = (t_end - t_begin + kStage - 1) / kStage;
  // The first stages' copies do not depend on the listing: issue them now, so that they land
  // while the block lists and deals its entries.
  const StageCopier copier(p, t_begin, row0, col0);
  issue_prologue<kFill>(copier, phases, smem_base, t_begin, t_end, n_stages);

  // The tile's runs in idx: thread i owns tile row i.
  int first = 0, count = 0;
  if (row0 + static_cast<int>(threadIdx.x) < p.rows) {
    const int32_t* b =
        p.bounds + static_cast<int64_t>(row0 + threadIdx.x) * (col_tiles + 1) + tile_col;
    first = b[0];
    count = max(0, b[1] - b[0]);
  }
  int offset;
  const int total = block_exclusive_scan(count, offset, warp_sums);
  if (total == 0) {
    drain_prologue<kFill>(phases, smem_base, n_stages);
    return;
  }
  row_first[threadIdx.x] = first;
  row_offset[threadIdx.x] = offset;

  for (int pass0 = 0; pass0 < total; pass0 += kPassEntries) {
    const int n_pass = min(kPassEntries, total - pass0);
    for (int i = threadIdx.x; i < kBlocks * 8 + kBlocks; i += kThreads) {
      bank_count[i] = 0;  // bank_count and overflow are adjacent
    }
    __syncthreads();

    // 1. List the pass's entries (row found by binary search over the run offsets; four at a
    //    time so their index loads overlap) and rank each on its block's bank.
    for (int e0 = threadIdx.x; e0 < n_pass; e0 += 4 * kThreads) {
      int64_t flat[4];
      int rows[4], at[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = e0 + u * kThreads;
        rows[u] = 0;
        flat[u] = 0;
        at[u] = 0;
        if (e < n_pass) {
          const int target = pass0 + e;
          int lo = 0, hi = kTile - 1;  // the last row whose offset ≤ target
#pragma unroll 1
          while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (row_offset[mid] <= target) lo = mid; else hi = mid - 1;
          }
          rows[u] = lo;
          at[u] = row_first[lo] + (target - row_offset[lo]);
          flat[u] = p.idx_is_int64 ? static_cast<const int64_t*>(p.idx)[at[u]]
                                   : static_cast<const int32_t*>(p.idx)[at[u]];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = e0 + u * kThreads;
        if (e < n_pass) {
          // Masked to the tile: an unsorted idx (which the bounds assume sorted) gives wrong
          // values, never an access outside the tile.
          const int c = static_cast<int>(
              (flat[u] - static_cast<int64_t>(row0 + rows[u]) * p.cols - col0) & (kTile - 1));
          const int g = p.gather_cols ? c : rows[u], b = p.gather_cols ? rows[u] : c;
          const int bank = slot(g, 0) & 7;
          const int rank = atomicAdd(&bank_count[(b >> 3) * 8 + bank], 1);
          listed[e] = pack_listed(g, b, rank);
          listed_at[e] = at[u];
        }
      }
    }
    __syncthreads();

    // 2. Groups per block: two matrices of 8 rows each, ceil(n_b / 16) of them.
    int groups_here = 0;
    if (threadIdx.x < kBlocks) {
      int n_b = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) n_b += bank_count[threadIdx.x * 8 + k];
      groups_here = (n_b + 15) / 16;
    }
    int group0;
    const int n_groups = block_exclusive_scan(groups_here, group0, warp_sums);
    // Empty positions (see group_record) are not written. Groups are padded to a whole number
    // per warp; padding groups are empty, in block 0.
    const int per_warp = (n_groups + kWarps - 1) / kWarps;
    if (threadIdx.x < kBlocks) {
      group_start[threadIdx.x] = group0;
      for (int i = group0 * 16; i < (group0 + groups_here) * 16; ++i) {
        records[i] = group_record(threadIdx.x, i & 7, 0);
      }
    }
    if (threadIdx.x == 0) group_start[kBlocks] = n_groups;
    for (int i = n_groups * 16 + threadIdx.x; i < per_warp * kWarps * 16; i += kThreads) {
      records[i] = group_record(0, i & 7, 0);
    }
    __syncthreads();

    // 3. Deal: rank ρ < matrices goes to matrix ρ at its bank's position; the rest fill the
    //    positions left empty, in (matrix, position) order.
    for (int e = threadIdx.x; e < n_pass; e += kThreads) {
      const uint32_t v = listed[e];
      const int g = static_cast<int>(v & 511), b = static_cast<int>((v >> 9) & 511);
      const int rank = static_cast<int>(v >> 18);
      const int block = b >> 3;
      const int bank = slot(g, 0) & 7;
      const int g0 = group_start[block];
      const int matrices = 2 * (group_start[block + 1] - g0);
      int m = rank, position = bank;
      if (rank >= matrices) {
        int o = atomicAdd(&overflow[block], 1);
        const int32_t* counts = bank_count + block * 8;
#pragma unroll 1
        for (m = 0; m < matrices; ++m) {
          int k = 0;
          for (; k < 8; ++k) {
            if (counts[k] <= m && o-- == 0) break;
          }
          if (k < 8) {
            position = k;
            break;
          }
        }
      }
      const int s = (g0 + (m >> 1)) * 16 + (m & 1) * 8 + position;
      records[s] = group_record(block, g, kValid | (b & 7));
      positions[s] = listed_at[e];
    }
    __syncthreads();

    // 4. Stream the tokens and write the gradients.
    stream_pass_for<T, kFill>(per_warp,
                              PassState{records, positions, out, smem_base, t_begin, t_end,
                                        n_stages, pass0 == 0},
                              copier, phases);
    __syncthreads();  // the next pass (or piece) rewrites listed, records and positions
  }
}

template <typename T, int kFill>
__global__ void __launch_bounds__(kThreads, 1) sddmm_staged_kernel(const SddmmParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  StagePhases phases;
  if constexpr (kFill == kFillStageBarriers) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kRing; ++i) {
        barrier_init(full_barrier(smem_base, i), kThreads);  // every thread's copies
        barrier_init(empty_barrier(smem_base, i), kWarps);   // one arrival per warp
      }
    }
    __syncthreads();
  }
  // Splits: one piece. Segments: a piece per tile whose stages this block owns, numbered from
  // the block owning the tile's first stage; only the next tile and stage live through a
  // piece. (One call site of run_piece: a second inlined copy costs registers and spills.)
  const bool segments = p.schedule == kSddmmScheduleSegments;
  const int64_t b = blockIdx.x;
  int tile = static_cast<int>(b / max(p.splits, 1)), stage = 0;
  if (segments) {
    const int64_t u = segment_start(b, p.units, p.blocks);
    tile = static_cast<int>(u / p.stages);
    stage = static_cast<int>(u - static_cast<int64_t>(tile) * p.stages);
  }
  for (;;) {
    Piece piece;
    if (segments) {
      const int64_t first = static_cast<int64_t>(tile) * p.stages;  // the tile's first unit
      const int64_t end = segment_start(b + 1, p.units, p.blocks);
      if (first + stage >= end) break;  // also past the last tile: end <= units
      const int64_t s1 = min(static_cast<int64_t>(p.stages), end - first);
      piece = Piece{tile, stage * kStage,
                    static_cast<int>(min(static_cast<int64_t>(p.tokens), s1 * kStage)),
                    static_cast<int>(b - segment_of(first, p.units, p.blocks))};
    } else {
      const int split = static_cast<int>(b % p.splits);
      const int t_begin = split * p.tokens_per_split;
      piece = Piece{tile, t_begin, min(p.tokens, t_begin + p.tokens_per_split), split};
    }
    run_piece<T, kFill>(p, piece, smem, smem_base, phases);
    if (!segments) break;
    ++tile;
    stage = 0;
  }
}

template <typename T, int kFill>
cudaError_t launch(const SddmmParams& p, cudaStream_t stream) {
  auto kernel = sddmm_staged_kernel<T, kFill>;
  // The limit is per device and function; raising it every call costs ~1 µs of host time.
  static std::atomic<bool> raised[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= 64 || !raised[device].load(std::memory_order_relaxed)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(SharedLayout::kBytes));
    if (err != cudaSuccess) return err;
    if (device >= 0 && device < 64) raised[device].store(true, std::memory_order_relaxed);
  }
  const int64_t tiles =
      static_cast<int64_t>((p.rows + kTile - 1) / kTile) * ((p.cols + kTile - 1) / kTile);
  const int64_t grid = p.schedule == kSddmmScheduleSplits ? tiles * p.splits : p.blocks;
  kernel<<<static_cast<unsigned>(grid), kThreads, SharedLayout::kBytes, stream>>>(p);
  return cudaGetLastError();
}

// bounds[r][c] = the first position of idx at or after r·cols + min(c·kTile, cols), i.e. a
// left searchsorted: entry i of [rows][col_tiles + 1].
template <typename Index>
__device__ __forceinline__ void tile_bound(const SddmmPrepareParams& q, const Index* idx,
                                           int64_t i) {
  const int per_row = (q.cols + kTile - 1) / kTile + 1;
  const int r = static_cast<int>(i / per_row), c = static_cast<int>(i % per_row);
  const int64_t target = static_cast<int64_t>(r) * q.cols +
                         min(static_cast<int64_t>(c) * kTile, int64_t{q.cols});
  int64_t lo = 0, hi = q.k;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (static_cast<int64_t>(idx[mid]) < target) lo = mid + 1; else hi = mid;
  }
  q.bounds[i] = static_cast<int32_t>(lo);
}

// The stage-blocked transposition (see sddmm.cuh) of one 64 × 64 tile through shared memory:
// 16-byte chunks of a token's features in, 16-byte chunks of a feature's 8 tokens out (a warp
// writes 32 consecutive features' chunks, 512 contiguous bytes, and reads 2-byte neighbours
// from the tile, so the tile needs no padding for banks, only for 16-byte rows).
constexpr int kTransposeTile = 64;
constexpr int kPrepareThreads = 256;

__device__ __forceinline__ void transpose_tile(const SddmmPrepareParams& q, int t0, int f0) {
  __shared__ __align__(16) uint16_t tile[kTransposeTile][kTransposeTile + 8];
  const uint16_t* src = static_cast<const uint16_t*>(q.src);
  uint16_t* dst = static_cast<uint16_t*>(q.dst);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = threadIdx.x + i * kPrepareThreads;
    const int t = chunk >> 3, f = (chunk & 7) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);  // tokens past the end read as zeros
    if (t0 + t < q.tokens && f0 + f < q.features) {
      v = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(t0 + t) * q.ld_src + f0 + f);
    }
    *reinterpret_cast<uint4*>(&tile[t][f]) = v;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = threadIdx.x + i * kPrepareThreads;
    const int f = chunk & (kTransposeTile - 1), t = (chunk / kTransposeTile) * 8;
    if (f0 + f < q.features && t0 + t < q.tokens) {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w[j] = static_cast<uint32_t>(tile[t + 2 * j][f]) |
               (static_cast<uint32_t>(tile[t + 2 * j + 1][f]) << 16);
      }
      const int64_t chunk_at = (static_cast<int64_t>(t0 + t) / 8) * q.features + f0 + f;
      *reinterpret_cast<uint4*>(dst + chunk_at * 8) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// One launch for what the staged kernel needs prepared: the first `bound_blocks` blocks find
// the tile bounds; the others transpose one 64 × 64 tile each.
// The two kinds of work overlap (binary searches wait on latency, the transposition on
// bandwidth).
template <typename Index>
__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(const SddmmPrepareParams q,
                                                                  int bound_blocks,
                                                                  int token_tiles) {
  if (static_cast<int>(blockIdx.x) < bound_blocks) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kPrepareThreads + threadIdx.x;
    if (i < q.n_bounds) tile_bound(q, static_cast<const Index*>(q.idx), i);
    // The staged kernel adds its partial sums to a zeroed output.
    const int64_t threads = static_cast<int64_t>(bound_blocks) * kPrepareThreads;
    for (int64_t j = i; j < q.zero_count; j += threads) q.zero[j] = 0.f;
    return;
  }
  const int b = static_cast<int>(blockIdx.x) - bound_blocks;
  transpose_tile(q, (b % token_tiles) * kTransposeTile, (b / token_tiles) * kTransposeTile);
}

}  // namespace

int sddmm_default_splits(int tokens, int rows, int cols, int sms) {
  const int64_t tiles =
      static_cast<int64_t>((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
  if (tiles <= 0 || sms <= 0) return 1;
  // The fewest splits whose blocks fill their waves to 90 % (each split keeping ≥ 128 tokens).
  int best = 1;
  double best_fill = 0.0;
  for (int s = 1; s <= 16 && (s == 1 || tokens / s >= 128); ++s) {
    const int64_t blocks = tiles * s;
    const int64_t waves = (blocks + sms - 1) / sms;
    const double fill = static_cast<double>(blocks) / static_cast<double>(waves * sms);
    if (fill > best_fill + 1e-9) {
      best = s;
      best_fill = fill;
    }
    if (fill >= 0.9) break;
  }
  return best;
}

SddmmSegments sddmm_segments(int tokens, int rows, int cols, int blocks) {
  const int64_t tiles =
      static_cast<int64_t>((rows + kTile - 1) / kTile) * ((cols + kTile - 1) / kTile);
  SddmmSegments s{};
  s.stages = (tokens + kStage - 1) / kStage;
  s.units = tiles * s.stages;
  if (tokens <= 0 || rows <= 0 || cols <= 0 || blocks <= 0 || tiles >= (int64_t{1} << 31) ||
      s.units >= kSddmmMaxSegmentUnits) {
    return SddmmSegments{};
  }
  s.blocks = static_cast<int>(std::min<int64_t>(blocks, s.units));
  // A tile's pieces: from the block owning its first stage to the one owning its last. Past
  // 2^16 tiles the bound for segments of at least units / blocks stages stands in.
  const int64_t shortest = s.units / s.blocks;
  int64_t planes = (s.stages + shortest - 1) / shortest + 1;
  if (tiles <= (int64_t{1} << 16)) {
    planes = 1;
    for (int64_t t = 0; t < tiles; ++t) {
      planes = std::max(planes, segment_of((t + 1) * s.stages - 1, s.units, s.blocks) -
                                    segment_of(t * s.stages, s.units, s.blocks) + 1);
    }
  }
  s.planes = static_cast<int>(std::min<int64_t>(planes, s.blocks));
  return s;
}

cudaError_t sddmm_staged(const SddmmParams& p, cudaStream_t stream) {
  if (p.k == 0 || p.tokens == 0 || p.rows == 0 || p.cols == 0) return cudaSuccess;
  // The copier keeps its byte steps (16 rows of the blocked operand) in 32 bits.
  if (p.rows % 8 != 0 || p.cols % 8 != 0 || p.ldb >= kSddmmMaxRowStride || p.ldb % 8 != 0 ||
      (p.gather_cols ? p.cols : p.rows) >= (1 << 27) ||
      (p.fill != kFillBlockBarrier && p.fill != kFillStageBarriers)) {
    return cudaErrorInvalidValue;
  }
  if (p.accumulate && (p.schedule == kSddmmScheduleSplits ? p.splits : p.planes) > 2) {
    return cudaErrorInvalidValue;  // more than two additions per entry depend on their order
  }
  if (p.schedule == kSddmmScheduleSplits) {
    if (p.splits < 1 || p.tokens_per_split % kStage != 0 ||
        static_cast<int64_t>(p.splits) * p.tokens_per_split < p.tokens) {
      return cudaErrorInvalidValue;
    }
  } else if (p.schedule == kSddmmScheduleSegments) {
    const SddmmSegments expected = sddmm_segments(p.tokens, p.rows, p.cols, p.blocks);
    if (expected.blocks != p.blocks || expected.planes != p.planes ||
        expected.stages != p.stages || expected.units != p.units) {
      return cudaErrorInvalidValue;
    }
  } else {
    return cudaErrorInvalidValue;
  }
  switch (p.kind) {
    case FloatKind::kBFloat16:
      return p.fill == kFillStageBarriers ? launch<__nv_bfloat16, kFillStageBarriers>(p, stream)
                                          : launch<__nv_bfloat16, kFillBlockBarrier>(p, stream);
    case FloatKind::kFloat16:
      return p.fill == kFillStageBarriers ? launch<__half, kFillStageBarriers>(p, stream)
                                          : launch<__half, kFillBlockBarrier>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t sddmm_prepare(const SddmmPrepareParams& q, cudaStream_t stream) {
  if (q.k < 0 || q.k >= (int64_t{1} << 31) || q.rows < 0 || q.cols < 0 || q.tokens < 0 ||
      q.zero_count < 0 || (q.zero_count > 0 && (q.zero == nullptr || q.n_bounds == 0)) ||
      q.features < 0 || q.features % 8 != 0 || q.ld_src % 8 != 0 ||
      q.n_bounds != static_cast<int64_t>(q.rows) * ((q.cols + kTile - 1) / kTile + 1)) {
    return cudaErrorInvalidValue;
  }
  const int64_t bound_blocks = (q.n_bounds + kPrepareThreads - 1) / kPrepareThreads;
  const int64_t token_tiles = (q.tokens + kTransposeTile - 1) / kTransposeTile;
  const int64_t feature_tiles = (q.features + kTransposeTile - 1) / kTransposeTile;
  const int64_t blocks = bound_blocks + token_tiles * feature_tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  auto kernel = q.idx_is_int64 ? prepare_kernel<int64_t> : prepare_kernel<int32_t>;
  kernel<<<static_cast<unsigned>(blocks), kPrepareThreads, 0, stream>>>(
      q, static_cast<int>(bound_blocks), static_cast<int>(std::max<int64_t>(1, token_tiles)));
  return cudaGetLastError();
}

}  // namespace spft
