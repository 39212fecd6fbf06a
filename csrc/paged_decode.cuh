// Paged decode attention: one query per sequence over NHD pages, split-K with a log-sum-exp merge.
//
// Grid of the main kernel: (batch, kv_head * head_chunks, split). A CTA serves up to 8 query heads of
// one KV head (grouped-query heads share one read of K/V) over one contiguous partition of the context,
// laid out exactly as the Triton backend's `_split_bounds`. Within the CTA, each token row is read by
// kLanes lanes with 16-byte loads; every such lane group runs its own online softmax over a strided
// subset of the partition's tokens, and the groups are merged through shared memory at the end. With one
// split the CTA writes the normalised output; otherwise an fp32 partial output and its base-2
// log-sum-exp, which `merge_splits_kernel` combines.
//
// fp8 (e4m3) and int8 pages are dequantized in registers: a token's K scale multiplies its score and its V
// scale its probability's weight on V, so the loop reads 1 byte per element plus 8 bytes of scales per token.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kvkernels.h"

namespace kvkernels {

constexpr int kDecodeThreads = 128;
constexpr int kMergeThreads = 128;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Conversions between storage types and fp32, and unpacking of one vector load (Vec) of page elements.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Vec = uint4;
  static constexpr int kPerVec = 4;
  static constexpr bool kQuantized = false;
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
};

template <>
struct Elem<__half> {
  using Vec = uint4;
  static constexpr int kPerVec = 8;
  static constexpr bool kQuantized = false;
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void unpack(const uint4& raw, float* out) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 pair;
      memcpy(&pair, &words[i], sizeof(pair));  // low half = lower address = element 2i
      const float2 f = __half22float2(pair);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Elem<__nv_bfloat16> {
  using Vec = uint4;
  static constexpr int kPerVec = 8;
  static constexpr bool kQuantized = false;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void unpack(const uint4& raw, float* out) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 is the top half of an fp32: widening is a shift
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

// 1-byte pages load 8 elements (8 bytes) per vector: a row's lane layout is then fp16's, with the same q and
// accumulator registers per lane, and a lane group takes twice fp16's tokens to keep as many bytes in flight.
template <>
struct Elem<__nv_fp8_e4m3> {
  using Vec = uint2;
  static constexpr int kPerVec = 8;
  static constexpr bool kQuantized = true;
  static __device__ __forceinline__ void unpack(const uint2& raw, float* out) {
    const uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // e4m3 pairs to fp16 pairs (one cvt on sm_89+): exact, the low byte first
      const auto pair = static_cast<__nv_fp8x2_storage_t>(words[i / 2] >> (16 * (i % 2)));
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Elem<int8_t> {
  using Vec = uint2;
  static constexpr int kPerVec = 8;
  static constexpr bool kQuantized = true;
  static __device__ __forceinline__ void unpack(const uint2& raw, float* out) {
    const uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // x + 128 as the low mantissa byte of 2^23 is the float 2^23 + 128 + x: one byte permute and one
      // subtraction, exact, instead of a quarter-rate integer-to-float conversion per element.
      const uint32_t biased = words[i] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b)
        out[4 * i + b] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540u | b)) - 8388736.f;
    }
  }
};

// Thread layout of one (page dtype, head dim, group tile) instantiation.
template <typename KT, int HEAD_DIM, int GROUP_TILE>
struct DecodeConfig {
  using Vec = typename Elem<KT>::Vec;
  static constexpr int kVecElems = Elem<KT>::kPerVec;
  static_assert(HEAD_DIM % kVecElems == 0, "a K/V row must be a whole number of vectors");
  static constexpr int kVecs = HEAD_DIM / kVecElems;  // vector loads per K/V row
  // Lanes reading one token row: a power of two so the dot product reduces with xor shuffles inside
  // the lane group. For 80 and 96 (10 or 12 vectors in 16 lanes, 20 or 24 in 32) the spare lanes load
  // nothing and contribute zeros.
  static constexpr int kLanes = next_pow2(kVecs) < kWarpSize ? next_pow2(kVecs) : kWarpSize;
  static constexpr int kVecsPerLane = (kVecs + kLanes - 1) / kLanes;
  static constexpr int kElemsPerLane = kVecsPerLane * kVecElems;
  static constexpr int kGroups = kDecodeThreads / kLanes;  // token rows in flight per step
  static constexpr int kWarps = kDecodeThreads / kWarpSize;
  // Tokens a lane group loads before using any: enough loads in flight to cover DRAM latency, fewer with
  // many heads, whose q and accumulators take the registers. 8-byte vectors (1-byte pages) take twice the
  // tokens for the same bytes and raw registers, up to 4 heads (8 heads stay at 2: their per-token scores and
  // probabilities are what already fills the registers there).
  static constexpr int kTokensPerGroup = (GROUP_TILE >= 4 ? 2 : 4) * (sizeof(Vec) == 8 && GROUP_TILE <= 4 ? 2 : 1);
  static constexpr int kRoundTokens = kGroups * kTokensPerGroup;  // the split layout's tile
  static_assert(kMinBlockSize % kTokensPerGroup == 0, "a lane group's tokens must never straddle a block");
};

