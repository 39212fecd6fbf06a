// KV append: copies each new token's K and V rows into its paged slot (one launch per layer step).
// Unquantized pages take a pure copy, templated on the element's width, not its type; fp8 / int8 pages
// quantize each row as kvkernels.reference.quantize does, bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kvkernels.h"

namespace kvkernels {

constexpr int kWriteThreads = 128;
constexpr int kWriteWarps = kWriteThreads / 32;
constexpr unsigned kWriteFullMask = 0xffffffffu;

// A token's paged slot as (block, offset). False for slot -1 (padding, vLLM's convention) and slots outside the
// cache, which are skipped: even unvalidated input cannot write out of bounds.
__device__ __forceinline__ bool token_slot(const WriteKVParams& p, int64_t token, int64_t& block, int64_t& offset) {
  const int64_t slot = p.slot_mapping[token * p.stride_slot];
  if (slot < 0 || slot >= p.num_slots) return false;
  block = slot / p.block_size;
  offset = slot - block * p.block_size;
  return true;
}

// One CTA per token; its threads walk the token's H_kv * D elements.
template <typename Word>
__global__ void __launch_bounds__(kWriteThreads) write_kv_kernel(const WriteKVParams p) {
  const int64_t token = blockIdx.x;
  int64_t block, offset;
  if (!token_slot(p, token, block, offset)) return;

  const Word* k = static_cast<const Word*>(p.k) + token * p.stride_k_token;
  const Word* v = static_cast<const Word*>(p.v) + token * p.stride_v_token;
  Word* k_cache = static_cast<Word*>(p.k_cache) + block * p.stride_kc_block + offset * p.stride_kc_slot;
  Word* v_cache = static_cast<Word*>(p.v_cache) + block * p.stride_vc_block + offset * p.stride_vc_slot;
  const int row_elems = p.num_kv_heads * p.head_dim;
  for (int i = threadIdx.x; i < row_elems; i += kWriteThreads) {
    const int64_t head = i / p.head_dim;
    const int64_t dim = i - head * p.head_dim;
    k_cache[head * p.stride_kc_head + dim] = k[head * p.stride_k_head + dim * p.stride_k_dim];
    v_cache[head * p.stride_vc_head + dim] = v[head * p.stride_v_head + dim * p.stride_v_dim];
  }
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename KT>
struct Quantized;

template <>
struct Quantized<__nv_fp8_e4m3> {
  static constexpr float kMax = kFp8E4M3Max;
  // round to nearest even (cvt.rn.satfinite), as torch's cast
  static __device__ __forceinline__ __nv_fp8_e4m3 from_float(float x) { return __nv_fp8_e4m3(x); }
};

template <>
struct Quantized<int8_t> {
  static constexpr float kMax = kInt8Max;
  // round to nearest even, as torch.round
  static __device__ __forceinline__ int8_t from_float(float x) { return static_cast<int8_t>(__float2int_rn(x)); }
};

// One KV head's row: src [head_dim] (element stride src_stride) -> dst [head_dim] on the page grid, with its
// scale stored (per token: absmax * (1 / kMax), 1 for an all-zero row) or read (static). Called by a whole warp.
template <typename T, typename KT>
__device__ __forceinline__ void quantize_row(const T* src, int64_t src_stride, KT* dst, float* scale,
                                             bool per_token_scales, int head_dim, int lane) {
  constexpr int kPerLane = kMaxQuantizedHeadDim / 32;
  constexpr float kMax = Quantized<KT>::kMax;
  // The reference's fp32 product with the constant 1 / kMax (rounded once, at compile time: --use_fast_math
  // would make a run-time 1 / kMax approximate).
  constexpr float kInverseMax = static_cast<float>(1.0 / static_cast<double>(kMax));
  float absmax = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int dim = lane + 32 * i;
    if (dim < head_dim) absmax = fmaxf(absmax, fabsf(to_float(src[dim * src_stride])));
  }
  float row_scale;
  if (per_token_scales) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      absmax = fmaxf(absmax, __shfl_xor_sync(kWriteFullMask, absmax, offset));
    row_scale = absmax * kInverseMax;
    row_scale = row_scale > 0.f ? row_scale : 1.f;
    if (lane == 0) *scale = row_scale;
  } else {
    row_scale = *scale;
  }
  // The row is read again (from L1) rather than kept: __fdiv_rn's rare-operand path is a call, and values live
  // across it would spill.
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int dim = lane + 32 * i;
    // IEEE division, as the reference's (fast math would turn `/` into an approximate reciprocal)
    if (dim < head_dim) {
      const float x = to_float(src[dim * src_stride]);
      dst[dim] = Quantized<KT>::from_float(fminf(fmaxf(__fdiv_rn(x, row_scale), -kMax), kMax));
    }
  }
}

