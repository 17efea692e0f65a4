// Bisection probe for the small-batch NF4 GEMV (csrc/nf4_gemv.cu, 1 token): the kernel's load
// pattern (block of KS warps on a 16-row tile, 128-input chunks, lane (g, t) 16 bytes of rows
// g and g + 8, D chunks in flight; KS = 4, D = 2 as the kernel's default), adding its pieces one
// at a time to find which one costs the time. Output values are not
// meaningful, only the times (benchmarks/RESULTS.md, fifth session). Inputs are random (hashed)
// values, not zeros.
//   nvcc -O3 -std=c++17 -arch=sm_90 --use_fast_math gemv_bisect.cu -o /tmp/bisect && /tmp/bisect
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

constexpr int N = 11008, K = 4096, ROW_BYTES = K / 2, COPIES = 4;
constexpr int kAbs = 1, kX = 2, kDecode = 4, kMma = 8, kTable = 16, kReduce = 32, kDq = 64;
// Decode ablations: kNoLds takes the code from registers instead of the shared table; kNoCvt packs
// the scaled fp32 values by bit selection instead of the fp32 -> bf16x2 conversion.
constexpr int kNoLds = 128, kNoCvt = 256;

__device__ __forceinline__ uint4 ld_w(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float lds_f32(uint32_t a) {
  float v; asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a)); return v;
}
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); return *reinterpret_cast<uint32_t*>(&v);
}

struct Slot { uint4 w[2]; float s[2]; uint32_t q[2]; };

__device__ __forceinline__ uint32_t hash32(uint32_t v) {
  v ^= v >> 16; v *= 0x7feb352du; v ^= v >> 15; v *= 0x846ca68bu; v ^= v >> 16; return v;
}
// Random fills, so nothing is timed on zeros: bytes, and floats in [lo, lo + span).
__global__ void fill_bytes(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = static_cast<uint8_t>(hash32(static_cast<uint32_t>(i) * 2654435761u + seed));
}
__global__ void fill_floats(float* p, size_t n, uint32_t seed, float lo, float span) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = lo + span * (hash32(static_cast<uint32_t>(i) + seed) >> 8) * (1.f / 16777216.f);
}
__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(-1.f + 2.f * (hash32(static_cast<uint32_t>(i) + seed) >> 8) * (1.f / 16777216.f));
}

template <int F, int KS = 4, int D = 2, int MINB = 24 / KS>
__global__ void __launch_bounds__(KS * 32, MINB)
probe(const uint8_t* w, const float* absmax, const uint8_t* qabs, const float* absmax2,
      const float* code, const float* code2, const __nv_bfloat16* x, float* y) {
  __shared__ __align__(256) float s_code[16];
  __shared__ float s_code2[256];
  __shared__ float s_part[16][16][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16;
  if (F & (kTable | kDq)) {  // double quantisation reads the absmax code table too
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code2[i] = code2[i];
    __syncthreads();
  }
  const uint32_t table = static_cast<uint32_t>(__cvta_generic_to_shared(s_code));
  const int mine = K / 128 / KS;
  float acc[4] = {0, 0, 0, 0};
  uint32_t xacc = 0;
  Slot slots[D];
  auto load = [&](Slot& s, int i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + g + 8 * h;
      const int k = (warp + i * KS) * 128 + 32 * t;
      s.w[h] = make_uint4(0, 0, 0, 0); s.s[h] = 1.f; s.q[h] = 0;
      if (row < N && i < mine) {
        s.w[h] = ld_w(w + (size_t)row * ROW_BYTES + k / 2);
        const size_t block = ((size_t)row * K + k) >> 6;
        if (F & kAbs) {
          if (F & kDq) { s.q[h] = __ldg(qabs + block); s.s[h] = __ldg(absmax2 + block / 256); }
          else s.s[h] = __ldg(absmax + block);
        }
      }
    }
  };
  auto compute = [&](Slot& s, int i) {
    const int k = (warp + i * KS) * 128 + 32 * t;
    uint4 xv[4] = {};
    if (F & kX) {
      const uint4* src = reinterpret_cast<const uint4*>(x + g * K + k);
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = g < 1 ? __ldg(src + q) : make_uint4(0, 0, 0, 0);
    }
    float sc[2] = {s.s[0], s.s[1]};
    if (F & kDq) {
#pragma unroll
      for (int h = 0; h < 2; ++h) sc[h] = __fadd_rn(__fmul_rn(s_code2[s.q[h]], s.s[h]), 0.01f);
    }
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      uint32_t hi4[2], lo4[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t ww = word_of(s.w[h], word);
        hi4[h] = (ww >> 2) & 0x3C3C3C3Cu; lo4[h] = (ww << 2) & 0x3C3C3C3Cu;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int b = 2 * half;
        uint32_t a[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (F & kDecode) {
            auto addr = [&](uint32_t o, int bb) { return __byte_perm(o, table, 0x7650u | bb); };
            auto look = [&](uint32_t o, int bb) {
              return (F & kNoLds) ? __uint_as_float(addr(o, bb)) : lds_f32(addr(o, bb));
            };
            auto pk = [&](float lo, float hi) {
              return (F & kNoCvt) ? __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632u)
                                  : pack(lo, hi);
            };
            a[h] = pk(look(hi4[h], b) * sc[h], look(lo4[h], b) * sc[h]);
            a[h + 2] = pk(look(hi4[h], b + 1) * sc[h], look(lo4[h], b + 1) * sc[h]);
          } else {
            a[h] = hi4[h] ^ __float_as_uint(sc[h]); a[h + 2] = lo4[h];
          }
        }
        const uint32_t b0 = word_of(xv[word], b), b1 = word_of(xv[word], b + 1);
        if (F & kMma) mma(acc, a, b0, b1);
        else xacc ^= a[0] ^ a[1] ^ a[2] ^ a[3] ^ b0 ^ b1;
      }
    }
  };