struct SplitRange {
  int start, end;
};

// Same as triton_decode._split_bounds: short sequences use fewer splits; `tile` rounds partitions.
__device__ __forceinline__ SplitRange split_range(int seq_len, int split, int max_splits, int min_split_tokens,
                                                  int tile) {
  const int64_t len = seq_len;
  int64_t num_splits = (len + min_split_tokens - 1) / min_split_tokens;
  num_splits = num_splits < 1 ? 1 : (num_splits > max_splits ? max_splits : num_splits);
  const int64_t per_split = (len + num_splits - 1) / num_splits;
  const int64_t tokens_per_split = (per_split + tile - 1) / tile * tile;
  const int64_t start = split * tokens_per_split;
  const int64_t end = start + tokens_per_split < len ? start + tokens_per_split : len;
  return {static_cast<int>(start < len ? start : len), static_cast<int>(end)};
}

// Clamp to the table's capacity so a bad length can never read past it (as the Triton kernel).
__device__ __forceinline__ int clamped_seq_len(const PagedDecodeParams& p, int seq) {
  const int len = p.seq_lens[static_cast<int64_t>(seq) * p.stride_seq_lens];
  return len < 0 ? 0 : (len > p.capacity ? p.capacity : len);
}

template <int LANES>
__device__ __forceinline__ float lane_group_sum(float x) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// T: q and out; KT: pages (T itself, or fp8 / int8 with scales).
template <typename T, typename KT, int HEAD_DIM, int GROUP_TILE>
__global__ void __launch_bounds__(kDecodeThreads) paged_decode_kernel(const PagedDecodeParams p) {
  using C = DecodeConfig<KT, HEAD_DIM, GROUP_TILE>;
  using Vec = typename C::Vec;
  constexpr bool kQuantized = Elem<KT>::kQuantized;
  constexpr int E = C::kElemsPerLane;
  constexpr int U = C::kTokensPerGroup;

  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y / p.head_chunks;
  const int chunk = blockIdx.y - kv_head * p.head_chunks;
  const int split = blockIdx.z;

  const int seq_len = clamped_seq_len(p, seq);
  // The start is clamped to seq_len, so an unused split reads start == seq_len.
  const SplitRange range = split_range(seq_len, split, p.max_splits, p.min_split_tokens, C::kRoundTokens);
  if (split > 0 && range.start >= seq_len) return;  // this sequence needs fewer splits; the merge skips it

  const int first_head = kv_head * p.group_size + chunk * p.heads_per_chunk;
  const int active_heads = min(p.heads_per_chunk, p.group_size - chunk * p.heads_per_chunk);

  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int lane_in_group = lane % C::kLanes;
  const int group = tid / C::kLanes;

  // q: this lane's slice of each head's query, pre-scaled by scale * log2(e). Lane l holds vectors
  // l, l + kLanes, ... of the row; spare lanes and heads past the chunk hold zeros.
  float q[GROUP_TILE][E];
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    const T* q_row = static_cast<const T*>(p.q) + static_cast<int64_t>(seq) * p.stride_q_seq +
                     static_cast<int64_t>(first_head + g) * p.stride_q_head;
#pragma unroll
    for (int j = 0; j < C::kVecsPerLane; ++j) {
      const int vec = lane_in_group + j * C::kLanes;
#pragma unroll
      for (int e = 0; e < C::kVecElems; ++e) {
        float x = 0.f;
        if (g < active_heads && vec < C::kVecs) x = Elem<T>::to_float(q_row[vec * C::kVecElems + e]) * p.qk_scale;
        q[g][j * C::kVecElems + e] = x;
      }
    }
  }

  float m[GROUP_TILE];       // running max of the scores (base 2)
  float l[GROUP_TILE];       // running sum of exp2(score - m)
  float acc[GROUP_TILE][E];  // running sum of exp2(score - m) * v over this lane's slice
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.f;
  }

  const KT* k_cache = static_cast<const KT*>(p.k_cache) + static_cast<int64_t>(kv_head) * p.stride_k_head;
  const KT* v_cache = static_cast<const KT*>(p.v_cache) + static_cast<int64_t>(kv_head) * p.stride_v_head;
  const float* k_scale = p.k_scale;  // this KV head's scales (null without quantized pages: never read)
  const float* v_scale = p.v_scale;
  if constexpr (kQuantized) {
    k_scale += static_cast<int64_t>(kv_head) * p.stride_ks_head;
    v_scale += static_cast<int64_t>(kv_head) * p.stride_vs_head;
  }
  const int32_t* table = p.block_tables + static_cast<int64_t>(seq) * p.stride_table_seq;

  // The block id of a lane group's first token; it is looked up a round ahead so the table read is off
  // the K/V loads' critical path. Only tokens inside the partition are looked up: table entries past a
  // sequence's last block are never read.
  auto lookup_block = [&](int token) -> int64_t {
    return token < range.end ? __ldg(table + static_cast<int64_t>(token >> p.log2_block_size) * p.stride_table_block)
                             : 0;
  };
  int64_t next_block = lookup_block(range.start + group * U);

  // Every thread runs the same number of rounds (the bound is CTA-uniform), so the full-mask shuffles
  // below always see all 32 lanes; tokens past the partition are masked per lane group.
  for (int round = range.start; round < range.end; round += C::kRoundTokens) {
    // round is a multiple of kRoundTokens (partitions are whole tiles), so first_token is a multiple of U,
    // and U divides every block size: a lane group's U tokens always share one block.
    const int first_token = round + group * U;
    const int64_t block = next_block;
    next_block = lookup_block(first_token + C::kRoundTokens);
    bool valid[U];
    Vec k_raw[U][C::kVecsPerLane];
    Vec v_raw[U][C::kVecsPerLane];
    float k_scales[U];  // quantized pages only: each token's scales (0 when masked, free slots' may be NaN)
    float v_scales[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      valid[u] = first_token + u < range.end;
      k_scales[u] = 0.f;
      v_scales[u] = 0.f;
#pragma unroll
      for (int j = 0; j < C::kVecsPerLane; ++j) {
        k_raw[u][j] = Vec{};
        v_raw[u][j] = Vec{};
      }
    }
    // Masked loads, not masked scores: free slots may hold NaN and 0 * NaN = NaN.
    if (valid[0]) {
      const int64_t first_slot = first_token & (p.block_size - 1);
      const KT* k_rows = k_cache + block * p.stride_k_block + first_slot * p.stride_k_slot;
      const KT* v_rows = v_cache + block * p.stride_v_block + first_slot * p.stride_v_slot;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (valid[u]) {
#pragma unroll
          for (int j = 0; j < C::kVecsPerLane; ++j) {
            const int vec = lane_in_group + j * C::kLanes;
            if (vec < C::kVecs) {
              k_raw[u][j] = __ldg(reinterpret_cast<const Vec*>(k_rows + u * p.stride_k_slot + vec * C::kVecElems));
              v_raw[u][j] = __ldg(reinterpret_cast<const Vec*>(v_rows + u * p.stride_v_slot + vec * C::kVecElems));
            }
          }
          if constexpr (kQuantized) {
            const int64_t k_at = block * p.stride_ks_block + (first_slot + u) * p.stride_ks_slot;
            const int64_t v_at = block * p.stride_vs_block + (first_slot + u) * p.stride_vs_slot;
            k_scales[u] = __ldg(k_scale + k_at);
            v_scales[u] = __ldg(v_scale + v_at);
          }
        }
      }
    }

    float scores[U][GROUP_TILE];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float k[E];
