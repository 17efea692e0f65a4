// Sparse-delta gradient (SDDMM) on the tensor cores, without the dense dW: see sddmm.cuh.
//
// A dense tile of dW = dyᵀ x computes every product; at 1 % random density only one in a
// hundred is wanted. Here each mma.m16n8k16 computes C[16 × 8] += A[16 × 16 tokens] ·
// B[16 tokens × 8] where B holds 8 consecutive x columns (a "column block") and A holds the dy
// rows of up to 16 wanted entries whose columns lie in that block: entry i's gradient is
// C[i][its column − 8·block]. One mma yields up to 16 wanted values (a dense tile's yields about
// one), with exact bf16/fp16 products and fp32 accumulation.
//
// One block owns a tile of kTile × kTile of the weight and a range of tokens:
// 1. It lists the tile's indices (at most kPassEntries per pass), groups them by column block
//    and deals each block's entries into 8-row matrices (two per mma group) so that the 8 rows
//    an ldmatrix phase gathers mostly sit on distinct shared-memory banks: an entry goes to
//    matrix ρ at position (its row's bank), ρ being its rank among the block's entries on that
//    bank; ranks past the block's matrices fill the positions left empty (a 2-way conflict).
// 2. It streams its tokens in stages of 16 through a ring of four raw stages (cp.async, three
//    in flight): dy's and x's tile columns as they lie in memory. x is read from there
//    (ldmatrix.trans gives B); dy is transposed one stage ahead (ldmatrix.trans, 4-byte stores)
//    into two planes of 8 tokens, 16 bytes per tile row per plane, rows XOR-swizzled so the
//    transposing stores and the row gathers are conflict-free. Each warp keeps the fp32
//    accumulators of its groups, and its groups' blocks and A slots, in registers.
// 3. Each wanted C element is written to the block's split of the output.
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
constexpr int kBlocks = kTile / 8;         // column blocks per tile
constexpr int kStage = 16;                 // tokens per stage
constexpr int kPlaneBytes = kTile * 16;    // 8 tokens of every tile row
constexpr int kOperandBytes = 2 * kPlaneBytes;  // one operand's 16 tokens
constexpr int kRawBytes = 2 * kOperandBytes;    // a stage of dy and x as in memory
constexpr int kRing = 4;                         // raw stages: the one in use and 3 in flight
constexpr int kTokenRowBytes = kTile * 2;        // one token's tile columns, as in memory
constexpr int kPassEntries = 3072;         // entries listed per pass over the tokens
// Groups per pass: Σ_blocks ceil(n_b / 16) ≤ kPassEntries / 16 + kBlocks; per warp, in registers.
constexpr int kMaxGroups = kPassEntries / 16 + kBlocks;
constexpr int kGroupsPerWarp = (kMaxGroups + kWarps - 1) / kWarps;

static_assert(kTile == kThreads, "one tile row per thread when listing the runs");
static_assert(2 * kStage * kTile / 8 == 4 * kThreads, "four 16-byte chunks per thread");
static_assert(kStage / 8 * kTile / 8 == 4 * 2 * kWarps, "two ldmatrix.x4 per warp transpose dy");
static_assert(kGroupsPerWarp <= 16, "group blocks and A slots are packed for 16 groups");

struct SharedLayout {
  static constexpr size_t kRaw = 0;                                  // [kRing][dy | x] raw
  static constexpr size_t kPlanes = kRaw + kRing * kRawBytes;        // [2] dy transposed
  static constexpr size_t kListed = kPlanes + 2 * kOperandBytes;     // u32 [kPassEntries]
  static constexpr size_t kRecords = kListed + kPassEntries * 4;          // u32 [groups][16]
  static constexpr size_t kPositions = kRecords + kMaxGroups * 16 * 4;    // i32 [groups][16]
  static constexpr size_t kGroupBlock = kPositions + kMaxGroups * 16 * 4; // u16 [groups]
  static constexpr size_t kRowFirst = kGroupBlock + kMaxGroups * 2;       // i32 [kTile]
  static constexpr size_t kRowOffset = kRowFirst + kTile * 4;             // i32 [kTile]
  static constexpr size_t kBankCount = kRowOffset + kTile * 4;            // i32 [kBlocks][8]
  static constexpr size_t kOverflow = kBankCount + kBlocks * 8 * 4;       // i32 [kBlocks]
  static constexpr size_t kGroupStart = kOverflow + kBlocks * 4;          // i32 [kBlocks + 1]
  static constexpr size_t kWarpSums = kGroupStart + (kBlocks + 1) * 4;    // i32 [kWarps + 1]
  static constexpr size_t kBytes = kWarpSums + (kWarps + 1) * 4;
};

