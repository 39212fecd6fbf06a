"""Fused Triton kernels for one decode step of kvkernels.generate: few launches, every one reading its weights once.

A decode step is launch-bound at small batch (each kernel does microseconds of work), so the step is built from
five launches per layer plus three around them (`kvkernels.generation` strings them together):
    embed           x = wte[token] + wpe[position]; seq_lens = position + 1              (the prologue)
    qkv_write       LayerNorm -> c_attn GEMM -> + bias; q out, k and v into their cache slots
    (paged decode attention: kvkernels.ops)
    linear          c_proj GEMM + bias + residual, in place on x
    linear          LayerNorm -> c_fc GEMM + bias -> tanh GELU
    linear          mlp c_proj GEMM + bias + residual, in place on x
    linear          LayerNorm (ln_f) -> lm_head GEMM -> float32 logits
    update_state    greedy argmax (repetition penalty applied) + EOS / output / length bookkeeping (the epilogue)
The GEMMs are skinny (M = batch): each program owns BLOCK_N output columns for BLOCK_M rows and streams a
[K / splits, BLOCK_N] slice of the weight once. N / BLOCK_N column tiles alone are too few programs to stream a
small weight from 132 SMs (GPT-2's c_proj: 24), so K is split until there are about two programs per SM; every
split stores its fp32 partial, and the last of a tile's splits to arrive (an atomic counter, left at zero for
the next launch or graph replay) sums them in split order, so the result does not depend on arrival order,
and runs the epilogue. A LayerNorm before a GEMM is recomputed by every program from the rows it reads anyway
(M x K elements, a few KB, in cache), which is what lets it disappear as a launch.
Numerics follow the unfused PyTorch step: float32 accumulation, float32 inputs multiplied at full precision
(never TF32), and rounding to the model dtype wherever the unfused step stores a tensor, so float32 greedy
tokens match HF's. `kvkernels.step_reference` is the same math in plain PyTorch (the oracle).
"""
import os

import torch
import triton
import triton.language as tl

from .split import FP_FUSION, GemmWorkspace, num_sms, split_k

