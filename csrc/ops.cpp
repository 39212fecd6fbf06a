// Torch bindings: op schemas, argument checks, and the CUDA implementations that fill the launch params.
// Registered as torch.ops.kvkernels.paged_decode_attention / write_kv_cache. No host sync anywhere, so
// both ops can be captured in a CUDA graph.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "kvkernels.h"

namespace kvkernels {
namespace {

constexpr double kLog2E = 1.4426950408889634;

bool is_supported_head_dim(int64_t head_dim) {
  for (int supported : kSupportedHeadDims) {
    if (head_dim == supported) return true;
  }
  return false;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& first) {
  TORCH_CHECK(t.is_cuda(), "kvkernels: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == first.device(), "kvkernels: ", name, " is on ", t.device(),
              " but the other tensors are on ", first.device());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 0 || t.stride(-1) == 1, "kvkernels: ", name,
              " must be contiguous in its last (head_dim) dimension, got strides ", t.strides());
}

// The decode kernel reads cache rows with 16-byte vector loads.
void check_rows_aligned(const at::Tensor& cache, const char* name) {
  const int64_t bytes = cache.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0, "kvkernels: ", name,
              " must start on a 16-byte boundary for vector loads (it is a view at an odd offset)");
  for (int dim = 0; dim < 3; ++dim) {
    TORCH_CHECK(cache.size(dim) == 1 || (cache.stride(dim) * bytes) % 16 == 0, "kvkernels: ", name, " stride ",
                cache.stride(dim), " of dim ", dim, " is not a multiple of 16 bytes; vector loads need aligned rows");
  }
}

bool is_quantized(at::ScalarType dtype) { return dtype == at::kFloat8_e4m3fn || dtype == at::kChar; }

CacheType cache_type_of(at::ScalarType dtype) {
  if (dtype == at::kFloat8_e4m3fn) return CacheType::kFp8E4M3;
  if (dtype == at::kChar) return CacheType::kInt8;
  return CacheType::kSameAsQuery;
}

ScalarType scalar_type_of(at::ScalarType dtype) {
  if (dtype == at::kHalf) return ScalarType::kHalf;
  if (dtype == at::kBFloat16) return ScalarType::kBFloat16;
  return ScalarType::kFloat;
}

// (block, slot, head) strides of fp8 / int8 pages' fp32 scales: [num_blocks, block_size, H_kv] per token,
// [H_kv] static per head (0, 0, s).
struct ScaleStrides {
  int64_t block, slot, head;
};

ScaleStrides check_scales(const std::optional<at::Tensor>& scale, const char* name, const at::Tensor& cache) {
  TORCH_CHECK(scale.has_value() && scale->defined(), "kvkernels: ", cache.scalar_type(), " pages need ", name,
              ": float32 [num_blocks, block_size, num_kv_heads] or [num_kv_heads]");
  const at::Tensor& s = *scale;
  check_cuda(s, name, cache);
  TORCH_CHECK(s.scalar_type() == at::kFloat, "kvkernels: ", name, " must be float32, got ", s.scalar_type());
  if (s.dim() == 3) {
    TORCH_CHECK(s.size(0) == cache.size(0) && s.size(1) == cache.size(1) && s.size(2) == cache.size(2),
                "kvkernels: ", name, " must be [", cache.size(0), ", ", cache.size(1), ", ", cache.size(2),
                "] (per token) or [", cache.size(2), "] (static), got ", s.sizes());
    return {s.stride(0), s.stride(1), s.stride(2)};
  }
  TORCH_CHECK(s.dim() == 1 && s.size(0) == cache.size(2), "kvkernels: ", name, " must be [", cache.size(0), ", ",
              cache.size(1), ", ", cache.size(2), "] (per token) or [", cache.size(2), "] (static), got ", s.sizes());
  return {0, 0, s.stride(0)};
}

struct PageScales {
  float* k = nullptr;  // null for unquantized pages
  float* v = nullptr;
  ScaleStrides k_strides{}, v_strides{};
  bool per_token = false;
};

// Scales go with fp8 / int8 pages and only with them, k's and v's of one kind (both per token or both static).
PageScales check_page_scales(const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                             const at::Tensor& k_cache) {
  PageScales scales;
  if (!is_quantized(k_cache.scalar_type())) {
    TORCH_CHECK(!(k_scale.has_value() && k_scale->defined()) && !(v_scale.has_value() && v_scale->defined()),
                "kvkernels: k_scale / v_scale belong to fp8 or int8 pages; these pages are ", k_cache.scalar_type());
    return scales;
  }
  scales.k_strides = check_scales(k_scale, "k_scale", k_cache);
  scales.v_strides = check_scales(v_scale, "v_scale", k_cache);
  TORCH_CHECK(k_scale->sizes() == v_scale->sizes(), "kvkernels: v_scale has shape ", v_scale->sizes(),
              " but k_scale has ", k_scale->sizes());
  scales.k = k_scale->data_ptr<float>();
  scales.v = v_scale->data_ptr<float>();
  scales.per_token = k_scale->dim() == 3;
  return scales;
}

