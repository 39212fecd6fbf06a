"""PagedGPT2Cache: a Hugging Face `Cache` whose keys and values live in a kvkernels.PagedKVCache.

HF's generate loop and GPT2Model only ask a cache for lengths (get_seq_length, get_mask_sizes) and for
beam reordering; the patched GPT2Attention (kvkernels.hf_patch) does the writing and the attention.
Each sequence stores only its real tokens: left padding and any masked column never reach the pool.

Per forward call (a "step"), hf_patch calls `begin_step` with the new tokens' 2D mask; the cache reserves
their slots on the host (no device sync unless a mask has to be read), then each layer's `attend` writes
the new K/V with kvkernels.write_kv_cache and attends:
    * one real token per sequence -> kvkernels.paged_decode_attention over the pages;
    * anything else (prompt, continuation, padding) -> gather the sequences' pages and run SDPA with a
      per-query length mask, which is HF's causal-and-padding mask over the unpadded layout.
"""
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache import CacheFullError, PagedKVCache
from .gpt2_common import blocks_for
from .ops import paged_decode_attention, resolve_backend, write_kv_cache
from .reference import gather_kv


class _PagedLayer(CacheLayerMixin):
    """Per-layer view HF's Cache machinery expects; every answer comes from the owning PagedGPT2Cache."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner):
        super().__init__()
        self._owner = weakref.ref(owner)  # no reference cycle: the pool is freed as soon as the cache is dropped

    def lazy_initialization(self, key_states, value_states):
        raise RuntimeError("PagedGPT2Cache layers are never initialised by HF code")

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("PagedGPT2Cache is written by the attention that kvkernels.patch(model) installs, but this "
                           "model's attention is not patched: call kvkernels.patch(model) or use a DynamicCache")

    def get_mask_sizes(self, query_length):
        return self._owner().get_mask_sizes(query_length)

    def get_seq_length(self):
        return self._owner().get_seq_length()

    def get_max_length(self):
        return -1


@dataclass
class _Step:
    num_new: int                 # T, new columns in this forward
    slot_mapping: torch.Tensor   # int64 [B * T], -1 for padding tokens
    decode: bool                 # every sequence adds exactly one real token
    attn_mask: torch.Tensor      # bool [B, 1, T, L] (extend steps only): key l visible to query t
    table_blocks: int            # block-table columns covering the longest sequence after the step
    lens_before: list            # host lengths before the step, to roll back on failure


class PagedGPT2Cache(Cache):
    """Paged K/V for the layers of one GPT-2, for `num_seqs` sequences (fixed by the first step).

    `max_tokens` fixes the pool (CacheFullError past it); otherwise the pool starts at `planned_tokens`
    (or what the first step needs) and doubles when a step needs more. get_seq_length() is HF's notion
    of length: the columns seen so far, padding included; each sequence's stored length is its real tokens.
    """

    def __init__(self, config, *, num_seqs=None, planned_tokens=None, max_tokens=None, block_size=16,
                 backend="auto", cache_dtype=None):
        super().__init__(layers=[_PagedLayer(self) for _ in range(config.n_layer)])
        self.num_layers, self.num_heads = config.n_layer, config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.max_positions = config.n_positions
        self.num_seqs, self.planned_tokens, self.max_tokens = num_seqs, planned_tokens, max_tokens
        self.block_size, self.backend, self.cache_dtype = block_size, backend, cache_dtype
        self.pool = None
        self.seen_tokens = 0
        self.step = None

    # -- what HF asks a Cache -----------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.seen_tokens + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self):
        if self.pool is not None:
            self.pool.reset()
        self.seen_tokens, self.step = 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: sequence i continues from sequence beam_idx[i] (a copy, as blocks have one owner)."""
        self._rebuild([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int):
        self._rebuild([seq for seq in range(self.num_seqs) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor):
        self._rebuild([int(i) for i in indices.tolist()])

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove != 0:
            raise NotImplementedError("PagedGPT2Cache cannot crop (assisted generation and DoLa are not supported with "
                                      "kvkernels.patch); pass past_key_values=DynamicCache() to generate for those")

    # -- pool management ----------------------------------------------------------------------

    def memory(self):
        return None if self.pool is None else self.pool.memory()

    def _new_pool(self, num_seqs, num_blocks, dtype, device):
        return PagedKVCache(self.num_layers, self.num_heads, self.head_dim, max_batch_size=num_seqs,
                            num_blocks=num_blocks, block_size=self.block_size,
                            max_blocks_per_seq=blocks_for(self.max_positions, self.block_size),
                            dtype=dtype, device=device, backend=self.backend)

    def _allocate(self, num_seqs, num_tokens_first_step, dtype, device):
        self.backend = resolve_backend(self.backend, device)
        if self.max_tokens is not None:
            num_blocks = blocks_for(self.max_tokens, self.block_size)
        else:
            want = max(self.planned_tokens or 0, num_seqs * num_tokens_first_step)
            num_blocks = max(num_seqs * blocks_for(max(want // num_seqs, 1), self.block_size), 1)
        self.pool = self._new_pool(num_seqs, num_blocks, self.cache_dtype or dtype, device)
        self.num_seqs = num_seqs

    def _slots_of(self, pool, seqs, lens):
        """int64 slots of the first lens[i] tokens of pool sequence seqs[i], concatenated."""
        lens = torch.tensor(lens, dtype=torch.long)
        rows = torch.repeat_interleave(torch.tensor(seqs, dtype=torch.long), lens)                    # [N]
        positions = torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        blocks = pool.block_tables[rows.to(pool.device), (positions // pool.block_size).to(pool.device)].long()
        return blocks * pool.block_size + (positions % pool.block_size).to(pool.device)

    def _rebuild(self, source_seqs, lens=None, num_blocks=None):
        """New pool where sequence i holds the first lens[i] tokens of old sequence source_seqs[i]."""
        old = self.pool
        if old is None:
            self.num_seqs = len(source_seqs)
            return
        if lens is None:
            lens = [old.seq_len(s) for s in source_seqs]
        if self.max_tokens is not None:
            num_blocks = old.num_blocks  # fixed: reserve below raises CacheFullError if the copy does not fit
        elif num_blocks is None:
            num_blocks = max(old.num_blocks, sum(blocks_for(n, self.block_size) for n in lens))
        new = self._new_pool(len(source_seqs), num_blocks, old.dtype, old.device)
        dst = new.reserve(range(len(source_seqs)), lens)
        src = self._slots_of(old, source_seqs, lens)
        for layer in range(self.num_layers):
            for new_pages, old_pages in ((new.k_pools[layer], old.k_pools[layer]),
                                         (new.v_pools[layer], old.v_pools[layer])):
                rows = old_pages.view(-1, self.num_heads, self.head_dim).index_select(0, src)
                new_pages.view(-1, self.num_heads, self.head_dim).index_copy_(0, dst, rows)
        self.pool, self.num_seqs = new, len(source_seqs)

    def _reserve(self, counts):
        try:
            return self.pool.reserve(range(self.num_seqs), counts)
        except CacheFullError as err:
            if self.max_tokens is not None:
                err.args = (f"{err.args[0]} (kvkernels.patch(model, max_tokens={self.max_tokens}) fixed the pool at "
                            f"{self.pool.num_blocks * self.block_size} tokens; raise max_tokens, or leave it None to "
                            "size the pool from the batch and max_new_tokens)",)
                raise
        lens = [self.pool.seq_len(s) for s in range(self.num_seqs)]
        total = sum(blocks_for(n + c, self.block_size) for n, c in zip(lens, counts))
        self._rebuild(list(range(self.num_seqs)), lens, num_blocks=max(2 * self.pool.num_blocks, total))
        return self.pool.reserve(range(self.num_seqs), counts)

    # -- one forward call ---------------------------------------------------------------------

    def begin_step(self, batch: int, num_new: int, attention_mask, dtype, device):
        """Reserves slots for the real tokens among `num_new` new columns of each of `batch` sequences.

        attention_mask: None (every token real) or [batch, seen + num_new] of 0/1 (HF's 2D padding mask).
        """
        if self.pool is None:
            self._allocate(batch, num_new, dtype, device)
        elif batch != self.num_seqs:
            raise ValueError(f"this PagedGPT2Cache holds {self.num_seqs} sequences but the input has batch {batch}")
        if torch.device(device) != self.pool.device:
            raise ValueError(f"the cache lives on {self.pool.device} but the input is on {device}")
        keep = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, self.seen_tokens + num_new):
                raise ValueError(f"attention_mask must be 2D [batch={batch}, past + new = "
                                 f"{self.seen_tokens + num_new}] with a paged cache, got {tuple(attention_mask.shape)}")
            new_columns = attention_mask[:, -num_new:].to("cpu").bool()                          # [B, T]
            if not bool(new_columns.all()):
                keep = new_columns
        lens_before = [self.pool.seq_len(s) for s in range(batch)]
        counts = [num_new] * batch if keep is None else keep.sum(1).tolist()
        slots = self._reserve(counts)
        if keep is not None:
            full = torch.full((batch * num_new,), -1, dtype=torch.int64, device=slots.device)
            slots = full.masked_scatter_(keep.reshape(-1).to(slots.device), slots)
        decode = num_new == 1 and keep is None
        # Only the table columns the longest sequence uses: the kernels' work (and Triton's split count)
        # then follows the actual lengths, not n_positions.
        table_blocks = max(blocks_for(max(n + c for n, c in zip(lens_before, counts)), self.block_size), 1)
        attn_mask = None
        if not decode:
            # Query t of sequence b sees the real tokens up to and including its column: its length so far.
            seen_by_query = (torch.ones(batch, num_new, dtype=torch.long) if keep is None else keep.long()).cumsum(1)
            visible = (torch.tensor(lens_before)[:, None] + seen_by_query).clamp(min=1)           # [B, T]
            keys = torch.arange(table_blocks * self.block_size, device=self.pool.device)
            attn_mask = keys[None, None, None, :] < visible.to(self.pool.device)[:, None, :, None]  # [B, 1, T, L]
        self.step = _Step(num_new, slots, decode, attn_mask, table_blocks, lens_before)

    def end_step(self):
        self.seen_tokens += self.step.num_new
        self.step = None

    def abort_step(self):
        """Undoes a step whose forward failed: drops its reserved tokens, keeps everything before."""
        if self.step is not None and self.pool is not None:
            self._rebuild(list(range(self.num_seqs)), self.step.lens_before)
        self.step = None

    # -- what the patched attention calls, layer by layer -------------------------------------

    def attend(self, layer: int, query, key, value, scale: float, upcast: bool):
        """Writes this step's key/value and returns the attention output.

        query, key, value: [B, T, H, D] in the model's dtype. Returns [B, T, H, D] in query's dtype.
        """
        step = self.step
        if step is None or step.num_new != query.shape[1]:
            raise RuntimeError("PagedGPT2Cache used outside a forward prepared by kvkernels.patch: call the patched "
                               "model (or its .transformer), not its attention modules directly")
        batch, num_new, heads, dim = query.shape
        pool = self.pool
        k_pages, v_pages = pool.k_pools[layer], pool.v_pools[layer]
        write_kv_cache(key.reshape(batch * num_new, heads, dim).to(pool.dtype),
                       value.reshape(batch * num_new, heads, dim).to(pool.dtype),
                       k_pages, v_pages, step.slot_mapping, backend=self.backend, validate=False)
        tables, lens = pool.block_tables[:batch, :step.table_blocks], pool.seq_lens[:batch]
        if step.decode:
            out = paged_decode_attention(query.reshape(batch, heads, dim).to(pool.dtype), k_pages, v_pages, tables,
                                         lens, scale=scale, backend=self.backend, validate=False)  # [B, H, D]
            return out.to(query.dtype).view(batch, 1, heads, dim)
        keys, _ = gather_kv(k_pages, tables, lens)                                              # [B, L, H, D]
        values, _ = gather_kv(v_pages, tables, lens)
        compute = torch.float32 if upcast else query.dtype
        out = F.scaled_dot_product_attention(query.transpose(1, 2).to(compute), keys.transpose(1, 2).to(compute),
                                             values.transpose(1, 2).to(compute), attn_mask=step.attn_mask,
                                             scale=scale)                                       # [B, H, T, D]
        return out.transpose(1, 2).to(query.dtype)