// One CTA per token, one warp per KV head (heads strided over the CTA's warps).
template <typename T, typename KT>
__global__ void __launch_bounds__(kWriteThreads) write_kv_quantized_kernel(const WriteKVParams p) {
  const int64_t token = blockIdx.x;
  int64_t block, offset;
  if (!token_slot(p, token, block, offset)) return;
  const int lane = threadIdx.x % 32;

  const T* k = static_cast<const T*>(p.k) + token * p.stride_k_token;
  const T* v = static_cast<const T*>(p.v) + token * p.stride_v_token;
  KT* k_cache = static_cast<KT*>(p.k_cache) + block * p.stride_kc_block + offset * p.stride_kc_slot;
  KT* v_cache = static_cast<KT*>(p.v_cache) + block * p.stride_vc_block + offset * p.stride_vc_slot;
  // Static scales have block and slot strides 0: every token reads its head's one scale.
  float* k_scale = p.k_scale + block * p.stride_ks_block + offset * p.stride_ks_slot;
  float* v_scale = p.v_scale + block * p.stride_vs_block + offset * p.stride_vs_slot;
  for (int head = threadIdx.x / 32; head < p.num_kv_heads; head += kWriteWarps) {  // warp-uniform
    quantize_row(k + head * p.stride_k_head, p.stride_k_dim, k_cache + head * p.stride_kc_head,
                 k_scale + head * p.stride_ks_head, p.per_token_scales, p.head_dim, lane);
    quantize_row(v + head * p.stride_v_head, p.stride_v_dim, v_cache + head * p.stride_vc_head,
                 v_scale + head * p.stride_vs_head, p.per_token_scales, p.head_dim, lane);
  }
}

template <typename KT>
bool launch_write_kv_quantized(const WriteKVParams& p, cudaStream_t stream) {
  if (p.head_dim > kMaxQuantizedHeadDim) return false;
  switch (p.input_type) {
    case ScalarType::kHalf:
      write_kv_quantized_kernel<__half, KT><<<p.num_tokens, kWriteThreads, 0, stream>>>(p);
      return true;
    case ScalarType::kBFloat16:
      write_kv_quantized_kernel<__nv_bfloat16, KT><<<p.num_tokens, kWriteThreads, 0, stream>>>(p);
      return true;
    case ScalarType::kFloat:
      write_kv_quantized_kernel<float, KT><<<p.num_tokens, kWriteThreads, 0, stream>>>(p);
      return true;
    default: return false;
  }
}

bool launch_write_kv(const WriteKVParams& p, cudaStream_t stream) {
  switch (p.cache_type) {
    case CacheType::kFp8E4M3: return launch_write_kv_quantized<__nv_fp8_e4m3>(p, stream);
    case CacheType::kInt8: return launch_write_kv_quantized<int8_t>(p, stream);
    default: break;
  }
  switch (p.element_size) {
    case 2: write_kv_kernel<uint16_t><<<p.num_tokens, kWriteThreads, 0, stream>>>(p); return true;
    case 4: write_kv_kernel<uint32_t><<<p.num_tokens, kWriteThreads, 0, stream>>>(p); return true;
    default: return false;
  }
}

}  // namespace kvkernels
