// pybind11 entry points of spft._C. Each checks its arguments (SPFT_CHECK_VALUE/_TYPE raise a
// ValueError/TypeError naming the argument) before any kernel is enqueued on
// the current CUDA stream. Python reaches these only through spft.ops.
#include <torch/extension.h>

#include <atomic>
#include <optional>
#include <string>
#include <type_traits>

#ifdef SPFT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "nf4_gemv.cuh"
#include "sddmm.cuh"
#endif

namespace {

// Error messages are joined here without iostreams: the stream code c10::str instantiates in
// this library segfaulted on the H100 image on the first failing check (backtrace inside
// std::ostream::_M_insert<long>; most likely a libstdc++ mismatch with the interpreter's).
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
void append(std::string& s, const c10::Device& v) { s += v.str(); }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
void append(std::string& s, I v) {
  s += std::to_string(v);
}
template <typename... Parts>
std::string join(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

#define SPFT_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, join(__VA_ARGS__))
#define SPFT_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, join(__VA_ARGS__))
#define SPFT_CHECK(cond, ...) TORCH_CHECK(cond, join(__VA_ARGS__))

#ifdef SPFT_WITH_CUDA
spft::FloatKind float_kind(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return spft::FloatKind::kFloat32;
    case torch::kBFloat16:
      return spft::FloatKind::kBFloat16;
    case torch::kFloat16:
      return spft::FloatKind::kFloat16;
    default:
      SPFT_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return spft::FloatKind::kFloat32;
}

// A distinct 61-bit value per call (splitmix64 of a process-wide counter), for the tiled GEMV's
// split-tile counters: they recognise the current call's arrivals by it, so their workspace
// can come uninitialised from the caching allocator.
uint64_t next_split_epoch() {
  static std::atomic<uint64_t> calls{0};
  uint64_t z = calls.fetch_add(1, std::memory_order_relaxed) + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) >> 3;
}

bool aligned16(const torch::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_on(const torch::Tensor& t, const char* name, const torch::Device& device) {
  SPFT_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
}

// The unmerged deltas (dv, idx and its CSR row_ptr) and the bias of either GEMV, checked
// against x and out_features and written into its parameters.
template <typename Params>
void set_deltas_and_bias(Params& p, const torch::Tensor& x,
                         const std::optional<torch::Tensor>& dv,
                         const std::optional<torch::Tensor>& idx,
                         const std::optional<torch::Tensor>& row_ptr,
                         const std::optional<torch::Tensor>& bias, int64_t out_features) {
  const torch::Device device = x.device();
  const bool has_delta = dv.has_value() && dv->numel() > 0;
  if (has_delta) {
    SPFT_CHECK_VALUE(idx.has_value() && row_ptr.has_value(), "dv needs idx and row_ptr");
    SPFT_CHECK_VALUE(dv->dim() == 1 && dv->is_contiguous() && idx->dim() == 1 &&
                          idx->is_contiguous() && idx->numel() == dv->numel(),
                      "dv and idx must be contiguous 1-D tensors of equal length");
    SPFT_CHECK_TYPE(idx->scalar_type() == torch::kInt32 || idx->scalar_type() == torch::kInt64,
                     "idx must be int32 or int64, got ", idx->scalar_type());
    SPFT_CHECK_TYPE(row_ptr->scalar_type() == torch::kInt32 && row_ptr->is_contiguous() &&
                         row_ptr->numel() == out_features + 1,
                     "row_ptr must be a contiguous int32 tensor of out_features + 1 values");
    check_on(*dv, "dv", device);
    check_on(*idx, "idx", device);
    check_on(*row_ptr, "row_ptr", device);
    p.dv = dv->data_ptr();
    p.dv_kind = float_kind(*dv, "dv");
    p.idx = idx->data_ptr();
    p.idx_is_int64 = idx->scalar_type() == torch::kInt64;
    p.row_ptr = row_ptr->data_ptr<int32_t>();
    p.n_deltas = dv->numel();
  }
  if (bias.has_value()) {
    SPFT_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype");
    SPFT_CHECK_VALUE(bias->is_contiguous() && bias->numel() == out_features,
                      "bias must be contiguous with out_features values");
    check_on(*bias, "bias", device);
    p.bias = bias->data_ptr();
  }
}

// x [T, in] of either GEMV: a 2-D CUDA bfloat16/float16 tensor of 1 to 16 tokens, rows
// contiguous and 16-byte aligned, in_features a positive multiple of `in_multiple`; and an
// out_features small enough that the kernels' 32-bit offsets reach all of the weight and of x.
void check_x_and_out_features(const torch::Tensor& x, int64_t in_multiple,
                              int64_t out_features) {
  SPFT_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor");
  SPFT_CHECK_TYPE(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat16,
                   "x must be bfloat16 or float16, got ", x.scalar_type());
  SPFT_CHECK_VALUE(x.dim() == 2, "x must be 2-D [tokens, in_features], got ", x.dim(), "-D");
  const int64_t tokens = x.size(0);
  const int64_t in_features = x.size(1);
  SPFT_CHECK_VALUE(tokens >= 1 && tokens <= 16, "x must hold 1 to 16 tokens, got ", tokens);
  SPFT_CHECK_VALUE(in_features % in_multiple == 0 && in_features > 0,
                    "in_features must be a positive multiple of ", in_multiple, ", got ",
                    in_features);
  SPFT_CHECK_VALUE(x.stride(1) == 1 && x.stride(0) % 8 == 0 && aligned16(x),
                    "x rows must be contiguous and 16-byte aligned");
  SPFT_CHECK_VALUE(out_features >= 1 && out_features < (int64_t{1} << 31),
                    "out_features out of range: ", out_features);
  SPFT_CHECK_VALUE(out_features * in_features < (int64_t{1} << 31),
                    "the weight must have fewer than 2^31 elements, got ",
                    out_features * in_features);
  SPFT_CHECK_VALUE((tokens - 1) * x.stride(0) + in_features < (int64_t{1} << 31),
                    "x spans 2^31 or more elements");
}

// y [T, out] in x's dtype on x's device (whose guard the caller holds), and the shape fields of
// either GEMV's parameters.
template <typename Params>
torch::Tensor output_and_shapes(Params& p, const torch::Tensor& x, int64_t out_features) {
  torch::Tensor y = torch::empty({x.size(0), out_features}, x.options());
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.ldx = x.stride(0);
  p.ldy = y.stride(0);
  p.tokens = static_cast<int>(x.size(0));
  p.out_features = static_cast<int>(out_features);
  p.in_features = static_cast<int>(x.size(1));
  p.x_kind = float_kind(x, "x");
  return y;
}
#endif

// y [T, out] = x [T, in] @ (W + scatter(dv, idx))ᵀ + bias for a 4-bit W; see csrc/nf4_gemv.cuh.
torch::Tensor nf4_gemv(const torch::Tensor& x, const torch::Tensor& packed,
                       const torch::Tensor& absmax, const std::optional<torch::Tensor>& absmax2,
                       const std::optional<torch::Tensor>& code2,
                       const std::optional<torch::Tensor>& offset, const torch::Tensor& code,
                       const std::optional<torch::Tensor>& dv,
                       const std::optional<torch::Tensor>& idx,
                       const std::optional<torch::Tensor>& row_ptr,
                       const std::optional<torch::Tensor>& bias, int64_t blocksize,
                       int64_t out_features, int64_t row_tiles, int64_t ksplit,
                       int64_t depth) {
#ifndef SPFT_WITH_CUDA
  SPFT_CHECK(false, "spft._C was built without CUDA: nf4_gemv is unavailable");
#else
  check_x_and_out_features(x, 32, out_features);
  const torch::Device device = x.device();
  const int64_t tokens = x.size(0);
  SPFT_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                    "blocksize must be a power of two in [32, 4096], got ", blocksize);
  const int64_t numel = out_features * x.size(1);
  SPFT_CHECK_TYPE(packed.scalar_type() == torch::kUInt8, "packed must be uint8");
  SPFT_CHECK_VALUE(packed.is_contiguous() && packed.numel() == numel / 2 && aligned16(packed),
                    "packed must be contiguous, 16-byte aligned, with ", numel / 2,
                    " bytes; got ", packed.numel());
  check_on(packed, "packed", device);
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  SPFT_CHECK_VALUE(absmax.is_contiguous() && absmax.numel() == n_blocks,
                    "absmax must be contiguous with ", n_blocks, " entries, got ", absmax.numel());
  check_on(absmax, "absmax", device);
  const bool double_quant = absmax.scalar_type() == torch::kUInt8;
  SPFT_CHECK_TYPE(double_quant || absmax.scalar_type() == torch::kFloat32,
                   "absmax must be float32 or uint8 (double quantised), got ",
                   absmax.scalar_type());
  SPFT_CHECK_TYPE(code.scalar_type() == torch::kFloat32 && code.numel() == 16 &&
                       code.is_contiguous(),
                   "code must be a contiguous float32 tensor of 16 values");
  check_on(code, "code", device);

  spft::Nf4GemvParams p{};
  p.packed = packed.data_ptr<uint8_t>();
  p.code = code.data_ptr<float>();
  if (double_quant) {
    SPFT_CHECK_VALUE(absmax2.has_value() && code2.has_value() && offset.has_value(),
                      "a uint8 absmax needs absmax2, code2 and offset");
    const int64_t n_blocks2 = (n_blocks + 255) / 256;
    SPFT_CHECK_VALUE(absmax2->scalar_type() == torch::kFloat32 && absmax2->is_contiguous() &&
                          absmax2->numel() == n_blocks2,
                      "absmax2 must be a contiguous float32 tensor of ", n_blocks2, " values");
    SPFT_CHECK_VALUE(code2->scalar_type() == torch::kFloat32 && code2->is_contiguous() &&
                          code2->numel() == 256,
                      "code2 must be a contiguous float32 tensor of 256 values");
    SPFT_CHECK_VALUE(offset->scalar_type() == torch::kFloat32 && offset->numel() == 1,
                      "offset must be a single float32 value");
    check_on(*absmax2, "absmax2", device);
    check_on(*code2, "code2", device);
    check_on(*offset, "offset", device);
    p.qabsmax = absmax.data_ptr<uint8_t>();
    p.absmax2 = absmax2->data_ptr<float>();
    p.code2 = code2->data_ptr<float>();
    p.offset = offset->data_ptr<float>();
  } else {
    p.absmax = absmax.data_ptr<float>();
  }

  set_deltas_and_bias(p, x, dv, idx, row_ptr, bias, out_features);

  spft::Nf4GemvConfig config{static_cast<int>(row_tiles), static_cast<int>(ksplit),
                             static_cast<int>(depth)};
  if (row_tiles == 0 && ksplit == 0 && depth == 0) {
    config = spft::nf4_gemv_default_config(static_cast<int>(tokens));
  }
  SPFT_CHECK_VALUE(spft::nf4_gemv_config_supported(config), "no compiled kernel for row_tiles=",
                    row_tiles, ", ksplit=", ksplit, ", depth=", depth);

  const c10::cuda::CUDAGuard guard(device);
  torch::Tensor y = output_and_shapes(p, x, out_features);
  p.blocksize_log2 = 0;
  while ((int64_t{1} << p.blocksize_log2) < blocksize) ++p.blocksize_log2;
  const cudaError_t err = spft::nf4_gemv(p, config, at::cuda::getCurrentCUDAStream());
  SPFT_CHECK(err == cudaSuccess, "nf4_gemv launch failed: ", cudaGetErrorString(err));
  return y;
#endif
}

// y [T, out] = x [T, in] @ (W + scatter(dv, idx))ᵀ + bias for a 4-bit W in the serving layout
// of `spft.ops.nf4_gemv_pack`; see csrc/nf4_gemv.cuh.
torch::Tensor nf4_gemv_tiled(const torch::Tensor& x, const torch::Tensor& codes,
                             const torch::Tensor& absmax, const torch::Tensor& code,
                             const std::optional<torch::Tensor>& dv,
                             const std::optional<torch::Tensor>& idx,
                             const std::optional<torch::Tensor>& row_ptr,
                             const std::optional<torch::Tensor>& bias, int64_t out_features,
                             int64_t ksplit, int64_t groups, int64_t depth, int64_t table,
                             int64_t deltas_first, int64_t tiles_per_block,
                             int64_t split_parts, int64_t stage_x, int64_t deltas_apart) {
#ifndef SPFT_WITH_CUDA
  SPFT_CHECK(false, "spft._C was built without CUDA: nf4_gemv_tiled is unavailable");
#else
  check_x_and_out_features(x, 64, out_features);
  const torch::Device device = x.device();
  const int64_t tokens = x.size(0);
  const int64_t tiles = (out_features + 15) / 16;
  const int64_t groups_per_row = x.size(1) / 64;
  SPFT_CHECK_TYPE(codes.scalar_type() == torch::kUInt8, "codes must be uint8, got ",
                   codes.scalar_type());
  SPFT_CHECK_VALUE(codes.dim() == 4 && codes.size(0) == tiles && codes.size(1) == groups_per_row &&
                        codes.size(2) == 32 && codes.size(3) == 16 && codes.is_contiguous() &&
                        aligned16(codes),
                    "codes must be a contiguous, 16-byte aligned [", tiles, ", ", groups_per_row,
                    ", 32, 16] tensor (the layout of nf4_gemv_pack for this x and out_features)");
  SPFT_CHECK_TYPE(absmax.scalar_type() == torch::kFloat32, "absmax must be float32, got ",
                   absmax.scalar_type());
  SPFT_CHECK_VALUE(absmax.dim() == 4 && absmax.size(0) == tiles &&
                        absmax.size(1) == groups_per_row && absmax.size(2) == 8 &&
                        absmax.size(3) == 2 && absmax.is_contiguous(),
                    "absmax must be a contiguous [", tiles, ", ", groups_per_row, ", 8, 2] tensor");
  SPFT_CHECK_TYPE(code.scalar_type() == torch::kFloat32 && code.numel() == 16 &&
                       code.is_contiguous(),
                   "code must be a contiguous float32 tensor of 16 values");
  check_on(codes, "codes", device);
  check_on(absmax, "absmax", device);
  check_on(code, "code", device);

  spft::Nf4TiledGemvParams p{};
  p.codes = codes.data_ptr<uint8_t>();
  p.absmax = absmax.data_ptr<float>();
  p.code = code.data_ptr<float>();
  set_deltas_and_bias(p, x, dv, idx, row_ptr, bias, out_features);
  spft::Nf4TiledGemvConfig config{static_cast<int>(ksplit), static_cast<int>(groups),
                                  static_cast<int>(depth), static_cast<int>(table),
                                  static_cast<int>(deltas_first),
                                  static_cast<int>(tiles_per_block)};
  if (ksplit == 0 && groups == 0 && depth == 0 && table == 0 && deltas_first == 0 &&
      tiles_per_block == 0) {
    config = spft::nf4_gemv_tiled_default_config(static_cast<int>(tokens),
                                                 static_cast<int>(out_features));
  }
  SPFT_CHECK_VALUE(spft::nf4_gemv_tiled_config_supported(config),
                    "no compiled tiled kernel for ksplit=", ksplit, ", groups=", groups,
                    ", depth=", depth, ", table=", table, ", deltas_first=", deltas_first,
                    ", tiles_per_block=", tiles_per_block);
  SPFT_CHECK_VALUE(split_parts == -1 || split_parts == 0 || split_parts == 1 ||
                        split_parts == 2 || split_parts == 4 || split_parts == 8,
                    "split_parts must be -1 (automatic), 0 or 1 (no split), 2, 4 or 8, got ",
                    split_parts);
  SPFT_CHECK_VALUE(stage_x == -1 || stage_x == 0 || stage_x == 1,
                    "stage_x must be -1 (automatic), 0 (never) or 1 (whenever it fits), got ",
                    stage_x);
  SPFT_CHECK_VALUE(deltas_apart >= -1 && deltas_apart <= 1,
                    "deltas_apart must be -1 (automatic), 0 (never) or 1 (always), got ",
                    deltas_apart);
  p.split_parts = static_cast<int>(split_parts);
  p.stage_x = static_cast<int>(stage_x);
  p.deltas_apart = static_cast<int>(deltas_apart);
  p.split_epoch = next_split_epoch();

  const c10::cuda::CUDAGuard guard(device);
  torch::Tensor y = output_and_shapes(p, x, out_features);
  size_t workspace_bytes = 0;
  cudaError_t err = spft::nf4_gemv_tiled_workspace_bytes(p, config, &workspace_bytes);
  SPFT_CHECK(err == cudaSuccess, "nf4_gemv_tiled: ", cudaGetErrorString(err));
  // From the caching allocator on the current stream: a concurrent call on another stream gets
  // other memory, and a CUDA graph keeps its own.
  torch::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = torch::empty({static_cast<int64_t>(workspace_bytes)},
                             torch::TensorOptions().dtype(torch::kUInt8).device(device));
    p.workspace = workspace.data_ptr();
  }
  err = spft::nf4_gemv_tiled(p, config, at::cuda::getCurrentCUDAStream());
  SPFT_CHECK(err == cudaSuccess, "nf4_gemv_tiled launch failed: ", cudaGetErrorString(err));
  return y;
#endif
}

