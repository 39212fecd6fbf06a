// Launch parameters shared by the torch-facing bindings (ops.cpp) and the kernels (*.cu).
// Plain C++ and the CUDA runtime only, so the .cu files compile without torch's heavy headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvkernels {

// Head dims with a compiled kernel; anything else fails a TORCH_CHECK in ops.cpp.
constexpr int kSupportedHeadDims[] = {32, 64, 80, 96, 128, 256};
constexpr int kMinBlockSize = 8;
constexpr int kMaxBlockSize = 256;
// Query heads a decode CTA serves at once. Larger groups split into ceil(G / 8) chunks, each a CTA that
// re-reads its KV head: K/V are read once per sequence and KV head for every group size up to 8.
constexpr int kMaxGroupTile = 8;
// Upper bound on split-K partitions (kvkernels.split.MAX_SPLITS is 64); sizes the merge's shared memory.
constexpr int kMaxSplits = 128;

// How the query heads of one KV head are spread over CTAs: ceil(G / 8) chunks of heads_per_chunk
// heads, each served by a kernel compiled for group_tile = next power of two >= heads_per_chunk.
struct HeadChunking {
  int chunks;
  int heads_per_chunk;
  int group_tile;
};

inline HeadChunking chunk_heads(int group_size) {
  const int chunks = (group_size + kMaxGroupTile - 1) / kMaxGroupTile;
  const int heads_per_chunk = (group_size + chunks - 1) / chunks;
  int tile = 1;
  while (tile < heads_per_chunk) tile *= 2;
  return {chunks, heads_per_chunk, tile};
}

// q, out and (unquantized) K/V element types.
enum class ScalarType { kHalf, kBFloat16, kFloat };
// Page element types: q's own, or 1-byte pages that carry fp32 scales.
enum class CacheType { kSameAsQuery, kFp8E4M3, kInt8 };

// Largest magnitude of a quantized page element: a row's scale is absmax * (1 / kMax) (kvkernels._validate.QUANT_MAX).
constexpr float kFp8E4M3Max = 448.f;
constexpr float kInt8Max = 127.f;
// The quantizing KV write holds a row in one warp's registers (head_dim / 32 values per lane) for its absmax.
constexpr int kMaxQuantizedHeadDim = 256;

// All strides in elements. Tensors:
//   q [B, H, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D] (last dim contiguous, 16-byte aligned rows);
//   block_tables int32 [B, max_blocks_per_seq]; seq_lens int32 [B]; out [B, H, D];
//   partial_out fp32 [B, H, max_splits, D] and partial_lse fp32 [B, H, max_splits], contiguous, used only
//   when max_splits > 1;
//   k_scale, v_scale fp32, only with fp8 / int8 pages: [num_blocks, block_size, H_kv] per token and KV head, or
//   [H_kv] static per head (block and slot strides 0). A page element x stands for x * scale.
struct PagedDecodeParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  void* out;
  float* partial_out;
  float* partial_lse;
  const float* k_scale;
  const float* v_scale;

  int64_t stride_q_seq, stride_q_head;
  int64_t stride_k_block, stride_k_slot, stride_k_head;
  int64_t stride_v_block, stride_v_slot, stride_v_head;
  int64_t stride_ks_block, stride_ks_slot, stride_ks_head;
  int64_t stride_vs_block, stride_vs_slot, stride_vs_head;
  int64_t stride_table_seq, stride_table_block;
  int64_t stride_seq_lens;
  int64_t stride_out_seq, stride_out_head;

  float qk_scale;  // softmax scale * log2(e): the kernels work in base 2
  int batch, num_heads, num_kv_heads, head_dim;
  int group_size;  // num_heads / num_kv_heads
  int head_chunks, heads_per_chunk, group_tile;
  int block_size, log2_block_size;
  int max_blocks_per_seq;
  int capacity;  // max_blocks_per_seq * block_size: seq_lens are clamped to it
  int max_splits, min_split_tokens;
};

// k, v [N, H_kv, D] with any strides; caches as above (last dim contiguous); slot_mapping int64 [N].
// fp8 / int8 caches quantize each row: per-token k_scale, v_scale [num_blocks, block_size, H_kv] receive
// its scale, static [H_kv] ones (block and slot strides 0, per_token_scales false) are read.
struct WriteKVParams {
  const void* k;
  const void* v;
  void* k_cache;
  void* v_cache;
  const int64_t* slot_mapping;
  float* k_scale;
  float* v_scale;

  int64_t stride_k_token, stride_k_head, stride_k_dim;
  int64_t stride_v_token, stride_v_head, stride_v_dim;
  int64_t stride_kc_block, stride_kc_slot, stride_kc_head;
  int64_t stride_vc_block, stride_vc_slot, stride_vc_head;
  int64_t stride_ks_block, stride_ks_slot, stride_ks_head;
  int64_t stride_vs_block, stride_vs_slot, stride_vs_head;
  int64_t stride_slot;
  int64_t num_slots;  // num_blocks * block_size: slots outside [0, num_slots) are skipped
  int num_tokens, num_kv_heads, head_dim, block_size;
  int element_size;  // bytes of k, v (and of an unquantized cache): 2 or 4
  ScalarType input_type;
  CacheType cache_type;
  bool per_token_scales;
};

// One per page dtype so the instantiation sets compile in parallel. Each returns false for a head dim or
// group tile without a kernel (the bindings check those first); the quantized ones take q's dtype.
bool launch_paged_decode_fp16(const PagedDecodeParams& params, cudaStream_t stream);
bool launch_paged_decode_bf16(const PagedDecodeParams& params, cudaStream_t stream);
bool launch_paged_decode_fp32(const PagedDecodeParams& params, cudaStream_t stream);
bool launch_paged_decode_fp8(const PagedDecodeParams& params, ScalarType q_type, cudaStream_t stream);
bool launch_paged_decode_int8(const PagedDecodeParams& params, ScalarType q_type, cudaStream_t stream);
bool launch_write_kv(const WriteKVParams& params, cudaStream_t stream);

}  // namespace kvkernels
