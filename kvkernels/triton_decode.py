"""Triton paged decode attention: one query per sequence over NHD pages, split-K with a log-sum-exp merge.

Grid of the main kernel: (batch, kv_head, split). A program serves every query head of its KV head
(grouped-query heads share one read of K/V) over one contiguous partition of the context. With one
split it writes the normalised output directly; otherwise it writes an fp32 partial output and its
base-2 log-sum-exp, and `_merge_splits_kernel` combines them. Given zeroed split counters, the last program of
each (sequence, KV head) to finish does that merge itself, which saves the second launch.

Decode streams K/V, so the loop is built for bytes in flight and few instructions per byte: each tile's
block-table entries are loaded a tile ahead, K and V are issued together, one head per KV head reduces
[N, D] x [D] in registers as independent row slots (no cross-warp reduction per tile) and grouped heads use
two tensor-core dots. `kvkernels/static_model.py` checks the sm_90 cubins.

fp8 / int8 pages (QUANTIZED) are dequantized in registers: a tile's per-token scales are loaded with its
K and V and folded into the scores and into the probabilities (one head: p x scale in fp32; grouped heads:
p x scale x QUANT_MAX before p is rounded for its dot; static per-head scales into the softmax scale and the
output), so the loop reads 1 byte per element plus 8 bytes per token.
"""
import dataclasses
import functools
import warnings

import torch
import triton
import triton.language as tl

from ._validate import check_decode_inputs, is_quantized
from .triton_write_kv import quant_constexprs, scale_strides
from .split import FP_FUSION, MIN_SPLIT_TOKENS, choose_num_splits, ctas_per_sm, next_power_of_2, num_sms

LOG2_E = 1.4426950408889634
# CTAs per SM of the split decode kernel on sm_90 by (grouped heads, fp8 / int8 pages): the static model
# (kvkernels/static_model.py, 2026-11-25, triton 3.9 and 3.6, the GPU machine's): one head 8 and 9, grouped heads
# 6 and 5; quantized pages 4 and 4, grouped 4 and 3-4. Lower bounds: the one-head and grouped fp16 entries keep the
# 6 and 5 the CPU's split counts were tested with; tests/test_triton_compile.py fails when the compiled kernel fits
# fewer. Used where no compiled kernel can be asked (the CPU interpreter).
STATIC_CTAS_PER_SM = {(False, False): 6, (True, False): 5, (False, True): 4, (True, True): 3}


@triton.jit
def _split_bounds(first, seq_len, split, max_splits, MIN_SPLIT_TOKENS: tl.constexpr, TILE_N: tl.constexpr):
    # Per-sequence layout of tokens [first, seq_len), recomputed identically by the merge: short sequences
    # (and short windows) use fewer splits. Returns the split's [start, end) and how many splits this
    # sequence uses (split 0 always runs, also with no tokens).
    num_tokens = seq_len - first
    num_splits = tl.minimum(tl.maximum(tl.cdiv(num_tokens, MIN_SPLIT_TOKENS), 1), max_splits)
    tokens_per_split = tl.cdiv(tl.cdiv(num_tokens, num_splits), TILE_N) * TILE_N
    start = first + split * tokens_per_split
    used = tl.maximum(tl.cdiv(num_tokens, tl.maximum(tokens_per_split, 1)), 1)
    return start, tl.minimum(start + tokens_per_split, seq_len), used


@triton.jit
def _first_token(seq_starts_ptr, seq, seq_len, HAS_STARTS: tl.constexpr):
    # A sliding window's first visible token, clamped into [0, seq_len]: the tokens before it are never read.
    if HAS_STARTS:
        return tl.minimum(tl.maximum(tl.load(seq_starts_ptr + seq), 0), seq_len)
    return 0


@triton.jit
def _clamped_seq_len(seq_lens_ptr, seq, max_blocks_per_seq, BLOCK_SIZE: tl.constexpr):
    # Into [0, table capacity], so a bad length can never read past the table; 0 yields NaN (0 / 0).
    return tl.minimum(tl.maximum(tl.load(seq_lens_ptr + seq), 0), max_blocks_per_seq * BLOCK_SIZE)