#pragma unroll
      for (int j = 0; j < C::kVecsPerLane; ++j) Elem<KT>::unpack(k_raw[u][j], k + j * C::kVecElems);
#pragma unroll
      for (int g = 0; g < GROUP_TILE; ++g) {
        scores[u][g] = -INFINITY;
        if (g < active_heads) {  // CTA-uniform, so the shuffles inside stay converged
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < E; ++e) dot = fmaf(q[g][e], k[e], dot);
          dot = lane_group_sum<C::kLanes>(dot);
          if constexpr (kQuantized) dot *= k_scales[u];
          if (valid[u]) scores[u][g] = dot;
        }
      }
    }

    float probs[U][GROUP_TILE];
#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
      float round_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < U; ++u) round_max = fmaxf(round_max, scores[u][g]);
      const float m_new = fmaxf(m[g], round_max);
      // Nothing seen yet (a lane group whose tokens are all masked): keep exp2 away from -inf - -inf.
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[g] - m_ref);
      float round_sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        probs[u][g] = exp2f(scores[u][g] - m_ref);
        round_sum += probs[u][g];
      }
      l[g] = l[g] * alpha + round_sum;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] *= alpha;
    }

#pragma unroll
    for (int u = 0; u < U; ++u) {
      float v[E];
#pragma unroll
      for (int j = 0; j < C::kVecsPerLane; ++j) Elem<KT>::unpack(v_raw[u][j], v + j * C::kVecElems);
#pragma unroll
      for (int g = 0; g < GROUP_TILE; ++g) {
        if (g < active_heads) {
          // l sums the probabilities themselves; V's scale weighs the token's row
          const float weight = kQuantized ? probs[u][g] * v_scales[u] : probs[u][g];
#pragma unroll
          for (int e = 0; e < E; ++e) acc[g][e] = fmaf(weight, v[e], acc[g][e]);
        }
      }
    }
  }

  // Merge the lane groups' softmax states: first across the groups of a warp (shuffles), then across
  // warps (shared memory). All states are rescaled to the CTA-wide max before summing.
  __shared__ float sm_max[C::kWarps][GROUP_TILE];
  __shared__ float sm_sum[C::kWarps][GROUP_TILE];
  __shared__ float sm_acc[C::kWarps][GROUP_TILE][HEAD_DIM];
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    float warp_max = m[g];
#pragma unroll
    for (int offset = C::kLanes; offset < kWarpSize; offset *= 2)
      warp_max = fmaxf(warp_max, __shfl_xor_sync(kFullMask, warp_max, offset));
    if (lane == 0) sm_max[warp][g] = warp_max;
  }
  __syncthreads();

