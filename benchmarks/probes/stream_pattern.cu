// Read-only probe: how fast can the 4096 -> 11008 NF4 weight (22.5 MB) be streamed with the small-
// batch GEMV's load pattern, without any decode? Variants differ only in the load pattern/depth.
//   nvcc -O3 -std=c++17 -arch=sm_90 stream_pattern.cu -o /tmp/probe && /tmp/probe
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>

constexpr int N = 11008, K = 4096, ROW_BYTES = K / 2, COPIES = 4;

__device__ __forceinline__ uint4 ld_hint(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_plain(const uint8_t* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// The GEMV's pattern: block = KS warps on a 16·MT-row tile; warp w takes 64-byte chunks
// w, w+KS, ...; lane (g, t) reads 16 bytes at 16t of rows g and g+8 of each tile; D chunks in flight.
template <int KS, int MT, int D, bool HINT>
__global__ void gemv_pattern(const uint8_t* w, uint32_t* sink) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16 * MT;
  uint32_t acc = 0;
  const int chunks = K / 128, mine = chunks / KS;
  for (int base = 0; base < mine; base += D) {
    uint4 v[D][MT][2];
#pragma unroll
    for (int d = 0; d < D; ++d)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + mt * 16 + g + 8 * h;
          const int c = warp + (base + d) * KS;
          const uint8_t* p = w + (size_t)row * ROW_BYTES + c * 64 + 16 * t;
          v[d][mt][h] = (row < N && base + d < mine) ? (HINT ? ld_hint(p) : ld_plain(p)) : make_uint4(0,0,0,0);
        }
#pragma unroll
    for (int d = 0; d < D; ++d)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) acc ^= v[d][mt][h].x ^ v[d][mt][h].y ^ v[d][mt][h].z ^ v[d][mt][h].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// Plain streaming read: grid-stride over 16-byte pieces, U loads in flight per thread.
template <int U>
__global__ void stream(const uint8_t* w, size_t bytes, uint32_t* sink) {
  const size_t n = bytes / 16, stride = (size_t)gridDim.x * blockDim.x;
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = i + u * stride < n ? ld_hint(w + 16 * (i + u * stride)) : make_uint4(0,0,0,0);
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

template <typename F>
float time_us(F launch) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 8; ++i) launch(i % COPIES);
  cudaEventRecord(a);
  const int reps = 200;
  for (int i = 0; i < reps; ++i) launch(i % COPIES);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  return ms * 1e3f / reps;
}

int main() {
  const size_t bytes = (size_t)N * ROW_BYTES;
  uint8_t* w[COPIES]; uint32_t* sink;
  for (int c = 0; c < COPIES; ++c) {  // distinct non-zero bytes per copy
    cudaMalloc(&w[c], bytes);
    cudaMemset(w[c], 0x5a + 17 * c, bytes);
  }
  cudaMalloc(&sink, 4);
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  auto report = [&](const char* name, float us) {
    printf("  %-44s %7.2f us  %5.2f TB/s\n", name, us, bytes / us / 1e6);
  };
  printf("stream probe: %zu bytes per call, %d copies cycled (L2-cold), %d SMs\n", bytes, COPIES, sms);
#define PAT(KS, MT, D, HINT) report("gemv pattern ks=" #KS " mt=" #MT " D=" #D " hint=" #HINT, \
    time_us([&](int c) { gemv_pattern<KS, MT, D, HINT><<<(N + 16 * MT - 1) / (16 * MT), KS * 32>>>(w[c], sink); }))
  PAT(4, 1, 2, true); PAT(4, 1, 4, true); PAT(4, 1, 8, true); PAT(4, 1, 2, false);
  PAT(8, 1, 2, true); PAT(8, 1, 4, true); PAT(4, 2, 2, true); PAT(4, 2, 4, true);
  PAT(2, 1, 4, true); PAT(2, 1, 8, true); PAT(16, 1, 2, true);
#define STR(U, BPS, T) report("stream U=" #U " blocks/SM=" #BPS " threads=" #T, \
    time_us([&](int c) { stream<U><<<sms * BPS, T>>>(w[c], bytes, sink); }))
  STR(1, 4, 256); STR(2, 4, 256); STR(4, 4, 256); STR(4, 8, 256); STR(8, 4, 256);
  cudaError_t e = cudaDeviceSynchronize();
  printf("status: %s\n", cudaGetErrorString(e));
  return 0;
}