@triton.jit
def _table_entries(table, tokens, end, BLOCK_SIZE: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    # Block ids of `tokens` (masked past the partition, so a prefetch past the end reads nothing), never below 0.
    # The clamp is also the loaded entries' single use: Triton's pipeliner prefetches a load a tile ahead only
    # then (fp8 / int8 pages' K, V and scale loads all use the entries; tests/test_triton_compile.py).
    block_ids = tl.maximum(tl.load(table + tokens // BLOCK_SIZE, mask=tokens < end, other=0), 0)
    return block_ids.to(tl.int64) if INT64_OFFSETS else block_ids


@triton.jit
def _slot_in_block(tokens, BLOCK_SIZE: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    # Tokens are never negative: as unsigned, % by a power-of-two block size is a mask, where the signed one (which
    # rounds toward zero) costs several instructions per row: 3-9% of the loops' instructions on sm_90.
    slot = (tokens.to(tl.uint32) % BLOCK_SIZE).to(tl.int32)
    return slot.to(tl.int64) if INT64_OFFSETS else slot


@triton.jit
def _load_tile(k_base, v_base, block_ids, tokens, end, dims, dim_mask,
               stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    # K and V rows of one tile ([*tokens.shape, D]), both issued before either is used. Masked loads, not
    # masked scores: free slots may hold NaN and 0 * NaN = NaN.
    slot_in_block = _slot_in_block(tokens, BLOCK_SIZE, INT64_OFFSETS)
    kv_mask = tl.expand_dims(tokens < end, -1) & dim_mask
    k = tl.load(k_base + tl.expand_dims(block_ids * stride_kb + slot_in_block * stride_kt, -1) + dims,
                mask=kv_mask, other=0.0)
    v = tl.load(v_base + tl.expand_dims(block_ids * stride_vb + slot_in_block * stride_vt, -1) + dims,
                mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _load_tile_scales(k_scale_base, v_scale_base, block_ids, tokens, end,
                      stride_ksb, stride_kst, stride_vsb, stride_vst, BLOCK_SIZE: tl.constexpr,
                      INT64_OFFSETS: tl.constexpr):
    # Per-token K and V scales (tokens' shape) of one tile (0 past the partition: free slots' scales may be NaN).
    slot_in_block = _slot_in_block(tokens, BLOCK_SIZE, INT64_OFFSETS)
    ks = tl.load(k_scale_base + block_ids * stride_ksb + slot_in_block * stride_kst, mask=tokens < end, other=0.0)
    vs = tl.load(v_scale_base + block_ids * stride_vsb + slot_in_block * stride_vst, mask=tokens < end, other=0.0)
    return ks, vs


@triton.jit
def _dequantized(x, one, DOT_IN_FP32: tl.constexpr, QUANT_INT: tl.constexpr):
    # fp8 / int8 page values, exact in fp16 and fp32, as the dot's dtype (fp32 if DOT_IN_FP32, else fp16), times
    # `one`. A runtime 1.0 there keeps the conversion before the shared-memory round trip that lays V out for
    # P.V: Triton's layout passes move a dot operand's elementwise producers past that round trip unless one
    # leaf is a runtime value, and 8-bit values, which ldmatrix cannot transpose, are then gathered one byte per
    # load. int8 to fp16 by bits: 0x6480 ^ the byte is the fp16 1152 + x (offset binary under exponent 2**10),
    # so it costs an integer op per value and a subtraction per pair, where Triton's cast converts twice.
    dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else tl.float16
    if QUANT_INT and not DOT_IN_FP32:
        values = (x.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x6480).to(tl.float16, bitcast=True) - 1152.0 * one
    else:
        values = x.to(dtype) * one
    return values


@triton.jit
def _int8_lanes(words):
    # [N, W] int32 words of int8 pages -> their bytes 0, 1, 2, 3 as four [N, W] fp16 tensors, exactly: byte ^ 0x80
    # under the fp16 exponent 2**10 (0x64) is 1152 + x, and (word >> 8j) & 0x00FF00FF holds bytes j and j + 2 in
    # its two 16-bit halves, so two values cost a mask-and-xor and one fp16x2 subtraction.
    words = words.to(tl.uint32, bitcast=True)
    even = (words & 0x00FF00FF) ^ 0x64806480                                 # bytes 0 and 2
    odd = ((words >> 8) & 0x00FF00FF) ^ 0x64806480                           # bytes 1 and 3
    return (_fp16_bits(even) - 1152.0, _fp16_bits(odd) - 1152.0, _fp16_bits(even >> 16) - 1152.0,
            _fp16_bits(odd >> 16) - 1152.0)


@triton.jit
def _fp16_bits(x):
    return x.to(tl.uint16).to(tl.float16, bitcast=True)                    # the low 16 bits, read as fp16


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, seq_starts_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr, split_counters_ptr,
    k_scale_ptr, v_scale_ptr,  # fp32 scales of fp8 / int8 pages; unread otherwise
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    one,  # 1.0, a runtime value (_dequantized)
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ksb, stride_kst, stride_ksh,  # 0, 0, s for static per-head scales
    stride_vsb, stride_vst, stride_vsh,
    stride_tb,
    stride_ob, stride_oh,
    max_blocks_per_seq,
    max_splits,  # runtime, so a growing context does not compile a kernel per split count
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, ROWS: tl.constexpr,
    SPLIT: tl.constexpr, MIN_SPLIT_TOKENS: tl.constexpr, NUM_STAGES: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    FOLD_MERGE: tl.constexpr, SPLITS_PAD: tl.constexpr,
    QUANTIZED: tl.constexpr, PER_TOKEN_SCALES: tl.constexpr, QUANT_MAX: tl.constexpr, QUANT_INT: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,  # a page or scale offset can pass 2**31 elements: 64-bit address math
    INT8_LANES: tl.constexpr,  # grouped int8 pages, fp16 q, D > 32: pages read as int32 words, a dot per byte lane
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = _clamped_seq_len(seq_lens_ptr, seq, max_blocks_per_seq, BLOCK_SIZE)
    first = _first_token(seq_starts_ptr, seq, seq_len, HAS_STARTS)
    start, end, used = _split_bounds(first, seq_len, split, max_splits, MIN_SPLIT_TOKENS, TILE_N)
    if split >= used:
        return  # this sequence needs fewer splits; the merge ignores this slot

    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + group                                            # [G]
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_mask = group < GROUP
    dim_mask = dims < HEAD_DIM
    q_mask = head_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_tb
    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_vh
    offsets = tl.arange(0, TILE_N)
    block_ids = _table_entries(table, start + offsets, end, BLOCK_SIZE, INT64_OFFSETS)  # [N] first tile's entries
    k_scale_base = k_scale_ptr + kv_head.to(tl.int64) * stride_ksh
    v_scale_base = v_scale_ptr + kv_head.to(tl.int64) * stride_vsh
    if QUANTIZED and not PER_TOKEN_SCALES:
        qk_scale = qk_scale * tl.load(k_scale_base)                            # static: K's scale into q's

    if GROUP == 1:
        # One head as ROWS independent row slots: the [TILE_N, D] tile viewed as [TILE_N // ROWS, ROWS, D] puts
        # each thread's repeats of the load layout on the first axis, and every slot keeps its own running max,
        # sum and accumulator, merged once after the loop. The loop then reduces only q . k's D across a row's
        # few lanes: no per-tile cross-warp max, sum or accumulator reduction, so no barrier.
        REPEATS: tl.constexpr = TILE_N // ROWS
        q1 = tl.sum(q.to(tl.float32), axis=0) * qk_scale                       # [D]
        slots = tl.reshape(offsets, [REPEATS, ROWS])                           # [R, S] the tile's token offsets
        m = tl.full([ROWS], float("-inf"), tl.float32)                         # running max per slot (base 2)
        l = tl.zeros([ROWS], tl.float32)                                       # running sum of exp2 per slot
        acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)                       # [S, D]
        for tile_start in tl.range(start, end, TILE_N, num_stages=NUM_STAGES):
            tokens = tile_start + offsets                                      # [N]
            next_ids = _table_entries(table, tokens + TILE_N, end, BLOCK_SIZE, INT64_OFFSETS)  # a round ahead
            k, v = _load_tile(k_base, v_base, block_ids, tokens, end, dims, dim_mask,
                              stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE, INT64_OFFSETS)  # [N, D]
            k = tl.reshape(k, [REPEATS, ROWS, HEAD_DIM_PAD])
            scores = tl.sum(k.to(tl.float32) * q1, axis=2)                     # [R, S]
            if PER_TOKEN_SCALES:
                ks, vs = _load_tile_scales(k_scale_base, v_scale_base, tl.reshape(block_ids, [REPEATS, ROWS]),
                                           tile_start + slots, end, stride_ksb, stride_kst, stride_vsb, stride_vst,
                                           BLOCK_SIZE, INT64_OFFSETS)          # [R, S]
                scores = scores * ks
            scores = tl.where(tile_start + slots < end, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))                      # [S]
            # a slot with no token yet keeps max -inf: exp2 from 0 instead, not from -inf - -inf = NaN
            m_from = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_from[None, :])                              # [R, S]
            alpha = tl.exp2(m - m_from)
            l = l * alpha + tl.sum(p, axis=0)
            if PER_TOKEN_SCALES:
                p = p * vs                                                     # V's scales into the weights
            v = tl.reshape(v, [REPEATS, ROWS, HEAD_DIM_PAD])
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), axis=0)
            m = m_new
            block_ids = next_ids
        m_all = tl.max(m, axis=0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # seq_len 0: l = 0 below, out 0 / 0 = NaN (loud)
        weights = tl.exp2(m - m_all)                                           # [S]
        l_all = tl.sum(l * weights, axis=0)
        out = (tl.sum(acc * weights[:, None], axis=0) / l_all)[None, :]        # [1, D]
        lse = tl.zeros([1], tl.float32) + m_all + tl.log2(l_all)               # [1]
    else:
        # Grouped heads: two tensor-core dots per tile, K/V read once for the whole group (G padded to 16).
        # bf16 goes through tf32 (exact for bf16 values; p keeps 10 mantissa bits, not 7): Triton's
        # interpreter has no bf16 dot, so the tested path is the one that runs.
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        if INT8_LANES:
            # Byte lane j of every word is dimension 4 w + j: four dots of K = D / 4 each, no 8-bit operand (so
            # Triton's 2-wide fp16 operand layout: q by ldmatrix, no re-pairing moves).
            WORDS: tl.constexpr = HEAD_DIM_PAD // 4
            words = tl.arange(0, WORDS)
            word_mask = words < HEAD_DIM // 4
            q_words = q_ptr + seq * stride_qb + heads[:, None] * stride_qh + 4 * words[None, :]
            lane_mask = head_mask[:, None] & word_mask[None, :]
            q0 = tl.load(q_words, mask=lane_mask, other=0.0)                  # [G, W], dimensions 4 w + 0
            q1 = tl.load(q_words + 1, mask=lane_mask, other=0.0)
            q2 = tl.load(q_words + 2, mask=lane_mask, other=0.0)
            q3 = tl.load(q_words + 3, mask=lane_mask, other=0.0)
            acc0 = tl.zeros([GROUP_PAD, WORDS], tl.float32)
            acc1 = tl.zeros([GROUP_PAD, WORDS], tl.float32)
            acc2 = tl.zeros([GROUP_PAD, WORDS], tl.float32)
            acc3 = tl.zeros([GROUP_PAD, WORDS], tl.float32)
        else:
            acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)              # [G, D]
        for tile_start in tl.range(start, end, TILE_N, num_stages=NUM_STAGES):
            tokens = tile_start + offsets
            next_ids = _table_entries(table, tokens + TILE_N, end, BLOCK_SIZE, INT64_OFFSETS)
            if INT8_LANES:
                k, v = _load_tile(k_base, v_base, block_ids, tokens, end, words, word_mask,
                                  stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE, INT64_OFFSETS)  # [N, W]
            else:
                k, v = _load_tile(k_base, v_base, block_ids, tokens, end, dims, dim_mask,
                                  stride_kb, stride_kt, stride_vb, stride_vt, BLOCK_SIZE, INT64_OFFSETS)  # [N, D]
            if PER_TOKEN_SCALES:
                ks, vs = _load_tile_scales(k_scale_base, v_scale_base, block_ids, tokens, end,
                                           stride_ksb, stride_kst, stride_vsb, stride_vst, BLOCK_SIZE, INT64_OFFSETS)
            if INT8_LANES:
                k0, k1, k2, k3 = _int8_lanes(k)
                scores = tl.dot(q0, tl.trans(k0))
                scores = tl.dot(q1, tl.trans(k1), scores)
                scores = tl.dot(q2, tl.trans(k2), scores)
                scores = tl.dot(q3, tl.trans(k3), scores) * qk_scale
            else:
                if QUANTIZED:
                    k = _dequantized(k, 1.0, DOT_IN_FP32, QUANT_INT)
                    v = _dequantized(v, tl.cast(one, q.dtype), DOT_IN_FP32, QUANT_INT)  # converted before P.V
                elif DOT_IN_FP32:
                    k = k.to(q.dtype)
                    v = v.to(q.dtype)
                scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G, N]
            if PER_TOKEN_SCALES:
                scores = scores * ks[None, :]
            scores = tl.where((tokens < end)[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp2(scores - m_new[:, None])                               # [G, N]
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if PER_TOKEN_SCALES:
                # V's scales into p as p x (scale x QUANT_MAX) = p x the row's absmax, the range of the p x V
                # products: normal in fp16 down to p ~ 6e-5 / absmax, where p x scale alone falls to fp16's
                # subnormals over a long, flat context; the sum l stays p's, and the output divides by QUANT_MAX
                p = p * (vs * QUANT_MAX)[None, :]
            if INT8_LANES:
                v0, v1, v2, v3 = _int8_lanes(v)
                p = p.to(tl.float16)
                acc0 = acc0 * alpha[:, None] + tl.dot(p, v0)
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v1)
                acc2 = acc2 * alpha[:, None] + tl.dot(p, v2)
                acc3 = acc3 * alpha[:, None] + tl.dot(p, v3)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new
            block_ids = next_ids
        if INT8_LANES:  # lanes back to dimension order 4 w + j (a join's new axis is the last): [G, W, 2, 2]
            acc = tl.reshape(tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3)), [GROUP_PAD, HEAD_DIM_PAD])
        out = acc / (l * QUANT_MAX if PER_TOKEN_SCALES else l)[:, None]
        lse = m + tl.log2(l)
    if QUANTIZED and not PER_TOKEN_SCALES:
        out = out * tl.load(v_scale_base)                                      # static: V's scale once

    if not SPLIT:
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # partial_out: fp32 [B, H, max_splits, HEAD_DIM] contiguous; partial_lse: fp32 [B, H, max_splits]
        row = (seq * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * max_splits + split    # [G]
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=q_mask)
        tl.store(partial_lse_ptr + row, lse, mask=head_mask)
        if FOLD_MERGE:
            # Every thread's partial stores come before the barrier, the barrier before the counter's release:
            # the program that arrives last sees every split of its group. It leaves the counter at zero for
            # the next launch (a replayed CUDA graph reuses the same counters).
            tl.debug_barrier()
            counter = split_counters_ptr + seq * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == used - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
                num_heads = GROUP * tl.num_programs(1)
                for g in tl.static_range(GROUP):
                    head = kv_head * GROUP + g
                    _merge_head(partial_out_ptr, partial_lse_ptr, out_ptr + seq * stride_ob + head * stride_oh,
                                (seq * num_heads + head).to(tl.int64) * max_splits, used, dims, dim_mask,
                                HEAD_DIM, SPLITS_PAD)