#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    float cta_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) cta_max = fmaxf(cta_max, sm_max[w][g]);
    const float rescale = exp2f(m[g] - (cta_max == -INFINITY ? 0.f : cta_max));
    float sum = l[g] * rescale;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] *= rescale;
#pragma unroll
    for (int offset = C::kLanes; offset < kWarpSize; offset *= 2) {
      sum += __shfl_xor_sync(kFullMask, sum, offset);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[g][e] += __shfl_xor_sync(kFullMask, acc[g][e], offset);
    }
    if (lane < C::kLanes) {  // the warp's first lane group now holds the warp's sums
#pragma unroll
      for (int j = 0; j < C::kVecsPerLane; ++j) {
        const int vec = lane + j * C::kLanes;
        if (vec < C::kVecs) {
#pragma unroll
          for (int e = 0; e < C::kVecElems; ++e)
            sm_acc[warp][g][vec * C::kVecElems + e] = acc[g][j * C::kVecElems + e];
        }
      }
    }
    if (lane == 0) sm_sum[warp][g] = sum;
  }
  __syncthreads();

  // Every element of every active head is written: idx covers [0, active_heads * HEAD_DIM).
  for (int idx = tid; idx < active_heads * HEAD_DIM; idx += kDecodeThreads) {
    const int g = idx / HEAD_DIM;
    const int d = idx - g * HEAD_DIM;
    float cta_max = -INFINITY, total = 0.f, denom = 0.f;
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) {
      cta_max = fmaxf(cta_max, sm_max[w][g]);
      total += sm_acc[w][g][d];
      denom += sm_sum[w][g];
    }
    const float value = total / denom;  // seq_len 0 gives 0 / 0 = NaN: loud, never a plausible answer
    const int head = first_head + g;
    if (p.max_splits == 1) {
      T* out = static_cast<T*>(p.out) + static_cast<int64_t>(seq) * p.stride_out_seq +
               static_cast<int64_t>(head) * p.stride_out_head;
      out[d] = Elem<T>::from_float(value);
    } else {
      const int64_t row = (static_cast<int64_t>(seq) * p.num_heads + head) * p.max_splits + split;
      p.partial_out[row * HEAD_DIM + d] = value;
      if (d == 0) p.partial_lse[row] = (cta_max == -INFINITY ? 0.f : cta_max) + log2f(denom);
    }
  }
}

