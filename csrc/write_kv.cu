// KV append: copies each new token's K and V rows into its paged slot (one launch per layer step).
// A pure copy, so it is templated on the element's width, not its type.
#include <cuda_runtime.h>

#include <cstdint>

#include "kvkernels.h"

namespace kvkernels {

constexpr int kWriteThreads = 128;

// One CTA per token; its threads walk the token's H_kv * D elements. Slot -1 (padding, vLLM's
// convention) and slots outside the cache are skipped, so even unvalidated input cannot write out of bounds.
template <typename Word>
__global__ void __launch_bounds__(kWriteThreads) write_kv_kernel(const WriteKVParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_mapping[token * p.stride_slot];
  if (slot < 0 || slot >= p.num_slots) return;
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot - block * p.block_size;

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

bool launch_write_kv(const WriteKVParams& p, cudaStream_t stream) {
  switch (p.element_size) {
    case 2: write_kv_kernel<uint16_t><<<p.num_tokens, kWriteThreads, 0, stream>>>(p); return true;
    case 4: write_kv_kernel<uint32_t><<<p.num_tokens, kWriteThreads, 0, stream>>>(p); return true;
    default: return false;
  }
}

}  // namespace kvkernels
