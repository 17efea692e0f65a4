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
#include "nf4_gemv.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace spft {
namespace {

constexpr int kChunk = 128;        // inputs per warp per step
constexpr int kAbsmax2Block = 256; // absmax values per second-level scale (bitsandbytes)
// Warps per SM asked of the compiler, which caps registers at 65536 / (32 · warps): 24 (80
// registers) for one row tile and one token tile, fewer where the accumulators need more.
constexpr int min_warps_per_sm(int mt, int nt) { return mt * nt == 1 ? 24 : mt * nt == 2 ? 16 : 8; }

template <typename T>
struct Half2;

template <>
struct Half2<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Half2<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
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

// The state one pipeline slot holds: a 16-byte piece of rows g and g + 8 of each row tile, and
// the absmax (or its 8-bit code and second-level scale) of each piece.
template <int MT>
struct Slot {
  uint4 w[MT][2];
  float scale[MT][2];
  uint32_t qscale[MT][2];
};

// A lane's walk through the sorted deltas of one row: the next delta's column (kNoDelta when
// the row has none left), its value, and where it sits in dv/idx.
struct DeltaCursor {
  int j;
  int j_end;
  int col;
  float value;
};
constexpr int kNoDelta = 0x7fffffff;
// Deltas of a block staged in shared memory at the start (int32 indices, fp32 values); a block
// with more reads the rest from global memory.
constexpr int kDeltaCapacity = 1024;

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem));
}

template <typename T, int MT, int NT, int KS, int D>
__global__ void __launch_bounds__(KS * 32, min_warps_per_sm(MT, NT) / KS)
nf4_gemv_kernel(const Nf4GemvParams p) {
  using H = Half2<T>;
  constexpr int kRows = 16 * MT;
  constexpr int kTokens = 8 * NT;
  static_assert(kRows <= 32, "one delta cursor per lane needs at most 32 rows per warp");

  __shared__ __align__(256) float s_code[16];
  __shared__ float s_code2[256];
  // Chunks with deltas go through here: the decoded 16-bit weight of the warp's chunk, one
  // 16-byte group (8 consecutive inputs) per lane, row half and quarter [MT][2][4][32]. After
  // the main loop the same bytes hold the warps' partial sums [KS][kRows][kTokens].
  __shared__ uint4 s_stage[KS][MT][2][4][32];
  static_assert(sizeof(float) * KS * kRows * kTokens <= sizeof(s_stage), "partials overlay");
  auto& s_partial = *reinterpret_cast<float (*)[KS][kRows][kTokens]>(&s_stage[0][0][0][0][0]);
  __shared__ int32_t s_delta_idx[kDeltaCapacity];
  __shared__ float s_delta_value[kDeltaCapacity];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int row0 = blockIdx.x * kRows;
  const int K = p.in_features;
  const int N = p.out_features;
  const int rows_here = min(kRows, N - row0);  // rows of this block that exist
  const bool dq = p.qabsmax != nullptr;
  const bool has_delta = p.dv != nullptr;
  const float absmax_offset = dq ? __ldg(p.offset) : 0.f;

  if (threadIdx.x < 16) s_code[threadIdx.x] = p.code[threadIdx.x];
  if (dq) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code2[i] = p.code2[i];
  }
  __syncthreads();

  // Warp w takes chunks w, w + KS, …: the block reads 64·KS contiguous bytes of a row at a time.
  const int n_chunks = (K + kChunk - 1) / kChunk;
  const int my_chunks = warp < n_chunks ? (n_chunks - warp + KS - 1) / KS : 0;
  const int64_t row_bytes = K / 2;
  const uint32_t table = static_cast<uint32_t>(__cvta_generic_to_shared(s_code));

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  Slot<MT> slots[D];

  // Issue the loads of the warp's i-th chunk into `slot`; a piece past K or N decodes to zero.
  auto load = [&](Slot<MT>& slot, int i) {
    const int k = (warp + i * KS) * kChunk + 32 * t;
    const bool k_ok = i < my_chunks && k + 32 <= K;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + mt * 16 + g + 8 * h;
        slot.w[mt][h] = make_uint4(0, 0, 0, 0);
        slot.scale[mt][h] = 0.f;
        slot.qscale[mt][h] = 0xffffffffu;  // "no piece": decodes to zero
        if (k_ok && row < N) {
          slot.w[mt][h] = load_stream(p.packed + row * row_bytes + k / 2);
          const int64_t block = (static_cast<int64_t>(row) * K + k) >> p.blocksize_log2;
          if (dq) {
            slot.qscale[mt][h] = __ldg(p.qabsmax + block);
            slot.scale[mt][h] = __ldg(p.absmax2 + block / kAbsmax2Block);
          } else {
            slot.scale[mt][h] = __ldg(p.absmax + block);
          }
        }
      }
    }
  };