// out[seq, head] = sum_s exp2(lse_s - max) * partial_s / sum_s exp2(lse_s - max) over the splits the
// main kernel wrote; `tile` must be the main kernel's kRoundTokens so both derive the same layout.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_splits_kernel(const PagedDecodeParams p, int tile) {
  const int seq = blockIdx.x;
  const int head = blockIdx.y;
  const int seq_len = clamped_seq_len(p, seq);
  const int64_t first_row = (static_cast<int64_t>(seq) * p.num_heads + head) * p.max_splits;

  // -inf marks a split the main kernel skipped: its partial slots hold stale memory and are never read.
  __shared__ float sm_lse[kMaxSplits];
  for (int s = threadIdx.x; s < p.max_splits; s += kMergeThreads) {
    const SplitRange range = split_range(seq_len, s, p.max_splits, p.min_split_tokens, tile);
    sm_lse[s] = range.start < seq_len ? p.partial_lse[first_row + s] : -INFINITY;
  }
  __syncthreads();

  float max_lse = -INFINITY;
  for (int s = 0; s < p.max_splits; ++s) max_lse = fmaxf(max_lse, sm_lse[s]);
  const float ref = max_lse == -INFINITY ? 0.f : max_lse;

  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(seq) * p.stride_out_seq +
           static_cast<int64_t>(head) * p.stride_out_head;
  for (int d = threadIdx.x; d < p.head_dim; d += kMergeThreads) {
    float total = 0.f, denom = 0.f;
    for (int s = 0; s < p.max_splits; ++s) {
      const float lse = sm_lse[s];
      if (lse == -INFINITY) continue;
      const float weight = exp2f(lse - ref);
      total = fmaf(weight, p.partial_out[(first_row + s) * p.head_dim + d], total);
      denom += weight;
    }
    out[d] = Elem<T>::from_float(total / denom);  // no split written (seq_len 0): NaN, as without splits
  }
}

template <typename T, typename KT, int HEAD_DIM, int GROUP_TILE>
void launch_decode(const PagedDecodeParams& p, cudaStream_t stream) {
  using C = DecodeConfig<KT, HEAD_DIM, GROUP_TILE>;
  const dim3 grid(p.batch, p.num_kv_heads * p.head_chunks, p.max_splits);
  paged_decode_kernel<T, KT, HEAD_DIM, GROUP_TILE><<<grid, kDecodeThreads, 0, stream>>>(p);
  if (p.max_splits > 1) {
    merge_splits_kernel<T><<<dim3(p.batch, p.num_heads), kMergeThreads, 0, stream>>>(p, C::kRoundTokens);
  }
}

template <typename T, typename KT, int HEAD_DIM>
bool launch_decode_group_tile(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (p.group_tile) {
    case 1: launch_decode<T, KT, HEAD_DIM, 1>(p, stream); return true;
    case 2: launch_decode<T, KT, HEAD_DIM, 2>(p, stream); return true;
    case 4: launch_decode<T, KT, HEAD_DIM, 4>(p, stream); return true;
    case 8: launch_decode<T, KT, HEAD_DIM, 8>(p, stream); return true;
    default: return false;
  }
}

// T: q and out; KT: pages, T by default.
template <typename T, typename KT = T>
bool launch_paged_decode_typed(const PagedDecodeParams& p, cudaStream_t stream) {
  static_assert(kMaxGroupTile == 8, "launch_decode_group_tile instantiates tiles 1, 2, 4, 8");
  switch (p.head_dim) {
    case 32: return launch_decode_group_tile<T, KT, 32>(p, stream);
    case 64: return launch_decode_group_tile<T, KT, 64>(p, stream);
    case 80: return launch_decode_group_tile<T, KT, 80>(p, stream);
    case 96: return launch_decode_group_tile<T, KT, 96>(p, stream);
    case 128: return launch_decode_group_tile<T, KT, 128>(p, stream);
    case 256: return launch_decode_group_tile<T, KT, 256>(p, stream);
    default: return false;
  }
}

// q's dtype picks T for 1-byte pages KT.
template <typename KT>
bool launch_paged_decode_quantized(const PagedDecodeParams& p, ScalarType q_type, cudaStream_t stream) {
  switch (q_type) {
    case ScalarType::kHalf: return launch_paged_decode_typed<__half, KT>(p, stream);
    case ScalarType::kBFloat16: return launch_paged_decode_typed<__nv_bfloat16, KT>(p, stream);
    case ScalarType::kFloat: return launch_paged_decode_typed<float, KT>(p, stream);
    default: return false;
  }
}

}  // namespace kvkernels
