"""kvkernels.generate's prefill and decode step for any decoder kvkernels.patch serves (Llama, Mistral, Qwen2, Qwen3,
Phi3, ...): the model's own modules, with its attention sent through the "kvkernels" attention function to a
preallocated PagedKVCache whose block tables are filled up front (so a decode step is static and can be captured as a
CUDA graph). GPT-2 keeps its fused step (kvkernels.generation._Runner).

The model runs without an HF cache (use_cache=False): its attention modules hand this step's query, key and value
straight to `attend`, which writes K/V into the pool and attends. Positions are the real tokens before each one (left
padding takes no position, as in HF's generate), and a sliding window counts the same tokens, so decode starts each
sequence's kernel read at its first token inside the window.
"""
import inspect

import torch
import torch.nn.functional as F

from ..ops import paged_decode_attention
from .attention import active_cache, model_configs


class DecoderRunner:
    """Prefill and the decode step of one kvkernels.generate call of a Hugging Face decoder over `pool`.

    model: the head model (eval mode). pool: PagedKVCache whose first `batch` sequences were reserved for their
    prompt plus max_new_tokens. select: the loop's token choice, select(logits float32 [B, V], state, grow).
    ring_window, ring_blocks: every layer's window and the pages per sequence when the pool keeps rings of pages
    (PagedKVCache.reserve_ring), else None: the prompt then stores only the tokens its ring holds, and a layer
    asking for more than the window fails.
    """

    def __init__(self, model, pool, batch: int, select, ring_window: int = None, ring_blocks: int = None):
        self.model, self.pool, self.select = model, pool, select
        self.ring_window, self.ring_blocks = ring_window, ring_blocks
        self.tables = pool.block_tables[:batch]                                     # int32 [B, M], static
        self.configs = model_configs(model)
        self.keep_last = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        device = self.tables.device
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1], static for graphs
        self.logits = torch.empty(batch, model.get_output_embeddings().out_features, dtype=torch.float32,
                                  device=device)
        self._step = None

    def _logits(self, input_ids, positions):
        """Last column's logits [B, V] of the model run on input_ids [B, T] at positions [B, T]."""
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        with active_cache(self, self.configs):
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False, **extra)
        return out.logits[:, -1]

    def prefill(self, input_ids, real):
        """Runs the prompts (left padded; real: bool [B, P]) into the pool; returns float32 logits [B, V]."""
        pool = self.pool
        positions = (real.long().cumsum(1) - 1).clamp(min=0)                           # [B, P], HF's position_ids
        slots = self.tables.long().gather(1, positions // pool.block_size) * pool.block_size \
            + positions % pool.block_size
        stored = real
        if self.ring_blocks is not None:   # a ring's slot holds the last of its positions: write only those
            stored = real & (positions >= positions[:, -1:] + 1 - self.ring_blocks * pool.block_size)
        self._step = ("prefill", torch.where(stored, slots, -1).reshape(-1), positions, real)
        try:
            return self._logits(input_ids, positions).float()
        finally:
            self._step = None

    def decode_step(self, state):
        """One token per sequence at position state.lengths: append its K/V, attend over the pages, select."""
        pool = self.pool
        lengths = state.lengths.long()                                                 # [B]
        slots = self.tables.long().gather(1, (lengths // pool.block_size)[:, None])[:, 0] * pool.block_size \
            + lengths % pool.block_size
        self.positions.copy_(lengths[:, None])
        self._step = ("decode", slots, state.lengths + 1, None)
        try:
            self.logits.copy_(self._logits(state.tokens[:, None], self.positions))
        finally:
            self._step = None
        # Finished sequences stop growing (grow skips them): their next, ignored token overwrites the same slot.
        self.select(self.logits, state, grow=True)

    def attend(self, layer: int, query, key, value, scale: float, upcast: bool = False, window: int = None):
        """query [B, T, H, D], key, value [B, T, H_kv, D]: writes K/V and returns the attention output [B, T, H, D]."""
        mode, slots, extra, real = self._step
        pool = self.pool
        if self.ring_window is not None and (window is None or window > self.ring_window):
            raise RuntimeError(f"layer {layer} attends {'the whole context' if window is None else f'{window} tokens'}"
                               f" but the pool keeps rings for a window of {self.ring_window} (read from the config)")
        batch, num_new, heads, dim = query.shape
        kv_heads = key.shape[2]
        pool.append(layer, key.reshape(-1, kv_heads, dim).to(pool.dtype), value.reshape(-1, kv_heads, dim).to(pool.dtype),
                    slots)
        if mode == "decode":
            seq_lens = extra                                                           # int32 [B]
            starts = None if window is None else (seq_lens - window).clamp(min=0)
            # The CUDA kernel has no window start; Triton runs wherever CUDA does.
            backend = "triton" if starts is not None and pool.backend == "cuda" else pool.backend
            out = paged_decode_attention(query.reshape(batch, heads, dim).to(pool.dtype), pool.k_pools[layer],
                                         pool.v_pools[layer], self.tables, seq_lens, scale=scale,
                                         k_scale=pool.k_scales[layer], v_scale=pool.v_scales[layer], backend=backend,
                                         validate=False, seq_starts=starts)                  # [B, H, D]
            return out.to(query.dtype).view(batch, 1, heads, dim)
        positions = extra                                                              # [B, P]
        if pool.quantized:  # attend over what the pages hold (dequantized), as the decode steps will
            stored = (slots >= 0).view(batch, num_new, 1, 1)
            key_read, value_read = pool.read(layer, slots.clamp(min=0))
            key = torch.where(stored, key_read.view_as(key).to(key.dtype), key)
            value = torch.where(stored, value_read.view_as(value).to(value.dtype), value)
        visible = (positions[:, None, :] <= positions[:, :, None]) & real[:, None, :]  # [B, P, P]: causal, real
        if window is not None:
            visible &= positions[:, None, :] > positions[:, :, None] - window
        # A padding query sees itself only: finite, and no real query ever reads it.
        visible |= torch.eye(num_new, dtype=torch.bool, device=visible.device)
        group = heads // kv_heads
        compute = torch.float32 if upcast else query.dtype
        out = F.scaled_dot_product_attention(query.transpose(1, 2).to(compute),
                                             key.repeat_interleave(group, dim=2).transpose(1, 2).to(compute),
                                             value.repeat_interleave(group, dim=2).transpose(1, 2).to(compute),
                                             attn_mask=visible[:, None], scale=scale)  # [B, H, P, D]
        return out.transpose(1, 2).to(query.dtype)