// grad [k] fp32 = Σ_t dy[t, r_j] · x[t, c_j] at the sorted flat indices idx of an [M, N] weight,
// on the tensor cores through shared-memory stages; see csrc/sddmm.cuh.
// schedule (how the blocks share the tiles and tokens): 0 `splits` blocks per tile along the
// tokens (-1: the fewest that fill their waves to 90 %); 1 `blocks` equal segments of the
// tiles' token stages (-1: one per SM); -1, the default: 0 when splits is given, 1 when blocks
// is, otherwise 0 when the default splits fit in one wave of blocks, else 1. Partial sums go
// to a zeroed [planes, k] allocated here: with at most two per entry they are added in place
// (two additions onto 0 give the same bits in either order), otherwise each plane gets one and
// the planes are summed in a fixed order, so the result never depends on timing. It also
// allocates the tile bounds and a transposed copy of the smaller of dy / x (T × min(M, N)
// elements) for the call's duration. fill: how the token stages are handed over
// between the warps (see csrc/sddmm.cu): 0 a block barrier per stage, 1 per-stage barriers
// (-1, the default: 1).
torch::Tensor sddmm_staged(const torch::Tensor& dy, const torch::Tensor& x,
                           const torch::Tensor& idx, int64_t in_features, int64_t splits,
                           int64_t fill, int64_t schedule, int64_t blocks) {
#ifndef SPFT_WITH_CUDA
  SPFT_CHECK(false, "spft._C was built without CUDA: sddmm_staged is unavailable");
#else
  SPFT_CHECK_VALUE(dy.is_cuda(), "dy must be a CUDA tensor");
  SPFT_CHECK_VALUE(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0),
                    "dy [T, out] and x [T, in] must be 2-D with equal T");
  SPFT_CHECK_TYPE(dy.scalar_type() == torch::kBFloat16 || dy.scalar_type() == torch::kFloat16,
                   "dy must be bfloat16 or float16, got ", dy.scalar_type());
  SPFT_CHECK_TYPE(x.scalar_type() == dy.scalar_type(), "x must have dy's dtype, got ",
                   x.scalar_type());
  SPFT_CHECK_VALUE(x.size(1) == in_features, "x has ", x.size(1),
                    " features, expected in_features=", in_features);
  const torch::Device device = dy.device();
  check_on(x, "x", device);
  check_on(idx, "idx", device);
  SPFT_CHECK_TYPE(idx.scalar_type() == torch::kInt32 || idx.scalar_type() == torch::kInt64,
                   "idx must be int32 or int64, got ", idx.scalar_type());
  SPFT_CHECK_VALUE(idx.dim() == 1 && idx.is_contiguous(), "idx must be contiguous and 1-D");
  const int64_t tokens = dy.size(0), rows = dy.size(1), cols = x.size(1), k = idx.numel();
  SPFT_CHECK_VALUE(rows % 8 == 0 && cols % 8 == 0 && rows < (int64_t{1} << 30) &&
                        cols < (int64_t{1} << 30),
                    "out_features and in_features must be multiples of 8, got ", rows, " and ",
                    cols);
  SPFT_CHECK_VALUE(tokens < (int64_t{1} << 30), "too many tokens: ", tokens);
  SPFT_CHECK_VALUE(k < (int64_t{1} << 31), "idx must hold fewer than 2^31 entries");
  SPFT_CHECK_VALUE(idx.scalar_type() == torch::kInt64 || rows * cols < (int64_t{1} << 31),
                    "an int32 idx cannot address a weight of ", rows * cols, " elements");
  SPFT_CHECK_VALUE(dy.stride(1) == 1 && dy.stride(0) % 8 == 0 && aligned16(dy),
                    "dy rows must be contiguous and 16-byte aligned");
  SPFT_CHECK_VALUE(x.stride(1) == 1 && x.stride(0) % 8 == 0 && aligned16(x),
                    "x rows must be contiguous and 16-byte aligned");
  SPFT_CHECK_VALUE(dy.stride(0) < spft::kSddmmMaxRowStride &&
                        x.stride(0) < spft::kSddmmMaxRowStride,
                    "dy and x row strides must be below 2^27 elements, got ", dy.stride(0),
                    " and ", x.stride(0));
  const c10::cuda::CUDAGuard guard(device);
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  SPFT_CHECK_VALUE(props->major >= 8, "sddmm_staged needs compute capability 8.0 or newer, got ",
                    props->major, ".", props->minor);
  SPFT_CHECK_VALUE(fill >= -1 && fill <= 1, "fill must be -1, 0 or 1, got ", fill);
  SPFT_CHECK_VALUE(schedule >= -1 && schedule <= 1, "schedule must be -1, 0 or 1, got ",
                    schedule);
  SPFT_CHECK_VALUE(splits == -1 || (splits >= 1 && splits <= 1024),
                    "splits must be -1 or in [1, 1024], got ", splits);
  SPFT_CHECK_VALUE(blocks == -1 || (blocks >= 1 && blocks <= (int64_t{1} << 20)),
                    "blocks must be -1 or in [1, 2^20], got ", blocks);
  SPFT_CHECK_VALUE(!(schedule == 1 && splits != -1), "splits applies to schedule 0 only");
  SPFT_CHECK_VALUE(!(schedule == 0 && blocks != -1), "blocks applies to schedule 1 only");
  SPFT_CHECK_VALUE(!(splits != -1 && blocks != -1), "pass splits or blocks, not both");
  const int sms = props->multiProcessorCount;
  // The rule may fall back to splits where segments cannot serve; an explicit schedule or
  // block count may not.
  const bool rule_picks = schedule == -1 && blocks == -1;
  // Read only where splits is -1 (the given count otherwise).
  const int64_t default_splits =
      splits != -1 ? splits
                   : spft::sddmm_default_splits(static_cast<int>(tokens), static_cast<int>(rows),
                                                static_cast<int>(cols), sms);
  if (schedule == -1 && splits == -1) {
    // An explicit block count asks for segments. Otherwise segments when splits would need
    // more than one wave of blocks: then each block would repeat the per-tile listing and
    // pipeline fill several times, and the last wave may run part-empty
    // (benchmarks/RESULTS.md, twenty-first session).
    const int64_t tiles = ((rows + spft::kSddmmTile - 1) / spft::kSddmmTile) *
                          ((cols + spft::kSddmmTile - 1) / spft::kSddmmTile);
    schedule = blocks != -1 || tiles * default_splits > sms ? 1 : 0;
  }
  spft::SddmmSegments segments{};
  if (schedule != 0 && splits == -1) {
    segments = spft::sddmm_segments(static_cast<int>(tokens), static_cast<int>(rows),
                                     static_cast<int>(cols),
                                     static_cast<int>(blocks == -1 ? sms : blocks));
    SPFT_CHECK_VALUE(segments.blocks > 0 || rule_picks || tokens == 0 || rows == 0 ||
                          cols == 0,
                      "this weight has too many tiles for schedule 1");
  }
  const bool use_segments = segments.blocks > 0;
  if (!use_segments && splits < 0) splits = default_splits;
  // splits: whole 16-token stages per split, and no split left without tokens.
  int64_t per_split = 16;
  if (!use_segments) {
    per_split = std::max<int64_t>(16, (tokens + splits - 1) / splits + 15) / 16 * 16;
    splits = std::max<int64_t>(1, (tokens + per_split - 1) / per_split);
  }
  const int64_t planes = use_segments ? segments.planes : splits;
  // Up to two partial sums per entry are added in place (in either order, the same bits);
  // more go to planes summed in a fixed order.
  const bool accumulate = planes == 2;
  torch::Tensor partial =
      torch::empty({accumulate ? 1 : planes, k}, dy.options().dtype(torch::kFloat32));
  if (k == 0) return partial[0];
  if (tokens == 0 || rows == 0 || cols == 0) return partial.zero_().sum(0);

  // bounds[r][c]: the first position of idx at or after r·N + min(c·tile, N).
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t col_tiles = (cols + spft::kSddmmTile - 1) / spft::kSddmmTile;
  const int64_t n_bounds = rows * (col_tiles + 1);
  torch::Tensor bounds = torch::empty({n_bounds}, idx.options().dtype(torch::kInt32));

  // The kernel gathers the smaller operand's features, transposed here and blocked by 16-token
  // stage: a transient copy of about T × min(M, N) elements.
  const bool gather_cols = cols <= rows;
  const torch::Tensor& to_gather = gather_cols ? x : dy;
  const torch::Tensor& blocked = gather_cols ? dy : x;
  torch::Tensor gathered =
      torch::empty({(tokens + 15) / 16 * 16 * to_gather.size(1)}, dy.options());

  spft::SddmmPrepareParams q{};
  q.idx = idx.data_ptr();
  q.idx_is_int64 = idx.scalar_type() == torch::kInt64;
  q.bounds = bounds.data_ptr<int32_t>();
  q.k = k;
  q.n_bounds = n_bounds;
  q.rows = static_cast<int>(rows);
  q.cols = static_cast<int>(cols);
  q.src = to_gather.data_ptr();
  q.ld_src = to_gather.stride(0);
  q.dst = gathered.data_ptr();
  q.tokens = static_cast<int>(tokens);
  q.features = static_cast<int>(to_gather.size(1));
  q.zero = partial.data_ptr<float>();
  q.zero_count = partial.numel();
  cudaError_t err = spft::sddmm_prepare(q, stream);
  SPFT_CHECK(err == cudaSuccess, "sddmm preparation launch failed: ", cudaGetErrorString(err));

  spft::SddmmParams p{};
  p.gathered = gathered.data_ptr();
  p.blocked = blocked.data_ptr();
  p.gather_cols = gather_cols;
  p.idx = idx.data_ptr();
  p.idx_is_int64 = q.idx_is_int64;
  p.bounds = q.bounds;
  p.out = partial.data_ptr<float>();
  p.k = k;
  p.ldb = blocked.stride(0);
  p.tokens = static_cast<int>(tokens);
  p.rows = static_cast<int>(rows);
  p.cols = static_cast<int>(cols);
  if (use_segments) {
    p.schedule = spft::kSddmmScheduleSegments;
    p.blocks = segments.blocks;
    p.planes = segments.planes;
    p.stages = segments.stages;
    p.units = segments.units;
  } else {
    p.schedule = spft::kSddmmScheduleSplits;
    p.splits = static_cast<int>(splits);
    p.tokens_per_split = static_cast<int>(per_split);
  }
  p.kind = float_kind(dy, "dy");
  p.fill = fill == -1 ? 1 : static_cast<int>(fill);
  p.accumulate = accumulate;
  err = spft::sddmm_staged(p, stream);
  SPFT_CHECK(err == cudaSuccess, "sddmm_staged launch failed: ", cudaGetErrorString(err));
  return planes <= 2 ? partial[0] : partial.sum(0);