#pragma unroll
  for (int d = 0; d < D; ++d) load(slots[d], d);
  for (int base = 0; base < mine; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (base + d < mine) { compute(slots[d], base + d); load(slots[d], base + d + D); }
    }
  }
  acc[0] += __uint_as_float(xacc & 0x1u);
  if (F & kReduce) {
    s_part[warp][g][2 * t] = acc[0]; s_part[warp][g][2 * t + 1] = acc[1];
    s_part[warp][g + 8][2 * t] = acc[2]; s_part[warp][g + 8][2 * t + 1] = acc[3];
    __syncthreads();
    if (threadIdx.x < 16) {
      float sum = 0; for (int ww = 0; ww < KS; ++ww) sum += s_part[ww][threadIdx.x][0];
      if (row0 + threadIdx.x < N) y[row0 + threadIdx.x] = sum;
    }
  } else if (acc[0] + acc[1] + acc[2] + acc[3] == 1234.5f) {
    y[0] = acc[0];
  }
}

int main() {
  const size_t bytes = (size_t)N * ROW_BYTES, blocks = (size_t)N * K / 64;
  uint8_t *w[COPIES], *qabs; float *absmax, *absmax2, *code, *code2, *y; __nv_bfloat16* x;
  uint32_t seed = 1;
  for (auto& p : w) { cudaMalloc(&p, bytes); fill_bytes<<<1024, 256>>>(p, bytes, seed++); }
  cudaMalloc(&qabs, blocks); fill_bytes<<<1024, 256>>>(qabs, blocks, seed++);
  cudaMalloc(&absmax, blocks * 4); fill_floats<<<1024, 256>>>(absmax, blocks, seed++, 0.01f, 0.1f);
  cudaMalloc(&absmax2, blocks / 256 * 4 + 4);
  fill_floats<<<64, 256>>>(absmax2, blocks / 256 + 1, seed++, 0.001f, 0.01f);
  cudaMalloc(&code, 64); fill_floats<<<1, 16>>>(code, 16, seed++, -1.f, 2.f);
  cudaMalloc(&code2, 1024); fill_floats<<<1, 256>>>(code2, 256, seed++, -1.f, 2.f);
  cudaMalloc(&x, 8 * K * 2); fill_bf16<<<64, 256>>>(x, 8 * K, seed++); cudaMalloc(&y, N * 4);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  printf("bisect probe: 4096 -> 11008, 1 token, 22.5 MB weight, %d copies cycled\n", COPIES);
#define RUNK(F, KS, D, MINB, NAME) { \
    auto go = [&](int c) { probe<F, KS, D, MINB><<<(N + 15) / 16, KS * 32>>>(w[c], absmax, qabs, absmax2, code, code2, x, y); }; \
    for (int i = 0; i < 8; ++i) go(i % COPIES); \
    cudaEventRecord(a); for (int i = 0; i < 200; ++i) go(i % COPIES); cudaEventRecord(b); cudaEventSynchronize(b); \
    float ms; cudaEventElapsedTime(&ms, a, b); printf("  %-52s %7.2f us\n", NAME, ms * 1e3f / 200); }
#define RUN(F, NAME) RUNK(F, 4, 2, 6, NAME)
  RUN(0, "weights only");
  RUN(kAbs, "+ fp32 absmax loads");
  RUN(kAbs | kDq, "+ double-quant absmax (u8 + absmax2 + code2)");
  RUN(kAbs | kDq | kX, "+ x loads");
  RUN(kAbs | kDq | kX | kMma, "+ mma (no decode)");
  RUN(kAbs | kDq | kX | kTable | kDecode, "+ decode (no mma)");
  RUN(kAbs | kDq | kX | kTable | kDecode | kMma, "+ decode + mma");
  RUN(kAbs | kDq | kX | kTable | kDecode | kMma | kReduce, "+ decode + mma + block reduce (~kernel)");
  RUN(kX | kTable | kDecode | kMma | kReduce, "kernel without absmax loads");
  RUN(kAbs | kDq | kTable | kDecode | kMma | kReduce, "kernel without x loads");
  RUN(kAbs | kX | kTable | kDecode | kMma | kReduce, "kernel with fp32 absmax");
  constexpr int kFull = kAbs | kDq | kX | kTable | kDecode | kMma | kReduce;
  RUN(kFull | kNoLds, "kernel, code from registers (no LDS)");
  RUN(kFull | kNoCvt, "kernel, bit-select pack (no F2FP)");
  RUN(kFull | kNoLds | kNoCvt, "kernel, no LDS and no F2FP");
  RUNK(kFull, 4, 4, 6, "kernel, ks=4 D=4");
  RUNK(kFull, 4, 8, 4, "kernel, ks=4 D=8 (4 blocks/SM)");
  RUNK(kFull, 8, 2, 3, "kernel, ks=8 D=2");
  RUNK(kFull, 8, 4, 3, "kernel, ks=8 D=4");
  RUNK(kFull, 2, 4, 12, "kernel, ks=2 D=4");
  RUNK(kFull, 2, 8, 8, "kernel, ks=2 D=8");
  RUNK(kFull & ~kDq, 4, 4, 6, "kernel fp32 absmax, ks=4 D=4");
  RUNK(kX | kTable | kDecode | kMma | kReduce, 4, 4, 6, "kernel without absmax loads, ks=4 D=4");
  printf("status: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
}