@triton.jit
def _merge_head(partial_out_ptr, partial_lse_ptr, out_ptr, row_start, used, dims, dim_mask,
                HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # One head's output from the `used` partials at rows row_start + [0, used), weighted by exp2(lse).
    # Loads go through L2 (.cg): other programs wrote these rows.
    splits = tl.arange(0, SPLITS_PAD)
    written = splits < used                                                    # [S]
    row = row_start + splits                                                   # [S]
    lse = tl.load(partial_lse_ptr + row, mask=written, other=float("-inf"), cache_modifier=".cg")
    weights = tl.where(written, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)       # [S]
    partial = tl.load(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                      mask=written[:, None] & dim_mask[None, :], other=0.0, cache_modifier=".cg")  # [S, D]
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, seq_lens_ptr, seq_starts_ptr, out_ptr,
    stride_ob, stride_oh, num_heads, max_blocks_per_seq, max_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr, MIN_SPLIT_TOKENS: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = _clamped_seq_len(seq_lens_ptr, seq, max_blocks_per_seq, BLOCK_SIZE)
    first = _first_token(seq_starts_ptr, seq, seq_len, HAS_STARTS)
    _, _, used = _split_bounds(first, seq_len, 0, max_splits, MIN_SPLIT_TOKENS, TILE_N)
    dims = tl.arange(0, HEAD_DIM_PAD)
    _merge_head(partial_out_ptr, partial_lse_ptr, out_ptr + seq * stride_ob + head * stride_oh,
                (seq * num_heads + head).to(tl.int64) * max_splits, used, dims, dims < HEAD_DIM,
                HEAD_DIM, SPLITS_PAD)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    tile: int       # tokens per loop iteration
    num_warps: int
    num_stages: int


def decode_config(shape, dtype: torch.dtype, cache_dtype: torch.dtype = None) -> DecodeConfig:
    """Tile, warps and pipeline depth for a shape, q's dtype and the page dtype (default: q's), bounds checked on
    sm_90 cubins by the static model.

    8 KB of K (and 8 KB of V) per tile, issued together by a 4-warp program: at 5-7 CTAs per SM several
    times the ~16 KB per SM an H100 needs in flight, and small enough that fp32 tiles do not spill.
    fp8 / int8 pages are converted in registers, to fp32 (one head) or to the dot's dtype (grouped heads: fp16
    for fp16 q, else fp32). Where the converted tile fits, they read twice the tokens of q's dtype: the same 8 KB,
    and half the per-tile instructions (softmax, accumulator rescale, q's operand loads) per byte, which bound
    these loops (static_model.ISSUE_RATE). Grouped fp32 dots keep q's tile (bf16's doubled one spills), and for
    fp32 q pipeline nothing (two stages of converted tiles spill)."""
    head_dim_pad = max(16, next_power_of_2(shape.head_dim))
    tile = max(16, min(128, 8192 // (head_dim_pad * dtype.itemsize)))
    if not is_quantized(cache_dtype):
        return DecodeConfig(tile=tile, num_warps=4, num_stages=2)
    grouped = shape.num_heads > shape.num_kv_heads
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not grouped):
        tile = min(128, 2 * tile)
    return DecodeConfig(tile=tile, num_warps=4, num_stages=1 if grouped and dtype == torch.float32 else 2)


def needs_int64_offsets(*tensors) -> bool:
    """Whether an element offset into any of `tensors` (None skipped) can reach 2**31: the kernel's block id x
    stride products then need 64 bits, else 32-bit address math saves a fifth of the loop's instructions."""
    return any(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= 2**31
               for t in tensors if t is not None)


def int32_words(*caches) -> bool:
    """Whether 1-byte pages can be read as int32 words (`view(torch.int32)`): 4-byte aligned, rows of a multiple of
    4 bytes."""
    return all(c.data_ptr() % 4 == 0 and c.storage_offset() % 4 == 0 and c.stride(-1) == 1 and c.shape[-1] % 4 == 0
               and all(stride % 4 == 0 for stride in c.stride()[:-1]) for c in caches)


def one_head_rows(head_dim_pad: int, page_itemsize: int, num_warps: int, tile: int) -> int:
    """Row slots of the one-head loop: the tile rows one pass of the CTA's threads covers when each thread loads
    16-byte vectors of a row, so the [TILE_N // ROWS, ROWS, D] tile's first axis is each thread's repeats."""
    lanes_per_row = min(32, max(1, head_dim_pad * page_itemsize // 16))
    return min(tile, num_warps * 32 // lanes_per_row)


def decode_launches(q, k_cache, v_cache, block_tables, seq_lens, shape, scale, out, config, num_splits,
                    min_split_tokens=MIN_SPLIT_TOKENS, split_counters=None, seq_starts=None, k_scale=None,
                    v_scale=None):
    """The kernel launches of one decode as [(kernel, args, kwargs, grid)]: run by `paged_decode_attention`,
    compiled for sm_90 by `kvkernels.static_model`. Shapes as in `paged_decode_attention`; with split
    counters a split decode is one launch (the merge folded into it), else two."""
    has_starts = seq_starts is not None
    starts = seq_starts if has_starts else seq_lens  # a placeholder pointer the kernel never reads
    batch, num_heads, head_dim = shape.batch, shape.num_heads, shape.head_dim
    group = num_heads // shape.num_kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    group_pad = 1 if group == 1 else max(16, next_power_of_2(group))  # tl.dot needs 16 rows
    if num_splits > 1:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        partial_lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        partial_out = partial_lse = out  # unused: the kernel writes `out` directly
    quant = quant_constexprs(k_cache, k_scale)
    # (each lane's dot needs K = D / 4 >= 16)
    int8_lanes = (group > 1 and q.dtype == torch.float16 and k_cache.dtype == torch.int8 and head_dim_pad >= 64
                  and int32_words(k_cache, v_cache))
    if int8_lanes:
        k_cache, v_cache = k_cache.view(torch.int32), v_cache.view(torch.int32)
    fold_merge = num_splits > 1 and split_counters is not None
    splits_pad = next_power_of_2(num_splits)
    launches = [(_paged_decode_kernel, (
        q, k_cache, v_cache, block_tables, seq_lens, starts, out, partial_out, partial_lse,
        split_counters if fold_merge else seq_lens,  # unused without the fold
        k_cache if k_scale is None else k_scale, v_cache if v_scale is None else v_scale,  # unread without scales
        scale * LOG2_E, 1.0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *scale_strides(k_scale, k_cache), *scale_strides(v_scale, v_cache),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        shape.max_blocks_per_seq, num_splits,
    ), dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_SIZE=shape.block_size, TILE_N=config.tile,
        ROWS=one_head_rows(head_dim_pad, k_cache.element_size(), config.num_warps, config.tile) if group == 1 else 1,
        SPLIT=num_splits > 1, MIN_SPLIT_TOKENS=min_split_tokens,
        NUM_STAGES=config.num_stages, DOT_IN_FP32=q.dtype != torch.float16,
        DOT_PRECISION="tf32" if q.dtype == torch.bfloat16 else "ieee", HAS_STARTS=has_starts, FOLD_MERGE=fold_merge,
        SPLITS_PAD=splits_pad if fold_merge else 1, num_warps=config.num_warps,
        **quant, INT64_OFFSETS=needs_int64_offsets(k_cache, v_cache, k_scale, v_scale), INT8_LANES=int8_lanes,
        **FP_FUSION,
    ), (batch, shape.num_kv_heads, num_splits))]
    if num_splits > 1 and not fold_merge:
        launches.append((_merge_splits_kernel, (
            partial_out, partial_lse, seq_lens, starts, out,
            out.stride(0), out.stride(1), num_heads, shape.max_blocks_per_seq, num_splits,
        ), dict(
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=shape.block_size, TILE_N=config.tile,
            SPLITS_PAD=splits_pad, MIN_SPLIT_TOKENS=min_split_tokens, HAS_STARTS=has_starts, **FP_FUSION,
        ), (batch, num_heads, 1)))
    return launches


@functools.lru_cache(maxsize=None)
def split_kernel_ctas_per_sm(device: torch.device, dtype: torch.dtype, group: int, head_dim: int,
                             block_size: int, cache_dtype: torch.dtype = None) -> int:
    """CTAs per SM of the split decode kernel: on CUDA from the kernel compiled for stand-in inputs of this
    configuration (aligned and contiguous, as the caches are), elsewhere the static model's."""
    cache_dtype = cache_dtype or dtype
    if device.type != "cuda":
        return STATIC_CTAS_PER_SM[group > 1, is_quantized(cache_dtype)]
    q = torch.empty(1, group, head_dim, device=device, dtype=dtype)
    cache = torch.empty(1, block_size, 1, head_dim, device=device, dtype=cache_dtype)
    scales = torch.empty(1, block_size, 1, device=device) if cache_dtype != dtype else None
    tables = torch.zeros(1, 16, device=device, dtype=torch.int32)  # 16 columns: specialised like a real table
    lens = torch.ones(1, device=device, dtype=torch.int32)
    shape = check_decode_inputs(q, cache, cache, tables, lens)
    fn, args, kwargs, grid = decode_launches(q, cache, cache, tables, lens, shape, 1.0, torch.empty_like(q),
                                             decode_config(shape, dtype, cache_dtype), num_splits=2,
                                             k_scale=scales, v_scale=scales)[0]
    try:
        kernel = fn.warmup(*args, grid=grid, **kwargs)  # the launch then finds it in Triton's cache
        kernel._init_handles()  # loads the cubin: n_regs is known from here
        return ctas_per_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps)
    except Exception as e:  # a Triton whose compiled-kernel API moved: split by the model rather than fail
        warnings.warn(f"kvkernels: could not read the decode kernel's occupancy ({e}); splitting by the static "
                      "model's", RuntimeWarning, stacklevel=2)
        return STATIC_CTAS_PER_SM[group > 1, is_quantized(cache_dtype)]


def default_num_splits(shape, dtype: torch.dtype, device: torch.device, min_split_tokens=MIN_SPLIT_TOKENS,
                       cache_dtype: torch.dtype = None) -> int:
    """The split count a launch of `shape` picks: from the split kernel's occupancy and the SM count."""
    cache_dtype = cache_dtype or dtype
    occupancy = split_kernel_ctas_per_sm(device, dtype, shape.num_heads // shape.num_kv_heads, shape.head_dim,
                                         shape.block_size, cache_dtype)
    return choose_num_splits(shape.batch, shape.num_kv_heads, shape.max_blocks_per_seq * shape.block_size,
                             num_sms(device), occupancy, decode_config(shape, dtype, cache_dtype).tile,
                             min_split_tokens)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, shape, scale, out,
                           *, num_splits=None, min_split_tokens=MIN_SPLIT_TOKENS, seq_starts=None,
                           split_counters=None, k_scale=None, v_scale=None):
    """Launches the decode kernel (and the merge when splitting without counters) into `out`. Inputs checked
    by kvkernels.ops.

    q, out [B, H, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D] (q's dtype, or fp8 / int8 with
    fp32 k_scale, v_scale [num_blocks, block_size, H_kv] or [H_kv]); block_tables int32 [B, M];
    seq_lens int32 [B]; seq_starts: None or int32 [B], each sequence's first visible token (sliding window);
    shape: the DecodeShape from validation.
    num_splits: the static maximum partitions per sequence (default: from occupancy, kvkernels.split).
    split_counters: optional int32 [B, H_kv], all zero; the kernel leaves them zero.
    """
    if shape.batch == 0:
        return out
    config = decode_config(shape, q.dtype, k_cache.dtype)
    if num_splits is None:
        num_splits = default_num_splits(shape, q.dtype, q.device, min_split_tokens, k_cache.dtype)
    for kernel, args, kwargs, grid in decode_launches(q, k_cache, v_cache, block_tables, seq_lens, shape, scale, out,
                                                      config, num_splits, min_split_tokens, split_counters,
                                                      seq_starts, k_scale, v_scale):
        kernel[grid](*args, **kwargs)
    return out