#endif
}

std::vector<std::vector<int64_t>> nf4_gemv_tiled_configs() {
  std::vector<std::vector<int64_t>> result;
#ifdef SPFT_WITH_CUDA
  spft::Nf4TiledGemvConfig configs[64];
  const int n = spft::nf4_gemv_tiled_configs(configs, 64);
  for (int i = 0; i < n && i < 64; ++i) {
    result.push_back(
        {configs[i].ksplit, configs[i].groups, configs[i].depth, configs[i].table,
         configs[i].deltas_first, configs[i].tiles});
  }
#endif
  return result;
}

std::vector<int64_t> nf4_gemv_default_config(int64_t tokens) {
#ifdef SPFT_WITH_CUDA
  const spft::Nf4GemvConfig c = spft::nf4_gemv_default_config(static_cast<int>(tokens));
  return {c.row_tiles, c.ksplit, c.depth};
#else
  (void)tokens;
  return {};
#endif
}

std::vector<std::vector<int64_t>> nf4_gemv_configs() {
  std::vector<std::vector<int64_t>> result;
#ifdef SPFT_WITH_CUDA
  spft::Nf4GemvConfig configs[64];
  const int n = spft::nf4_gemv_configs(configs, 64);
  for (int i = 0; i < n && i < 64; ++i) {
    result.push_back({configs[i].row_tiles, configs[i].ksplit, configs[i].depth});
  }
#endif
  return result;
}