#pragma unroll
  for (int d = 0; d < D; ++d) load(slots[d], d);

  // The block's deltas are one run [j_begin, j_end) of the sorted indices; stage its head in
  // shared memory while the first weight loads are in flight. Everything is clamped, so an
  // inconsistent row_ptr can give a wrong answer but never an access out of bounds.
  const int64_t n_deltas = has_delta ? p.n_deltas : 0;
  auto clamp_j = [&](int row, int64_t lo) {
    return min(max(static_cast<int64_t>(p.row_ptr[row]), lo), n_deltas);
  };
  const int64_t j_begin = has_delta ? clamp_j(row0, 0) : 0;
  const int64_t j_end = has_delta ? clamp_j(row0 + rows_here, j_begin) : 0;
  const bool staged_deltas = !p.idx_is_int64 && p.dv_kind == FloatKind::kFloat32;
  const int n_staged = staged_deltas ? static_cast<int>(min(j_end - j_begin,
                                                            int64_t{kDeltaCapacity})) : 0;
  for (int e = threadIdx.x; e < n_staged; e += blockDim.x) {
    cp_async4(&s_delta_idx[e], static_cast<const int32_t*>(p.idx) + j_begin + e);
    cp_async4(&s_delta_value[e], static_cast<const float*>(p.dv) + j_begin + e);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_all;\n" ::);
  __syncthreads();

  // Lane r < kRows walks the deltas of local row r, in column order, across its warp's chunks.
  const int64_t my_row_start = static_cast<int64_t>(row0 + lane) * K;
  auto fetch = [&](DeltaCursor& c) {
    c.col = kNoDelta;
    if (c.j < c.j_end) {
      const int64_t s_j = c.j - j_begin;
      int64_t flat;
      if (s_j < n_staged) {
        flat = s_delta_idx[s_j];
        c.value = s_delta_value[s_j];
      } else {
        flat = p.idx_is_int64 ? static_cast<const int64_t*>(p.idx)[c.j]
                              : static_cast<const int32_t*>(p.idx)[c.j];
        c.value = load_delta(p.dv, p.dv_kind, c.j);
      }
      const int64_t col = flat - my_row_start;
      c.col = col >= 0 && col < K ? static_cast<int>(col) : kNoDelta;
    }
  };
  DeltaCursor cur{0, 0, kNoDelta, 0.f};
  if (has_delta && lane < rows_here) {
    const int64_t lo = clamp_j(row0 + lane, j_begin);
    cur.j = static_cast<int>(lo);
    cur.j_end = static_cast<int>(min(clamp_j(row0 + lane + 1, lo), j_end));
    fetch(cur);
  }

  // Decode the slot of chunk i; multiply it with x on the tensor cores. When a delta falls in
  // the chunk, the decoded weight is staged in shared memory, the deltas are added there
  // (W' = round(float(W) + dv), as nf4_dequantize_scatter) and the fragments read back.
  auto compute = [&](Slot<MT>& slot, int i) {
    const int chunk_k = (warp + i * KS) * kChunk;
    const int k = chunk_k + 32 * t;
    const bool k_ok = k + 32 <= K;
    uint4 xv[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int token = nt * 8 + g;
      const bool ok = k_ok && token < p.tokens;
      const uint4* src = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) +
                                                        token * p.ldx + k);
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[nt][q] = ok ? __ldg(src + q) : make_uint4(0, 0, 0, 0);
    }
    float scale[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        scale[mt][h] = slot.scale[mt][h];
        if (dq) {
          const uint32_t q = slot.qscale[mt][h];
          // round(round(code2[q] · absmax2) + offset), as bitsandbytes; no fused multiply-add.
          scale[mt][h] = q > 255u ? 0.f
                                  : __fadd_rn(__fmul_rn(s_code2[q], slot.scale[mt][h]),
                                              absmax_offset);
        }
      }
    }
    while (cur.col < chunk_k) {  // deltas in other warps' chunks (or out of order): skip
      ++cur.j;
      fetch(cur);
    }
    const bool staged = __any_sync(0xffffffffu, cur.col < chunk_k + kChunk);
    // Per 32-bit word (8 codes): the table offsets 4·nibble of the high and low nibbles sit in
    // the word's bytes after two shift-and-mask ops; one PRMT per code then forms an address.
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
      // k-step s = 2·word + half uses bytes 2·half and 2·half + 1 of the word: mma columns
      // {2t, 2t+1} = inputs 32t + 4s + {0, 1}; {2t+8, 2t+9} = inputs 32t + 4s + {2, 3}.
      uint32_t a[2][MT][4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int b = 2 * half;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float sc = scale[mt][h];
            // Low half of each register = the even input = the high nibble.
            a[half][mt][h] = H::pack(lds_f32(code_address(hi4[mt][h], table, b)) * sc,
                                     lds_f32(code_address(lo4[mt][h], table, b)) * sc);
            a[half][mt][h + 2] = H::pack(lds_f32(code_address(hi4[mt][h], table, b + 1)) * sc,
                                         lds_f32(code_address(lo4[mt][h], table, b + 1)) * sc);
          }
        }
      }
      if (staged) {
        // Inputs 32t + 8·word … +8 of rows g (h = 0) and g + 8 (h = 1), in order.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            s_stage[warp][mt][h][word][lane] =
                make_uint4(a[0][mt][h], a[0][mt][h + 2], a[1][mt][h], a[1][mt][h + 2]);
      } else {
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const uint4& xq = xv[nt][word];
              H::mma(acc[mt][nt], a[half][mt], word_of(xq, 2 * half), word_of(xq, 2 * half + 1));
            }
      }
    }
    if (staged) {
      __syncwarp();
      // Lane r adds the deltas of local row r that fall in this chunk.
      const int r = lane;
      while (cur.col < chunk_k + kChunk) {
        const int c = cur.col - chunk_k;  // 0 … 127
        const int lane_of = ((r & 7) << 2) | (c >> 5);
        const int e = c & 31;
        T* elem = reinterpret_cast<T*>(&s_stage[warp][r >> 4][(r >> 3) & 1][e >> 3][lane_of]) +
                  (e & 7);
        *elem = H::from_float(H::to_float(*elem) + cur.value);
        ++cur.j;
        fetch(cur);
      }
      __syncwarp();
#pragma unroll
      for (int word = 0; word < 4; ++word) {
        uint32_t a[2][MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4 v = s_stage[warp][mt][h][word][lane];
            a[0][mt][h] = v.x;
            a[0][mt][h + 2] = v.y;
            a[1][mt][h] = v.z;
            a[1][mt][h + 2] = v.w;
          }
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const uint4& xq = xv[nt][word];
              H::mma(acc[mt][nt], a[half][mt], word_of(xq, 2 * half), word_of(xq, 2 * half + 1));
            }
      }
      __syncwarp();
    }
  };

  for (int base = 0; base < my_chunks; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (base + d < my_chunks) {
        compute(slots[d], base + d);
        load(slots[d], base + d + D);
      }
    }
  }

  __syncthreads();  // the partials overlay the staging buffers of all warps
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
  __syncthreads();

  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
  for (int o = threadIdx.x; o < kRows * p.tokens; o += blockDim.x) {
    const int token = o / kRows;
    const int r = o % kRows;
    if (r >= rows_here) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < KS; ++w) sum += s_partial[w][r][token];
    if (bias != nullptr) sum += H::to_float(bias[row0 + r]);
    y[token * p.ldy + row0 + r] = H::from_float(sum);
  }
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
  X(2, 2, 2)

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