LOG2_E = tl.constexpr(1.4426950408889634)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _embed_kernel(
    tokens_ptr, lengths_ptr, wte_ptr, wpe_ptr, x_ptr, seq_lens_ptr,
    stride_wte, stride_wpe, stride_x,
    EMBED: tl.constexpr, EMBED_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    token = tl.load(tokens_ptr + row).to(tl.int64)
    position = tl.load(lengths_ptr + row)
    cols = tl.arange(0, EMBED_PAD)
    mask = cols < EMBED
    word = tl.load(wte_ptr + token * stride_wte + cols, mask=mask).to(tl.float32)
    place = tl.load(wpe_ptr + position.to(tl.int64) * stride_wpe + cols, mask=mask).to(tl.float32)
    tl.store(x_ptr + row * stride_x + cols, (word + place).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(seq_lens_ptr + row, position + 1)


@triton.jit
def _row_stats(x_ptr, rows, row_mask, stride_xm, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # mean and 1/std [BLOCK_M] of x's rows over K, in two passes like torch's layer_norm (not E[x^2] - E[x]^2)
    total = tl.zeros([BLOCK_M], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < K)[None, :]
        total += tl.sum(tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
                        .to(tl.float32), axis=1)
    mean = total / K
    squares = tl.zeros([BLOCK_M], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, tl.rsqrt(squares / K + eps)


@triton.jit
def _matmul_tile(
    x_ptr, w_ptr, ln_w_ptr, ln_b_ptr, ln_eps, rows, cols, M, N, K, k_chunk,
    stride_xm, stride_wk, stride_wn,
    LAYER_NORM: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # acc [BLOCK_M, BLOCK_N] float32 = LayerNorm?(x[rows]) @ w[:, cols] over this split's k_chunk rows of w
    row_mask = rows < M
    col_mask = cols < N
    if LAYER_NORM:
        mean, rstd = _row_stats(x_ptr, rows, row_mask, stride_xm, K, ln_eps, BLOCK_M, BLOCK_K)   # over all of K
    k_lo = tl.program_id(2) * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_mask = ks < k_hi
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)                                                      # [BLOCK_M, BLOCK_K]
        if LAYER_NORM:
            gamma = tl.load(ln_w_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            beta = tl.load(ln_b_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
            a = a.to(w_ptr.dtype.element_ty)       # the unfused step stores LayerNorm's output in the model dtype
        w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)            # [BLOCK_K, BLOCK_N]
        if DOT_FP32:        # the same products (exact in float32), for an interpreter that cannot dot bfloat16
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")                             # float32 stays float32
    return acc


@triton.jit
def _split_k_sum(acc, partials_ptr, counters_ptr, rows, cols, M, N):
    # Stores this split's partial [BLOCK_M, BLOCK_N] of partials [splits, M, N]; returns whether this program is
    # the tile's last split to arrive and, for it, the sum of all splits in split order. Every thread's stores
    # come before the barrier, the barrier before the counter's release; the last program leaves the counter at
    # zero for the next launch (a replayed CUDA graph reuses the same counters).
    offsets = rows[:, None] * N + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    splits = tl.num_programs(2)
    tl.store(partials_ptr + tl.program_id(2) * M * N + offsets, acc, mask=mask)
    tl.debug_barrier()
    counter = counters_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        acc = tl.zeros_like(acc)
        for split in range(0, splits):
            acc += tl.load(partials_ptr + split * M * N + offsets, mask=mask, other=0.0)
    return last, acc


@triton.jit
def _linear_epilogue(acc, w_ptr, bias_ptr, out_ptr, rows, cols, M, N, stride_om,
                     HAS_BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = acc.to(w_ptr.dtype.element_ty).to(tl.float32)               # the GEMM's output, in the model dtype
    if GELU:
        # tanh GELU: 0.5 y (1 + tanh(u)) = y / (1 + exp(-2u)), never inf / inf; the clamp keeps exp finite
        u = SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)
        y = y / (1.0 + tl.exp2(tl.minimum(-2.0 * LOG2_E * u, 126.0)))
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if RESIDUAL:
        # out is the residual stream; each element is read and written by one program only
        y = tl.load(out, mask=mask, other=0.0).to(tl.float32) + y
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, out_ptr, partials_ptr, counters_ptr,
    M, N, K, k_chunk, ln_eps,
    stride_xm, stride_wk, stride_wn, stride_om,
    LAYER_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _matmul_tile(x_ptr, w_ptr, ln_w_ptr, ln_b_ptr, ln_eps, rows, cols, M, N, K, k_chunk, stride_xm, stride_wk,
                       stride_wn, LAYER_NORM, DOT_FP32, BLOCK_M, BLOCK_K, BLOCK_N)
    if SPLIT_K:
        last, acc = _split_k_sum(acc, partials_ptr, counters_ptr, rows, cols, M, N)
        if last:
            _linear_epilogue(acc, w_ptr, bias_ptr, out_ptr, rows, cols, M, N, stride_om, HAS_BIAS, GELU, RESIDUAL)
    else:
        _linear_epilogue(acc, w_ptr, bias_ptr, out_ptr, rows, cols, M, N, stride_om, HAS_BIAS, GELU, RESIDUAL)


@triton.jit
def _qkv_epilogue(acc, bias_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, lengths_ptr, rows, cols, M,
                  stride_qm, stride_cb, stride_ct, stride_ch, stride_tb,
                  EMBED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    acc += tl.load(bias_ptr + cols, mask=cols < 3 * EMBED, other=0.0).to(tl.float32)[None, :]
    y = acc.to(q_ptr.dtype.element_ty)
    row_mask = rows < M
    part = cols // EMBED                                                            # 0: q, 1: k, 2: v
    within = cols % EMBED                                                           # head * HEAD_DIM + dim
    tl.store(q_ptr + rows[:, None] * stride_qm + within[None, :], y, mask=row_mask[:, None] & (part == 0)[None, :])
    # The new token's slot: position lengths[row] of the row's block table.
    position = tl.load(lengths_ptr + rows, mask=row_mask, other=0)
    block = tl.load(block_tables_ptr + rows.to(tl.int64) * stride_tb + position // BLOCK_SIZE, mask=row_mask,
                    other=0).to(tl.int64)
    slot = block * stride_cb + (position % BLOCK_SIZE).to(tl.int64) * stride_ct                          # [BLOCK_M]
    offset = slot[:, None] + ((within // HEAD_DIM) * stride_ch + within % HEAD_DIM)[None, :]
    tl.store(k_cache_ptr + offset, y, mask=row_mask[:, None] & (part == 1)[None, :])
    tl.store(v_cache_ptr + offset, y, mask=row_mask[:, None] & (part == 2)[None, :])


@triton.jit
def _qkv_write_kernel(
    x_ptr, w_ptr, bias_ptr, ln_w_ptr, ln_b_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, lengths_ptr,
    partials_ptr, counters_ptr,
    M, K, k_chunk, ln_eps,
    stride_xm, stride_wk, stride_wn, stride_qm,
    stride_cb, stride_ct, stride_ch, stride_tb,
    EMBED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                       # into [q | k | v]
    acc = _matmul_tile(x_ptr, w_ptr, ln_w_ptr, ln_b_ptr, ln_eps, rows, cols, M, 3 * EMBED, K, k_chunk, stride_xm,
                       stride_wk, stride_wn, True, DOT_FP32, BLOCK_M, BLOCK_K, BLOCK_N)
    if SPLIT_K:
        last, acc = _split_k_sum(acc, partials_ptr, counters_ptr, rows, cols, M, 3 * EMBED)
        if last:
            _qkv_epilogue(acc, bias_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, lengths_ptr, rows, cols,
                          M, stride_qm, stride_cb, stride_ct, stride_ch, stride_tb, EMBED, HEAD_DIM, BLOCK_SIZE)
    else:
        _qkv_epilogue(acc, bias_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, lengths_ptr, rows, cols, M,
                      stride_qm, stride_cb, stride_ct, stride_ch, stride_tb, EMBED, HEAD_DIM, BLOCK_SIZE)


@triton.jit
def _update_state_kernel(
    logits_ptr, chosen_ptr, seen_ptr, tokens_ptr, lengths_ptr, finished_ptr, done_at_ptr, step_ptr, out_ptr, eos_ptr,
    num_eos, pad, penalty, V,
    stride_lb, stride_sb, stride_ob,
    GREEDY: tl.constexpr, PENALTY: tl.constexpr, GROW: tl.constexpr, BLOCK_V: tl.constexpr, EOS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    if GREEDY:
        # First-occurrence argmax like torch.argmax: per lane the earliest index wins ties (strict >), then the
        # smallest index among the lanes holding the maximum.
        lanes = tl.arange(0, BLOCK_V)
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_index = lanes
        for start in range(0, V, BLOCK_V):
            index = start + lanes
            mask = index < V
            score = tl.load(logits_ptr + row * stride_lb + index, mask=mask, other=float("-inf"))
            if PENALTY:     # HF's repetition penalty on tokens already present
                seen = tl.load(seen_ptr + row * stride_sb + index, mask=mask, other=0) != 0
                score = tl.where(seen, tl.where(score < 0, score * penalty, score / penalty), score)
            take = score > best
            best = tl.where(take, score, best)
            best_index = tl.where(take, index, best_index)
        top = tl.max(best, axis=0)
        token = tl.min(tl.where(best == top, best_index, V), axis=0).to(tl.int64)
    else:
        token = tl.load(chosen_ptr + row)
    finished = tl.load(finished_ptr + row) != 0
    token = tl.where(finished, pad, token)                         # finished rows emit padding
    step = tl.load(step_ptr + row)
    tl.store(out_ptr + row * stride_ob + step, token)
    eos = tl.load(eos_ptr + tl.arange(0, EOS_PAD), mask=tl.arange(0, EOS_PAD) < num_eos, other=-1)
    newly_done = (tl.sum((eos == token).to(tl.int32), axis=0) > 0) & ~finished
    tl.store(done_at_ptr + row, step, mask=newly_done)
    tl.store(finished_ptr + row, (finished | newly_done).to(finished_ptr.dtype.element_ty))
    if GROW:        # the step just cached this row's input token, unless the row had finished
        length = tl.load(lengths_ptr + row)
        tl.store(lengths_ptr + row, length + (~finished).to(tl.int32))
    if PENALTY:
        tl.store(seen_ptr + row * stride_sb + token, tl.full([], 1, seen_ptr.dtype.element_ty))
    tl.store(tokens_ptr + row, token)
    tl.store(step_ptr + row, step + 1)


# One program per row streams the row's logits (50257 floats for GPT-2): many warps keep many loads in flight.
SELECT_BLOCK_V, SELECT_WARPS = 4096, 16
INTERPRETER_MAX_NUMEL = 2**20     # the most elements Triton's interpreter lets a tensor hold


def _dot_fp32(dtype) -> bool:
    """Triton's interpreter multiplies bfloat16 tiles as raw 16-bit integers; on a GPU they stay bfloat16."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _gemm_blocks(M, N, K, dtype, interpreted=False):
    """(BLOCK_M, BLOCK_K, BLOCK_N): 16 rows is tl.dot's minimum; narrow column tiles give a launch enough programs
    to stream the weight from many SMs at batch 1 (c_proj has only 768 columns). Triton's interpreter runs the
    programs one after another at a cost per program, so there (`interpreted`) a launch gets as few column tiles
    as its tensors allow (4, or tiles of the interpreter's 2**20 elements at most): GPT-2's 50257-column
    lm_head ran 786 programs a token, over a second on a CPU."""
    block_m = 16 if M <= 16 else 32
    block_n = 32 if N <= 4096 else 64
    block_k = min(128 if dtype != torch.float32 else 64, triton.next_power_of_2(K))
    if interpreted:
        block_n = max(block_n, min(triton.next_power_of_2(triton.cdiv(N, 4)),
                                   INTERPRETER_MAX_NUMEL // max(block_k, block_m)))    # [K, N] and [M, N] tiles
    return block_m, block_k, block_n


def _gemm_plan(M, N, K, dtype, device):
    """Blocks, grid (column tiles, row tiles, splits), k_chunk, and the split-K partials and counters it needs
    (none unsplit) of a skinny GEMM."""
    block_m, block_k, block_n = _gemm_blocks(M, N, K, dtype, interpreted=device.type == "cpu")
    tiles_n, tiles_m = triton.cdiv(N, block_n), triton.cdiv(M, block_m)
    splits, k_chunk = split_k(tiles_n * tiles_m, K, block_k, num_sms(device))
    if splits == 1:
        return (block_m, block_k, block_n), (tiles_n, tiles_m, 1), k_chunk, (0, 0)
    assert splits * M * N < 2**31, "split-K partials are addressed with 32-bit offsets"
    return (block_m, block_k, block_n), (tiles_n, tiles_m, splits), k_chunk, (splits * M * N, tiles_n * tiles_m)


def _split_buffers(x, grid, needs, workspace):
    """split-K's (partials, counters) for a GEMM of x's rows; x stands in for both when K is not split."""
    if grid[2] == 1:
        return x, x
    return (workspace or GemmWorkspace(x.device, *needs)).take(*needs)


def gemm_workspace(M, shapes, dtype, device):
    """A GemmWorkspace for the split-K GEMMs of M rows over `shapes` [(K, N)]: the largest each buffer needs."""
    needs = [_gemm_plan(M, N, K, dtype, device)[3] for K, N in shapes]
    return GemmWorkspace(device, max(n[0] for n in needs), max(n[1] for n in needs))


def embed(tokens, lengths, wte, wpe, x, seq_lens):
    """x[b] = wte[tokens[b]] + wpe[lengths[b]] and seq_lens[b] = lengths[b] + 1, in place.

    tokens int64 [B]; lengths int32 [B] (each row's position); wte [V, E], wpe [P, E]; x [B, E] of wte's dtype;
    seq_lens int32 [B]: the lengths attention sees once this step's token is cached.
    """
    batch, embed_dim = x.shape
    _embed_kernel[(batch,)](tokens, lengths, wte, wpe, x, seq_lens, wte.stride(0), wpe.stride(0), x.stride(0),
                            EMBED=embed_dim, EMBED_PAD=triton.next_power_of_2(embed_dim), **FP_FUSION)


def linear(x, weight, bias, out, *, layer_norm=None, gelu=False, residual=False, workspace=None):
    """out = [out +] gelu?(LayerNorm?(x) @ weight + bias), in place.

    x [M, K]; weight [K, N] (any strides: HF's Conv1D weight, or lm_head.weight.t()); bias [N] or None; all of
    the model dtype. out [M, N]: the model dtype, or float32 (logits; rounded to the model dtype first, like
    the unfused step's `.float()`). layer_norm: (weight [K], bias [K], eps) applied to x's rows first.
    residual: add the result to out (the residual stream), in place. gelu: tanh GELU (HF's gelu_new).
    workspace: a GemmWorkspace for split-K partials (gemm_workspace; default: allocated for this call).
    """
    M, K = x.shape
    N = weight.shape[1]
    assert weight.shape[0] == K and out.shape == (M, N) and x.stride(1) == 1 and out.stride(1) == 1
    ln_weight, ln_bias, eps = layer_norm if layer_norm is not None else (weight, weight, 0.0)
    (block_m, block_k, block_n), grid, k_chunk, needs = _gemm_plan(M, N, K, weight.dtype, x.device)
    partials, counters = _split_buffers(x, grid, needs, workspace)
    _linear_kernel[grid](
        x, weight, bias if bias is not None else weight, ln_weight, ln_bias, out, partials, counters,
        M, N, K, k_chunk, float(eps), x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        LAYER_NORM=layer_norm is not None, HAS_BIAS=bias is not None, GELU=gelu, RESIDUAL=residual,
        SPLIT_K=grid[2] > 1, DOT_FP32=_dot_fp32(weight.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        **FP_FUSION)


def qkv_write(x, layer_norm, weight, bias, q, k_cache, v_cache, block_tables, lengths, *, workspace=None):
    """[q | k | v] = LayerNorm(x) @ weight + bias; q into `q`, k and v into each row's slot of the paged cache.

    x [B, E]; layer_norm (weight [E], bias [E], eps); weight [E, 3E], bias [3E] (HF's c_attn); q [B, H, D]
    contiguous; k_cache, v_cache [num_blocks, block_size, H, D], same strides; block_tables int32 [B, M];
    lengths int32 [B]: the position of this step's token, whose slot is block_tables[b, pos // block_size].
    All floating tensors of the model dtype. workspace: as in `linear`.
    """
    batch, embed_dim = x.shape
    _, block_size, heads, head_dim = k_cache.shape
    assert weight.shape == (embed_dim, 3 * embed_dim) and q.shape == (batch, heads, head_dim)
    assert q.is_contiguous() and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert heads * head_dim == embed_dim and k_cache.dtype == q.dtype == weight.dtype
    ln_weight, ln_bias, eps = layer_norm
    (block_m, block_k, block_n), grid, k_chunk, needs = _gemm_plan(batch, 3 * embed_dim, embed_dim, weight.dtype,
                                                                   x.device)
    partials, counters = _split_buffers(x, grid, needs, workspace)
    _qkv_write_kernel[grid](
        x, weight, bias, ln_weight, ln_bias, q, k_cache, v_cache, block_tables, lengths, partials, counters,
        batch, embed_dim, k_chunk, float(eps), x.stride(0), weight.stride(0), weight.stride(1), q.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        EMBED=embed_dim, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, SPLIT_K=grid[2] > 1,
        DOT_FP32=_dot_fp32(weight.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, **FP_FUSION)


def update_state(state, logits=None, chosen=None, *, penalty=1.0, grow=False):
    """Records each row's next token, in place: greedy argmax of `logits` (after the repetition penalty), or
    `chosen`. Finished rows emit state.pad; out[b, step[b]] = token; EOS marks the row finished at that column.

    logits float32 [B, V] or chosen int64 [B]; state: tokens int64 [B], lengths int32 [B], finished bool [B],
    done_at int64 [B], step int64 [B], out int64 [B, T], seen bool [B, V] or None (needed for a penalty),
    eos int64 [num_eos], pad int. grow: add 1 to lengths of rows unfinished before this token (a decode step
    cached their input token). penalty: HF's repetition penalty, applied to greedy logits where state.seen.
    """
    batch = state.tokens.shape[0]
    greedy = chosen is None
    seen = state.seen if state.seen is not None else state.finished
    vocab = logits.shape[1] if greedy else 1
    _update_state_kernel[(batch,)](
        logits if greedy else chosen, chosen if not greedy else state.tokens, seen, state.tokens, state.lengths,
        state.finished, state.done_at, state.step, state.out, state.eos, state.eos.numel(), state.pad, float(penalty),
        vocab, logits.stride(0) if greedy else 0, seen.stride(0), state.out.stride(0),
        GREEDY=greedy, PENALTY=state.seen is not None, GROW=grow,
        BLOCK_V=min(SELECT_BLOCK_V, triton.next_power_of_2(vocab)),
        EOS_PAD=triton.next_power_of_2(max(state.eos.numel(), 1)), num_warps=SELECT_WARPS, **FP_FUSION)