// The scale fields both kernels' params share (PagedDecodeParams, WriteKVParams).
template <typename Params>
void set_scale_params(Params& p, const PageScales& scales) {
  p.k_scale = scales.k;
  p.v_scale = scales.v;
  p.stride_ks_block = scales.k_strides.block;
  p.stride_ks_slot = scales.k_strides.slot;
  p.stride_ks_head = scales.k_strides.head;
  p.stride_vs_block = scales.v_strides.block;
  p.stride_vs_slot = scales.v_strides.slot;
  p.stride_vs_head = scales.v_strides.head;
}

void check_fits_int(int64_t value, const char* what) {
  TORCH_CHECK(value <= std::numeric_limits<int32_t>::max() - 1024, "kvkernels: ", what, " = ", value,
              " is too large for the kernel's 32-bit token indices");
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
                            int64_t min_split_tokens, int64_t max_splits, at::Tensor& out, at::Tensor& partial_out,
                            at::Tensor& partial_lse, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale) {
  // q [B, H, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D] in q's dtype, or fp8 / int8 with fp32
  // k_scale, v_scale [num_blocks, block_size, H_kv] or [H_kv]; block_tables int32 [B, M]; seq_lens int32 [B].
  check_cuda(q, "q", q);
  check_cuda(k_cache, "k_cache", q);
  check_cuda(v_cache, "v_cache", q);
  check_cuda(block_tables, "block_tables", q);
  check_cuda(seq_lens, "seq_lens", q);
  check_cuda(out, "out", q);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "kvkernels: the CUDA decode kernel supports float16, bfloat16 and float32, got q of dtype ", dtype);
  const auto page_dtype = k_cache.scalar_type();
  TORCH_CHECK((page_dtype == dtype || is_quantized(page_dtype)) && v_cache.scalar_type() == page_dtype &&
                  out.scalar_type() == dtype,
              "kvkernels: k_cache (", page_dtype, ") and v_cache (", v_cache.scalar_type(), ") must both have q's ",
              "dtype ", dtype, " or both be float8_e4m3fn / int8, and out (", out.scalar_type(), ") q's dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, "kvkernels: block_tables must be int32, got ",
              block_tables.scalar_type());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "kvkernels: seq_lens must be int32, got ", seq_lens.scalar_type());
  TORCH_CHECK(q.dim() == 3, "kvkernels: q must be [batch, num_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "kvkernels: k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "kvkernels: v_cache has shape ", v_cache.sizes(),
              " but k_cache has ", k_cache.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "kvkernels: out has shape ", out.sizes(), " but q has ", q.sizes());
  const PageScales scales = check_page_scales(k_scale, v_scale, k_cache);

  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "kvkernels: k_cache head_dim is ", k_cache.size(3), " but q's is ",
              head_dim);
  TORCH_CHECK(is_supported_head_dim(head_dim), "kvkernels: the CUDA decode kernel supports head_dim 32, 64, 80, 96, ",
              "128 and 256, got ", head_dim, "; use backend='triton' for other sizes");
  TORCH_CHECK(block_size >= kMinBlockSize && block_size <= kMaxBlockSize && (block_size & (block_size - 1)) == 0,
              "kvkernels: the CUDA decode kernel supports block sizes that are powers of two from ", kMinBlockSize,
              " to ", kMaxBlockSize, ", got ", block_size);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "kvkernels: num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  TORCH_CHECK(num_blocks > 0, "kvkernels: k_cache has no blocks");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch, "kvkernels: block_tables must be [batch=",
              batch, ", max_blocks_per_seq], got ", block_tables.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch, "kvkernels: seq_lens must be [batch=", batch,
              "], got ", seq_lens.sizes());
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  check_last_dim_contiguous(out, "out");
  TORCH_CHECK(min_split_tokens >= 1, "kvkernels: min_split_tokens must be >= 1, got ", min_split_tokens);
  TORCH_CHECK(max_splits >= 1 && max_splits <= kMaxSplits, "kvkernels: max_splits must be in [1, ", kMaxSplits,
              "], got ", max_splits);
  if (max_splits > 1) {
    check_cuda(partial_out, "partial_out", q);
    check_cuda(partial_lse, "partial_lse", q);
    TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_lse.scalar_type() == at::kFloat,
                "kvkernels: partial_out and partial_lse must be float32");
    TORCH_CHECK(partial_out.sizes() == at::IntArrayRef({batch, num_heads, max_splits, head_dim}) &&
                    partial_out.is_contiguous(),
                "kvkernels: partial_out must be contiguous [", batch, ", ", num_heads, ", ", max_splits, ", ",
                head_dim, "], got ", partial_out.sizes());
    TORCH_CHECK(partial_lse.sizes() == at::IntArrayRef({batch, num_heads, max_splits}) && partial_lse.is_contiguous(),
                "kvkernels: partial_lse must be contiguous [", batch, ", ", num_heads, ", ", max_splits, "], got ",
                partial_lse.sizes());
  }
  if (batch == 0 || num_heads == 0) return;

  check_rows_aligned(k_cache, "k_cache");
  check_rows_aligned(v_cache, "v_cache");
  const int64_t max_blocks_per_seq = block_tables.size(1);
  check_fits_int(max_blocks_per_seq * block_size, "max_blocks_per_seq * block_size");
  check_fits_int(batch, "batch");
  const HeadChunking chunking = chunk_heads(static_cast<int>(num_heads / num_kv_heads));
  TORCH_CHECK(num_kv_heads * chunking.chunks <= 65535 && num_heads <= 65535, "kvkernels: too many heads for the ",
              "launch grid (num_heads=", num_heads, ", num_kv_heads=", num_kv_heads, ")");

  PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.partial_out = max_splits > 1 ? partial_out.data_ptr<float>() : nullptr;
  p.partial_lse = max_splits > 1 ? partial_lse.data_ptr<float>() : nullptr;
  set_scale_params(p, scales);
  p.stride_q_seq = q.stride(0);
  p.stride_q_head = q.stride(1);
  p.stride_k_block = k_cache.stride(0);
  p.stride_k_slot = k_cache.stride(1);
  p.stride_k_head = k_cache.stride(2);
  p.stride_v_block = v_cache.stride(0);
  p.stride_v_slot = v_cache.stride(1);
  p.stride_v_head = v_cache.stride(2);
  p.stride_table_seq = block_tables.stride(0);
  p.stride_table_block = block_tables.stride(1);
  p.stride_seq_lens = seq_lens.stride(0);
  p.stride_out_seq = out.stride(0);
  p.stride_out_head = out.stride(1);
  p.qk_scale = static_cast<float>(scale * kLog2E);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.group_size = static_cast<int>(num_heads / num_kv_heads);
  p.head_chunks = chunking.chunks;
  p.heads_per_chunk = chunking.heads_per_chunk;
  p.group_tile = chunking.group_tile;
  p.block_size = static_cast<int>(block_size);
  p.log2_block_size = 0;
  while ((1 << p.log2_block_size) < block_size) ++p.log2_block_size;
  p.max_blocks_per_seq = static_cast<int>(max_blocks_per_seq);
  p.capacity = static_cast<int>(max_blocks_per_seq * block_size);
  p.max_splits = static_cast<int>(max_splits);
  p.min_split_tokens = static_cast<int>(std::min<int64_t>(min_split_tokens, std::numeric_limits<int32_t>::max()));

  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  bool launched = false;
  switch (cache_type_of(page_dtype)) {
    case CacheType::kFp8E4M3: launched = launch_paged_decode_fp8(p, scalar_type_of(dtype), stream); break;
    case CacheType::kInt8: launched = launch_paged_decode_int8(p, scalar_type_of(dtype), stream); break;
    default:
      switch (dtype) {
        case at::kHalf: launched = launch_paged_decode_fp16(p, stream); break;
        case at::kBFloat16: launched = launch_paged_decode_bf16(p, stream); break;
        default: launched = launch_paged_decode_fp32(p, stream); break;
      }
  }
  TORCH_CHECK(launched, "kvkernels: no decode kernel for head_dim ", head_dim, " and group tile ", p.group_tile);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale) {
  // k, v [N, H_kv, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D] in k's dtype, or fp8 / int8 with fp32
  // k_scale, v_scale [num_blocks, block_size, H_kv] (written) or [H_kv] (read); slot_mapping int64 [N].
  check_cuda(k, "k", k_cache);
  check_cuda(v, "v", k_cache);
  check_cuda(k_cache, "k_cache", k_cache);
  check_cuda(v_cache, "v_cache", k_cache);
  check_cuda(slot_mapping, "slot_mapping", k_cache);
  const auto dtype = k.scalar_type();
  const auto page_dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "kvkernels: the CUDA KV write supports float16, bfloat16 and float32 rows, got k of dtype ", dtype);
  TORCH_CHECK(v.scalar_type() == dtype && (page_dtype == dtype || is_quantized(page_dtype)) &&
                  v_cache.scalar_type() == page_dtype,
              "kvkernels: v (", v.scalar_type(), ") must have k's dtype ", dtype, ", and k_cache (", page_dtype,
              ") and v_cache (", v_cache.scalar_type(), ") both k's dtype or both float8_e4m3fn / int8");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, "kvkernels: slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4, "kvkernels: k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "kvkernels: v_cache has shape ", v_cache.sizes(),
              " but k_cache has ", k_cache.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "kvkernels: k must be [num_tokens, ", k_cache.size(2), ", ", k_cache.size(3), "], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "kvkernels: v has shape ", v.sizes(), " but k has ", k.sizes());
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), "kvkernels: slot_mapping must be [",
              k.size(0), "], got ", slot_mapping.sizes());
  check_last_dim_contiguous(k_cache, "k_cache");
  check_last_dim_contiguous(v_cache, "v_cache");
  const PageScales scales = check_page_scales(k_scale, v_scale, k_cache);
  TORCH_CHECK(scales.k == nullptr || k.size(2) <= kMaxQuantizedHeadDim, "kvkernels: the CUDA KV write quantizes rows ",
              "of head_dim <= ", kMaxQuantizedHeadDim, ", got ", k.size(2));
  const int64_t num_tokens = k.size(0);
  if (num_tokens == 0 || k.numel() == 0) return;
  check_fits_int(num_tokens, "num_tokens");
  check_fits_int(k.size(1) * k.size(2), "num_kv_heads * head_dim");

  WriteKVParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.stride_k_token = k.stride(0);
  p.stride_k_head = k.stride(1);
  p.stride_k_dim = k.stride(2);
  p.stride_v_token = v.stride(0);
  p.stride_v_head = v.stride(1);
  p.stride_v_dim = v.stride(2);
  p.stride_kc_block = k_cache.stride(0);
  p.stride_kc_slot = k_cache.stride(1);
  p.stride_kc_head = k_cache.stride(2);
  p.stride_vc_block = v_cache.stride(0);
  p.stride_vc_slot = v_cache.stride(1);
  p.stride_vc_head = v_cache.stride(2);
  p.stride_slot = slot_mapping.stride(0);
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  p.num_tokens = static_cast<int>(num_tokens);
  p.num_kv_heads = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(k.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.element_size = static_cast<int>(k.element_size());
  p.input_type = scalar_type_of(dtype);
  p.cache_type = cache_type_of(page_dtype);
  set_scale_params(p, scales);
  p.per_token_scales = scales.per_token;

  const c10::cuda::CUDAGuard device_guard(k_cache.device());
  TORCH_CHECK(launch_write_kv(p, c10::cuda::getCurrentCUDAStream()), "kvkernels: no KV write kernel for ",
              dtype, " rows into ", page_dtype, " pages");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace kvkernels

TORCH_LIBRARY(kvkernels, m) {
  // torch requires C++-defined ops with Python fake implementations to name the module that registers them.
  m.set_python_module("kvkernels.cuda_ext");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, int min_split_tokens, int max_splits, "
      "Tensor! out, Tensor! partial_out, Tensor! partial_lse, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  // fp8 / int8 pages' per-token scales are written beside the rows (static ones only read).
  m.def(
      "write_kv_cache(Tensor k, Tensor v, Tensor! k_cache, Tensor! v_cache, Tensor slot_mapping, "
      "Tensor(a!)? k_scale=None, Tensor(b!)? v_scale=None) -> ()");
}

TORCH_LIBRARY_IMPL(kvkernels, CUDA, m) {
  m.impl("paged_decode_attention", &kvkernels::paged_decode_attention);
  m.impl("write_kv_cache", &kvkernels::write_kv_cache);
}

// `import kvkernels._C` (the ahead-of-time build) needs a module init; the ops register as the library
// loads. The JIT build loads the same library with torch.ops.load_library semantics and ignores it.
#ifdef TORCH_EXTENSION_NAME
#define KVKERNELS_CONCAT_(a, b) a##b
#define KVKERNELS_CONCAT(a, b) KVKERNELS_CONCAT_(a, b)
#define KVKERNELS_STRINGIFY_(x) #x
#define KVKERNELS_STRINGIFY(x) KVKERNELS_STRINGIFY_(x)
extern "C" PyObject* KVKERNELS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, KVKERNELS_STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
#endif
