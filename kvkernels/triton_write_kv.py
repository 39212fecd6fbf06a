"""Triton KV append: copies each new token's K and V rows into its paged slot (one launch per layer step).

fp8 / int8 pages are quantized on the way in (kvkernels.reference.quantize is the same math): per-token
scales (absmax x (1 / QUANT_MAX) of each KV head's row, rounded as the reference rounds it) are written beside
the page, static per-head ones read.
"""
import torch
import triton
import triton.language as tl

from ._validate import QUANT_MAX
from .split import FP_FUSION, next_power_of_2


@triton.jit
def _round_half_even(x, QUANT_INT: tl.constexpr):
    # Round to the nearest int8 / float8_e4m3fn value (ties to even) in fp32, so the cast after it is exact:
    # adding 2^23 ulps pushes the discarded bits out in one correctly rounded add. Triton's interpreter
    # rounds fp32 -> fp8 casts wrongly at exponent boundaries (the value halves); this runs the same on both.
    a = tl.abs(x)
    bits = x.to(tl.int32, bitcast=True)
    if QUANT_INT:
        magic = tl.full(x.shape, 8388608.0, tl.float32)                       # 2^23: ulp 1
    else:
        exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)                # e4m3: 3 mantissa bits, min exp -6
        magic = ((exponent + 20 + 127) << 23).to(tl.float32, bitcast=True)     # 2^(exponent - 3 + 23)
    rounded = ((a + magic) - magic).to(tl.int32, bitcast=True) | (bits & -2147483648)  # x's sign, -0 included
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows(x, scale_ptrs, head_mask, PER_TOKEN_SCALES: tl.constexpr, QUANT_MAX: tl.constexpr,
                   QUANT_INT: tl.constexpr):
    # x [H, D] fp32 -> values on the page grid [H, D]; per-token scales are stored, static ones loaded.
    if PER_TOKEN_SCALES:
        scale = tl.max(tl.abs(x), axis=1) * (1.0 / QUANT_MAX)   # [H], an IEEE product, as the reference's
        scale = tl.where(scale > 0, scale, 1.0)
        tl.store(scale_ptrs, scale, mask=head_mask)
    else:
        scale = tl.load(scale_ptrs, mask=head_mask, other=1.0)
    scaled = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -QUANT_MAX), QUANT_MAX)
    return _round_half_even(scaled, QUANT_INT)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr, num_slots,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_ckb, stride_ckt, stride_ckh,
    stride_cvb, stride_cvt, stride_cvh,
    stride_ksb, stride_kst, stride_ksh,  # scale strides: 0, 0, s for static per-head scales
    stride_vsb, stride_vst, stride_vsh,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QUANTIZED: tl.constexpr, PER_TOKEN_SCALES: tl.constexpr, QUANT_MAX: tl.constexpr, QUANT_INT: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0 or slot >= num_slots:
        return  # -1 is a padding token (vLLM's convention); past the pool only unvalidated input gets here
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_mask = heads < NUM_KV_HEADS
    mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + token * stride_kn + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + token * stride_vn + heads[:, None] * stride_vh + dims[None, :] * stride_vd, mask=mask)
    if QUANTIZED:
        # padded dims and heads read as 0: they must not count in a row's absmax
        k = _quantize_rows(tl.where(mask, k.to(tl.float32), 0.0),
                           k_scale_ptr + block * stride_ksb + offset * stride_kst + heads * stride_ksh,
                           head_mask, PER_TOKEN_SCALES, QUANT_MAX, QUANT_INT)
        v = _quantize_rows(tl.where(mask, v.to(tl.float32), 0.0),
                           v_scale_ptr + block * stride_vsb + offset * stride_vst + heads * stride_vsh,
                           head_mask, PER_TOKEN_SCALES, QUANT_MAX, QUANT_INT)
    tl.store(k_cache_ptr + block * stride_ckb + offset * stride_ckt + heads[:, None] * stride_ckh + dims[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + block * stride_cvb + offset * stride_cvt + heads[:, None] * stride_cvh + dims[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def scale_strides(scale, cache):
    """(block, slot, head) strides of a scale tensor: [num_blocks, block_size, H_kv] per token, [H_kv] static
    (0, 0, s); (0, 0, 0) without scales."""
    if scale is None:
        return 0, 0, 0
    if scale.dim() == 1:
        return 0, 0, scale.stride(0)
    return scale.stride(0), scale.stride(1), scale.stride(2)


def quant_constexprs(cache, scale):
    """The quantization constexprs both kernels share (all False / 0 for fp16 / bf16 / fp32 pages)."""
    quant_max = QUANT_MAX.get(cache.dtype, 0.0)
    return dict(QUANTIZED=quant_max > 0, PER_TOKEN_SCALES=scale is not None and scale.dim() == 3,
                QUANT_MAX=quant_max, QUANT_INT=cache.dtype == torch.int8)


def write_kv_launch(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """The launch as (kernel, args, kwargs, grid): run by `write_kv_cache`, compiled for sm_90 by
    `kvkernels.static_model`. Shapes as in `write_kv_cache`."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    return _write_kv_kernel, (
        k, v, k_cache, v_cache, slot_mapping,
        k_cache if k_scale is None else k_scale, v_cache if v_scale is None else v_scale,  # unread without scales
        k_cache.shape[0] * block_size,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scale_strides(k_scale, k_cache), *scale_strides(v_scale, v_cache),
    ), dict(
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        **quant_constexprs(k_cache, k_scale), **FP_FUSION,
    ), (k.shape[0],)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k, v [N, H_kv, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D]; slot_mapping int64 [N];
    k_scale, v_scale fp32 [num_blocks, block_size, H_kv] (written) or [H_kv] (read) for fp8 / int8 pages.

    Inputs already checked by kvkernels.ops. Slot -1 skips the token.
    """
    if k.shape[0] == 0:
        return
    kernel, args, kwargs, grid = write_kv_launch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    kernel[grid](*args, **kwargs)