// Where tile row r of dy keeps its 8 tokens of plane h, in 16-byte slots. A transposing store
// writes 8 consecutive rows, which the XOR keeps on distinct banks; a row's bank in plane 0,
// slot(r, 0) & 7, is the position the deal gives its entries (plane 1 only flips bit 2). The
// XOR's row-group term is left over from an earlier staging order and is harmless.
__device__ __forceinline__ int slot(int r, int h) { return r ^ (((r >> 3) & 3) | (h << 2)); }

// A thread's share of copying a stage of dy and x as they lie in memory ([16 tokens][kTile
// columns] each) into a raw ring slot: threads 0-255 copy dy, 256-511 x; chunk i of a thread is
// 16-byte column chunk c = thread % 64 of token row 4i + (thread % 256) / 64, so a warp copies
// 512 contiguous bytes per instruction. Chunk c of token t goes to position c ^ (t & 7): the 8
// chunks of a store phase, and the 8 token rows an ldmatrix.trans reads, sit on distinct banks.
// Past the token range or the operand's width the copy fills zeros.
struct StageCopier {
  const char* src;     // this thread's chunk in token row `token` of stage 0
  int64_t stage_step;  // bytes from one stage to the next (16 token rows)
  int64_t row_step;    // bytes from one of its chunks to the next (4 token rows)
  uint32_t dst;        // byte offset of its first chunk's token row in a raw slot
  int token;           // its first token within a stage (0-3)
  int chunk;           // its column chunk
  bool inside;         // the chunk lies within the operand's width

  __device__ __forceinline__ StageCopier(const SddmmParams& p, int t_begin, int row0, int col0) {
    const bool is_x = threadIdx.x >= kThreads / 2;
    token = (threadIdx.x & (kThreads / 2 - 1)) / (kTile / 8);
    chunk = threadIdx.x % (kTile / 8);
    const int64_t ld = is_x ? p.ldx : p.lddy;
    const int first = (is_x ? col0 : row0) + chunk * 8;
    inside = first < (is_x ? p.cols : p.rows);
    src = static_cast<const char*>(is_x ? p.x : p.dy) +
          (static_cast<int64_t>(t_begin + token) * ld + first) * 2;
    stage_step = ld * kStage * 2;
    row_step = ld * 4 * 2;
    dst = (is_x ? kOperandBytes : 0) + token * kTokenRowBytes;
  }

  // Issues stage st's copies (tokens t_begin + 16·st + …, clipped at t_end) into `raw`.
  // Zero-filled chunks point at the operand's first element (nothing is read).
  __device__ __forceinline__ void copy(const SddmmParams& p, uint32_t raw, int st, int t_begin,
                                       int t_end) const {
    const char* base = src + st * stage_step;
    const char* origin = static_cast<const char*>(threadIdx.x >= kThreads / 2 ? p.x : p.dy);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = token + 4 * i;
      const bool ok = inside && t_begin + st * kStage + t < t_end;
      const uint32_t to = raw + dst + 4 * i * kTokenRowBytes + ((chunk ^ (t & 7)) * 16);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to),
                   "l"(ok ? base + i * row_step : origin), "r"(ok ? 16 : 0));
    }
  }
};

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&a)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address));
}

