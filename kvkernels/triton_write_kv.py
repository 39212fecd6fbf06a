"""Triton KV append: copies each new token's K and V rows into its paged slot (one launch per layer step)."""
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_slots,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_ckb, stride_ckt, stride_ckh,
    stride_cvb, stride_cvt, stride_cvh,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0 or slot >= num_slots:
        return  # -1 is a padding token (vLLM's convention); past the pool only unvalidated input gets here
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + token * stride_kn + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + token * stride_vn + heads[:, None] * stride_vh + dims[None, :] * stride_vd, mask=mask)
    tl.store(k_cache_ptr + block * stride_ckb + offset * stride_ckt + heads[:, None] * stride_ckh + dims[None, :],
             k, mask=mask)
    tl.store(v_cache_ptr + block * stride_cvb + offset * stride_cvt + heads[:, None] * stride_cvh + dims[None, :],
             v, mask=mask)


def write_kv_launch(k, v, k_cache, v_cache, slot_mapping):
    """The launch as (kernel, args, kwargs, grid): run by `write_kv_cache`, compiled for sm_90 by
    `kvkernels.static_model`. Shapes as in `write_kv_cache`."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    return _write_kv_kernel, (
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[0] * block_size,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
    ), dict(
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
    ), (k.shape[0],)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    """k, v [N, H_kv, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D]; slot_mapping int64 [N].

    Inputs already checked by kvkernels.ops. Slot -1 skips the token.
    """
    if k.shape[0] == 0:
        return
    kernel, args, kwargs, grid = write_kv_launch(k, v, k_cache, v_cache, slot_mapping)
    kernel[grid](*args, **kwargs)