bool with_cuda() {
#ifdef SPFT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spft compiled kernels (optional; reached through spft.ops)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("nf4_gemv", &nf4_gemv, "4-bit small-batch GEMV with an unmerged sparse delta",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code2"),
        py::arg("offset"), py::arg("code"), py::arg("dv"), py::arg("idx"), py::arg("row_ptr"),
        py::arg("bias"), py::arg("blocksize"), py::arg("out_features"), py::arg("row_tiles") = 0,
        py::arg("ksplit") = 0, py::arg("depth") = 0);
  m.def("nf4_gemv_tiled", &nf4_gemv_tiled,
        "4-bit small-batch GEMV on the serving layout of spft.ops.nf4_gemv_pack",
        py::arg("x"), py::arg("codes"), py::arg("absmax"), py::arg("code"), py::arg("dv"),
        py::arg("idx"), py::arg("row_ptr"), py::arg("bias"), py::arg("out_features"),
        py::arg("ksplit") = 0, py::arg("groups") = 0, py::arg("depth") = 0,
        py::arg("table") = 0, py::arg("deltas_first") = 0, py::arg("tiles_per_block") = 0,
        py::arg("split_parts") = -1, py::arg("stage_x") = -1, py::arg("deltas_apart") = -1);
  m.def("sddmm_staged", &sddmm_staged,
        "fp32 gradient of sparse deltas at sorted flat indices (staged SDDMM)",
        py::arg("dy"), py::arg("x"), py::arg("idx"), py::arg("in_features"),
        py::arg("splits") = -1, py::arg("fill") = -1, py::arg("schedule") = -1,
        py::arg("blocks") = -1);
  m.def("nf4_gemv_tiled_configs", &nf4_gemv_tiled_configs,
        "the compiled (ksplit, groups, depth, table, deltas_first, tiles_per_block) launch "
        "configurations of "
        "nf4_gemv_tiled");
  m.def("nf4_gemv_configs", &nf4_gemv_configs,
        "the compiled (row_tiles, ksplit, depth) launch configurations");
  m.def("nf4_gemv_default_config", &nf4_gemv_default_config,
        "(row_tiles, ksplit, depth) the kernel uses for this many tokens", py::arg("tokens"));
}