// Transposes a raw dy stage into the planes: 128 matrices of 8 tokens × 8 tile rows, four per
// ldmatrix.x4.trans, after which lane l holds tokens 2(l % 4), +1 of row l / 4 of each; its
// 4-byte stores (8 rows × 4 words per matrix) hit 32 distinct banks.
__device__ __forceinline__ void transpose_dy(uint32_t raw_dy, uint8_t* planes, int warp,
                                             int lane) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int quad = warp * 2 + i;
    {
      const int m = quad * 4 + (lane >> 3);
      const int t = (m & 1) * 8 + (lane & 7), c = m >> 1;
      uint32_t v[4];
      ldmatrix_x4_trans(v, raw_dy + t * kTokenRowBytes + ((c ^ (t & 7)) * 16));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int mj = quad * 4 + j;
        const int h = mj & 1, r = (mj >> 1) * 8 + (lane >> 2);
        *reinterpret_cast<uint32_t*>(planes + h * kPlaneBytes + slot(r, h) * 16 +
                                     (lane & 3) * 4) = v[j];
      }
    }
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& b0, uint32_t& b1, uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(b0), "=r"(b1)
               : "r"(address));
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

// Listed entry: tile row (9 bits) | tile column (9 bits) | rank on its bank (14 bits).
__device__ __forceinline__ uint32_t pack_listed(int r, int c, int rank) {
  return static_cast<uint32_t>(r) | (static_cast<uint32_t>(c) << 9) |
         (static_cast<uint32_t>(rank) << 18);
}
// Group slot record: dy slot in plane 0 (bits 4+) | valid (bit 3) | column in block (bits 0-2).
constexpr uint32_t kValid = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) sddmm_staged_kernel(const SddmmParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint32_t* listed = reinterpret_cast<uint32_t*>(smem + SharedLayout::kListed);
  uint32_t* records = reinterpret_cast<uint32_t*>(smem + SharedLayout::kRecords);
  int32_t* positions = reinterpret_cast<int32_t*>(smem + SharedLayout::kPositions);
  uint16_t* group_block = reinterpret_cast<uint16_t*>(smem + SharedLayout::kGroupBlock);
  int32_t* row_first = reinterpret_cast<int32_t*>(smem + SharedLayout::kRowFirst);
  int32_t* row_offset = reinterpret_cast<int32_t*>(smem + SharedLayout::kRowOffset);
  int32_t* bank_count = reinterpret_cast<int32_t*>(smem + SharedLayout::kBankCount);
  int32_t* overflow = reinterpret_cast<int32_t*>(smem + SharedLayout::kOverflow);
  int32_t* group_start = reinterpret_cast<int32_t*>(smem + SharedLayout::kGroupStart);
  int32_t* warp_sums = reinterpret_cast<int32_t*>(smem + SharedLayout::kWarpSums);

  const int col_tiles = (p.cols + kTile - 1) / kTile;
  const int split = blockIdx.x % p.splits;
  const int tile = blockIdx.x / p.splits;
  const int tile_col = tile % col_tiles;
  const int row0 = (tile / col_tiles) * kTile;
  const int col0 = tile_col * kTile;
  const int t_begin = split * p.tokens_per_split;
  const int t_end = min(p.tokens, t_begin + p.tokens_per_split);
  float* out = p.out + static_cast<int64_t>(split) * p.k;
  if (tile == 0) {
    // Indices outside the weight (before row 0 or past the last row) lie in no tile: their
    // gradient is 0. Every other position of the split's plane is written by its tile.
    const int32_t below = p.bounds[0];
    const int32_t above = p.bounds[static_cast<int64_t>(p.rows) * (col_tiles + 1) - 1];
    for (int64_t j = threadIdx.x; j < below; j += kThreads) out[j] = 0.f;
    for (int64_t j = above + static_cast<int64_t>(threadIdx.x); j < p.k; j += kThreads) {
      out[j] = 0.f;
    }
  }
  if (t_begin >= t_end) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

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
  if (total == 0) return;
  row_first[threadIdx.x] = first;
  row_offset[threadIdx.x] = offset;

  const int n_stages = (t_end - t_begin + kStage - 1) / kStage;

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
      int rows[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = e0 + u * kThreads;
        rows[u] = 0;
        flat[u] = 0;
        if (e < n_pass) {
          const int target = pass0 + e;
          int lo = 0, hi = kTile - 1;  // the last row whose offset ≤ target
#pragma unroll 1
          while (lo < hi) {
            const int mid = (lo + hi + 1) >> 1;
            if (row_offset[mid] <= target) lo = mid; else hi = mid - 1;
          }
          rows[u] = lo;
          const int64_t pos = row_first[lo] + (target - row_offset[lo]);
          flat[u] = p.idx_is_int64 ? static_cast<const int64_t*>(p.idx)[pos]
                                   : static_cast<const int32_t*>(p.idx)[pos];
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
          const int bank = slot(rows[u], 0) & 7;
          const int rank = atomicAdd(&bank_count[(c >> 3) * 8 + bank], 1);
          listed[e] = pack_listed(rows[u], c, rank);
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
    if (threadIdx.x < kBlocks) {
      group_start[threadIdx.x] = group0;
      for (int g = group0; g < group0 + groups_here; ++g) group_block[g] = threadIdx.x;
    }
    if (threadIdx.x == 0) group_start[kBlocks] = n_groups;
    // Empty positions gather the slot of their own bank (no conflict) and are not written.
    for (int i = threadIdx.x; i < n_groups * 16; i += kThreads) {
      records[i] = static_cast<uint32_t>(i & 7) << 4;
    }
    __syncthreads();

    // 3. Deal: rank ρ < matrices goes to matrix ρ at its bank's position; the rest fill the
    //    positions left empty, in (matrix, position) order.
    for (int e = threadIdx.x; e < n_pass; e += kThreads) {
      const uint32_t v = listed[e];
      const int r = static_cast<int>(v & 511), c = static_cast<int>((v >> 9) & 511);
      const int rank = static_cast<int>(v >> 18);
      const int block = c >> 3;
      const int bank = slot(r, 0) & 7;
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
      records[s] = (static_cast<uint32_t>(slot(r, 0)) << 4) | kValid | (c & 7);
      positions[s] = row_first[r] + (pass0 + e - row_offset[r]);
    }
    __syncthreads();

    // 4. Stream the tokens. Warp w takes groups [w·per, (w+1)·per).
    const int per_warp = (n_groups + kWarps - 1) / kWarps;
    const int my_first = warp * per_warp;
    const int my_groups = max(0, min(per_warp, n_groups - my_first));
    float acc[kGroupsPerWarp][4];
#pragma unroll
    for (int g = 0; g < kGroupsPerWarp; ++g) {
      acc[g][0] = acc[g][1] = acc[g][2] = acc[g][3] = 0.f;
    }
    // A: lane l gathers row (l & 7) + 8·((l >> 3) & 1) of its group in plane l >> 4.
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int a_plane = lane >> 4;
    // B (ldmatrix.trans): lanes 0-15 point at token rows 0-15 of the block's 8 columns.
    const int b_token = lane & 15;
    // The warp's groups do not change over the tokens: their blocks (8 bits, 4 per word) and
    // this lane's A slot (16 bits, 2 per word) stay in registers.
    uint32_t blocks[4] = {0, 0, 0, 0}, a_slots[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int g = 0; g < kGroupsPerWarp; ++g) {
      if (g < my_groups) {
        const int group = my_first + g;
        blocks[g >> 2] |= static_cast<uint32_t>(group_block[group]) << (8 * (g & 3));
        const uint32_t a_slot = (records[group * 16 + a_row] >> 4) ^ (a_plane << 2);
        a_slots[g >> 1] |= a_slot << (16 * (g & 1));
      }
    }

    // Ring: raw stage st in slot st % kRing; copies run three stages ahead. dy of stage st is
    // transposed into planes[st & 1] during stage st − 1.
    const uint32_t raw0 = smem_base + SharedLayout::kRaw;
    const uint32_t planes0 = smem_base + SharedLayout::kPlanes;
    const StageCopier copier(p, t_begin, row0, col0);
#pragma unroll
    for (int i = 0; i < kRing - 1; ++i) {
      if (i < n_stages) copier.copy(p, raw0 + i * kRawBytes, i, t_begin, t_end);
      commit_copies();
    }
    wait_copies<kRing - 2>();
    __syncthreads();
    transpose_dy(raw0, smem + SharedLayout::kPlanes, warp, lane);

    for (int st = 0; st < n_stages; ++st) {
      wait_copies<kRing - 3>();  // stage st + 1 has landed (this thread's copies) …
      __syncthreads();           // … everyone's; planes[st & 1] is written; slot st − 1 is free
      if (st + kRing - 1 < n_stages) {
        copier.copy(p, raw0 + ((st + kRing - 1) % kRing) * kRawBytes, st + kRing - 1, t_begin,
                    t_end);
      }
      commit_copies();
      if (st + 1 < n_stages) {
        transpose_dy(raw0 + ((st + 1) % kRing) * kRawBytes,
                     smem + SharedLayout::kPlanes + ((st + 1) & 1) * kOperandBytes, warp, lane);
      }
      const uint32_t a_base = planes0 + (st & 1) * kOperandBytes + a_plane * kPlaneBytes;
      const uint32_t b_row =
          raw0 + (st % kRing) * kRawBytes + kOperandBytes + b_token * kTokenRowBytes;
      int current_block = -1;
      uint32_t b0 = 0, b1 = 0;
#pragma unroll
      for (int g = 0; g < kGroupsPerWarp; ++g) {
        if (g >= my_groups) break;
        const int block = static_cast<int>((blocks[g >> 2] >> (8 * (g & 3))) & 0xFFu);
        if (block != current_block) {
          ldmatrix_x2_trans(b0, b1, b_row + ((block ^ (b_token & 7)) * 16));
          current_block = block;
        }
        uint32_t a[4];
        ldmatrix_x4(a, a_base + ((a_slots[g >> 1] >> (16 * (g & 1))) & 0xFFFFu) * 16);
        Half2<T>::mma(acc[g], a, b0, b1);
      }
    }
    wait_copies<0>();

    // 5. C[i][j] of lane l: i = l / 4 (+8 for values 2, 3), j = 2·(l % 4) (+1 for odd values).
#pragma unroll
    for (int g = 0; g < kGroupsPerWarp; ++g) {
      if (g >= my_groups) break;
      const int group = my_first + g;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int i = (lane >> 2) + 8 * (v >> 1);
        const uint32_t record = records[group * 16 + i];
        if ((record & kValid) && static_cast<int>(record & 7) == 2 * (lane & 3) + (v & 1)) {
          out[positions[group * 16 + i]] = acc[g][v];
        }
      }
    }
    __syncthreads();  // the next pass rewrites listed, records and positions
  }
}

template <typename T>
cudaError_t launch(const SddmmParams& p, cudaStream_t stream) {
  auto kernel = sddmm_staged_kernel<T>;
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
  kernel<<<static_cast<unsigned>(tiles * p.splits), kThreads, SharedLayout::kBytes, stream>>>(p);
  return cudaGetLastError();
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

cudaError_t sddmm_staged(const SddmmParams& p, cudaStream_t stream) {
  if (p.k == 0 || p.tokens == 0 || p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.rows % 8 != 0 || p.cols % 8 != 0 || p.splits < 1 || p.tokens_per_split % kStage != 0 ||
      static_cast<int64_t>(p.splits) * p.tokens_per_split < p.tokens) {
    return cudaErrorInvalidValue;
  }
  switch (p.kind) {
    case FloatKind::kBFloat16:
      return launch<__nv_bfloat16>(p, stream);
    case FloatKind::kFloat16:
      return launch<__half>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace spft
