"""PagedCache: a Hugging Face `Cache` whose keys and values live in a kvkernels.PagedKVCache.

HF's generate loop and the decoder model ask a cache for lengths (get_seq_length, get_mask_sizes), beam reordering and,
for assisted decoding, `crop`. During a step that kvkernels.patch opened, each attention layer's `update` passes the new
keys and values through untouched and the "kvkernels" attention function (kvkernels.hf.attention) calls `attend`, which
writes them and attends. Each sequence stores only its real tokens: left padding and any masked column never reach the
pool. The cache remembers which columns each sequence stored (`columns`), so that a later mask may hide a stored column
(honoured exactly), `crop` knows what to drop, sliding windows count columns as HF does, and `layers[i].keys` /
`.values` can show HF's padded layout.

Per forward call (a "step"), the patch calls `begin_step` with the step's 2D mask; the cache reserves the new real
tokens' slots on the host, then each layer's `attend` writes the new K/V with kvkernels.write_kv_cache and attends:
    * one real token per sequence, nothing hidden -> the paged decode kernel over the pages (grouped-query heads read
      their shared KV head): a kvkernels.DecodePlan per step settles the checks and the backend for every layer, and
      for Triton the split count (one launch per layer: a split merges in it; the CUDA backend launches its merge
      apart); under a sliding window the kernel starts each sequence at its first token
      inside the window and never reads the pages before it;
    * anything else (prompt, continuation, padding, hidden columns) -> gather the sequences' pages and run SDPA with
      a per-query mask: HF's causal, padding and sliding-window mask over the unpadded layout.
A query that sees no token at all (a left-padding position) gets what the model's attention implementation
gives there: zeros for sdpa (torch >= 2.5), the mean of the step's values for eager (exact when no earlier
call had padding: padding K/V are never stored).

What it does not do of HF's Cache contract: offloading, static shapes / torch.compile (is_compileable is
False); padding columns read back through `keys` / `values` are zeros. One (KV heads, head dim) for every layer.
"""
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from .._validate import is_quantized
from ..cache import CacheFullError, PagedKVCache
from ..gpt2_common import blocks_for
from ..ops import DecodePlan, resolve_backend
from ..reference import gather_kv


@dataclass(frozen=True)
class AttentionShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    max_positions_name: str     # what the config calls it (GPT-2: n_positions), for error messages


def attention_shape(config) -> AttentionShape:
    """The decoder's attention sizes from its (text) config, or a ValueError naming what the config lacks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [name for name in ("num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings")
               if getattr(text, name, None) is None]
    if missing:
        raise ValueError(f"kvkernels cannot size a paged cache for {type(config).__name__}: its config has no "
                         f"{', '.join(missing)}")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    name = getattr(text, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
    return AttentionShape(text.num_hidden_layers, heads, kv_heads, head_dim, text.max_position_embeddings, name)


def _window(config, layer_is_windowed):
    """The config's sliding window (in tokens) if `layer_is_windowed(layer_types)` holds, else None. Read as
    transformers' caches read it: `layer_types` where the config lists them, else one `sliding_window` for all
    layers (Mistral, Phi3)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if window is None or (layer_types is not None and not layer_is_windowed(layer_types)):
        return None
    return int(window)


def shared_window(config):
    """The sliding window every attention layer of the decoder attends within, or None when some layer sees the
    whole context."""
    return _window(config, lambda layer_types: all(t == "sliding_attention" for t in layer_types))


def any_window(config):
    """The sliding window some attention layer of the decoder attends within, or None when every layer sees the
    whole context."""
    return _window(config, lambda layer_types: "sliding_attention" in layer_types)


class _PagedLayer(CacheLayerMixin):
    """Per-layer view HF's Cache machinery expects; every answer comes from the owning PagedCache."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, owner, layer_idx):
        # CacheLayerMixin.__init__ would assign keys/values, which are read-only views of the pool here.
        self._owner = weakref.ref(owner)  # no reference cycle: the pool is freed as soon as the cache is dropped
        self.layer_idx = layer_idx

    @property
    def is_initialized(self):
        return self._owner().pool is not None

    @property
    def keys(self):
        """[B, H, seen, D]: the cached keys in HF's padded column layout (zeros at columns never stored)."""
        return self._owner().logical_kv(self.layer_idx, values=False)

    @property
    def values(self):
        return self._owner().logical_kv(self.layer_idx, values=True)

    def lazy_initialization(self, key_states, value_states):
        raise RuntimeError("PagedCache layers are never initialised by HF code")

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner().update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length):
        return self._owner().get_mask_sizes(query_length)

    def get_seq_length(self):
        return self._owner().get_seq_length()

    def get_max_length(self):
        return -1

    def offload(self):
        raise NotImplementedError("PagedCache does not offload")

    def prefetch(self):
        raise NotImplementedError("PagedCache does not offload")


@dataclass
class _Step:
    num_new: int                 # T, new columns in this forward
    slot_mapping: torch.Tensor   # int64 [B * T], -1 for padding tokens
    decode: bool                 # every sequence adds exactly one real token and no stored column is hidden
    hidden_keys: torch.Tensor    # bool [B, L] on the host, or None: stored tokens the mask hides in this step
    new_real: torch.Tensor       # bool [B, T] on the host: which new columns are stored
    table_blocks: int            # block-table columns covering the longest sequence after the step
    lens_before: list            # host lengths before the step, to roll back on failure
    masks: dict = field(default_factory=dict)      # window -> (attn_mask [B, 1, T, L], blind [B, T, 1, 1])
    starts: dict = field(default_factory=dict)     # window -> int64 [B, T] first stored token seen, or None
    decode_starts: dict = field(default_factory=dict)  # window -> the same for a decode step: int32 [B] on the device
    decode_plans: dict = field(default_factory=dict)   # window -> the DecodePlan its layers share in a decode step
    updated: set = field(default_factory=set)      # layers whose `update` passed K/V through in this step
    attended: set = field(default_factory=set)     # layers `attend` served in this step


class PagedCache(Cache):
    """Paged K/V for the attention layers of one Hugging Face decoder, for `num_seqs` sequences (fixed by the first
    step). `config`: the model's config (any decoder kvkernels.patch serves: GPT-2, Llama, Mistral, Qwen2/3, Phi3, ...).

    `max_tokens` fixes the pool (CacheFullError past it); otherwise the pool starts at `planned_tokens`
    (or what the first step needs) and doubles when a step needs more. get_seq_length() is HF's notion
    of length: the columns seen so far, padding included; each sequence's stored length is its real tokens.
    A query that sees nothing gets the eager implementation's output if the config asks for eager, else sdpa's.
    """

    def __init__(self, config, *, num_seqs=None, planned_tokens=None, max_tokens=None, block_size=16,
                 backend="auto", cache_dtype=None, position_limit=None, k_scale=None, v_scale=None):
        shape = attention_shape(config)
        super().__init__(layers=[_PagedLayer(self, i) for i in range(shape.num_layers)])
        self.num_layers, self.num_heads, self.num_kv_heads = shape.num_layers, shape.num_heads, shape.num_kv_heads
        self.head_dim = shape.head_dim
        # A learned position table (GPT-2's wpe) caps a sequence; rotary models have no cap, so the block table then
        # spans the whole pool and widens as it grows.
        self.position_limit = position_limit
        self.eager_padding_rows = getattr(config, "_attn_implementation", None) == "eager"
        self.num_seqs, self.planned_tokens, self.max_tokens = num_seqs, planned_tokens, max_tokens
        self.block_size, self.backend, self.cache_dtype = block_size, backend, cache_dtype
        self.k_scale, self.v_scale = k_scale, v_scale     # static per (layer, KV head) scales, or None: per token
        self.pool = None
        self.seen_tokens = 0
        self.columns = None      # bool [num_seqs, seen_tokens] on the host: the columns each sequence stored
        self._stored_every_column = True   # no stored column was padding (False can outlive the padded columns or rows
                                           # after a crop, beam reorder or selection: only slower, never wrong)
        self.step = None
        self._hf_step_slots = None

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
        self.seen_tokens, self.step, self.columns = 0, None, None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: sequence i continues from sequence beam_idx[i] (a copy, as blocks have one owner)."""
        self._rebuild([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int):
        self._rebuild([seq for seq in range(self.num_seqs) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor):
        self._rebuild([int(i) for i in indices.tolist()])

    def crop(self, max_length: int):
        """HF's crop: max_length > 0 keeps the first max_length columns, max_length <= 0 removes the last
        -max_length. Each sequence keeps its stored tokens among the kept columns; whole blocks past them go
        back to the pool."""
        keep = max_length if max_length > 0 else self.seen_tokens + max_length
        keep = max(keep, 0)
        if keep >= self.seen_tokens:
            return
        if self.pool is not None:
            self.columns = self.columns[:, :keep]
            self.pool.truncate(range(self.num_seqs), self.columns.sum(1).tolist())
        self.seen_tokens = keep

    def logical_kv(self, layer: int, values: bool):
        """[B, H, seen, D] keys (or values) of `layer` in HF's padded layout; zeros where nothing was stored."""
        if self.columns is None:
            return None
        pool = self.pool
        lens = [pool.seq_len(s) for s in range(self.num_seqs)]
        rows = pool.read(layer, self._slots_of(pool, range(self.num_seqs), lens))[int(values)]
        out = rows.new_zeros(self.num_seqs, self.seen_tokens, self.num_kv_heads, self.head_dim)
        out[self.columns.to(pool.device)] = rows                 # row-major order = sequence by sequence
        return out.transpose(1, 2)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Inside a kvkernels step: returns the new states as they are (`attend` stores them). Otherwise HF's own
        attention writing into this cache (the model was unpatched after the cache was made): every new column is
        stored. key_states, value_states: [B, H, T, D]. Returns the keys and values of every column
        so far, [B, H, seen, D], as DynamicCache does."""
        if self.step is not None:
            # A step kvkernels.patch opened: the "kvkernels" attention function writes and attends (`attend`).
            self.step.updated.add(layer_idx)
            return key_states, value_states
        batch, _, num_new, _ = key_states.shape
        if layer_idx == 0:          # HF runs the layers in order: layer 0 opens the step
            if self.pool is None:
                self._allocate(batch, num_new, key_states.dtype, key_states.device)
            self._hf_step_slots = self._reserve([num_new] * batch)
            self.seen_tokens += num_new
            self._append_columns(torch.ones(batch, num_new, dtype=torch.bool))
        pool = self.pool
        pool.append(layer_idx,
                    key_states.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim).to(pool.dtype),
                    value_states.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim).to(pool.dtype),
                    self._hf_step_slots)
        return (self.logical_kv(layer_idx, values=False).to(key_states.dtype),
                self.logical_kv(layer_idx, values=True).to(value_states.dtype))

    # -- pool management ----------------------------------------------------------------------

    def memory(self):
        return None if self.pool is None else self.pool.memory()

    def _new_pool(self, num_seqs, num_blocks, dtype, device):
        """dtype: the model's (what k, v and q come in as); the pages are cache_dtype's."""
        quantized = is_quantized(self.cache_dtype)
        return PagedKVCache(self.num_layers, self.num_kv_heads, self.head_dim, max_batch_size=num_seqs,
                            num_blocks=num_blocks, block_size=self.block_size,
                            max_blocks_per_seq=blocks_for(self.position_limit or num_blocks * self.block_size,
                                                          self.block_size),
                            dtype=dtype if quantized else self.cache_dtype or dtype, device=device,
                            backend=self.backend, cache_dtype=self.cache_dtype if quantized else None,
                            k_scale=self.k_scale, v_scale=self.v_scale)

    def _allocate(self, num_seqs, num_tokens_first_step, dtype, device):
        self.backend = resolve_backend(self.backend, device, quantized=is_quantized(self.cache_dtype))
        if self.max_tokens is not None:
            num_blocks = blocks_for(self.max_tokens, self.block_size)
        else:
            want = max(self.planned_tokens or 0, num_seqs * num_tokens_first_step)
            num_blocks = max(num_seqs * blocks_for(max(want // num_seqs, 1), self.block_size), 1)
        self.pool = self._new_pool(num_seqs, num_blocks, dtype, device)
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
            for new_rows, old_rows in zip(new.slot_tensors(layer), old.slot_tensors(layer)):  # pages and scales
                new_rows.index_copy_(0, dst, old_rows.index_select(0, src))
        self.pool, self.num_seqs = new, len(source_seqs)
        if self.columns is not None:
            self.columns = self.columns[source_seqs]

    def _reserve(self, counts):
        lens = self.pool.seq_lens_host()[:self.num_seqs]
        needed = [blocks_for(n + c, self.block_size) for n, c in zip(lens, counts)]
        try:
            if max(needed) > self.pool.max_blocks_per_seq and self.position_limit is None:
                # The table spans the pool: a sequence outgrowing it outgrows the pool.
                raise CacheFullError(max(needed), self.pool.allocator.num_free, self.pool.num_blocks)
            return self.pool.reserve(range(self.num_seqs), counts)
        except CacheFullError as err:
            if self.max_tokens is not None:
                err.args = (f"{err.args[0]} (kvkernels.patch(model, max_tokens={self.max_tokens}) fixed the pool at "
                            f"{self.pool.num_blocks * self.block_size} tokens; raise max_tokens, or leave it None to "
                            "size the pool from the batch and max_new_tokens)",)
                raise
        self._rebuild(list(range(self.num_seqs)), lens, num_blocks=max(2 * self.pool.num_blocks, sum(needed)))
        return self.pool.reserve(range(self.num_seqs), counts)

    # -- one forward call ---------------------------------------------------------------------

    def begin_step(self, batch: int, num_new: int, attention_mask, dtype, device):
        """Reserves slots for the real tokens among `num_new` new columns of each of `batch` sequences.

        attention_mask: None (every token real) or [batch, seen + num_new] of 0/1 (HF's 2D padding mask). A 0 over
        a stored column hides it for this step; a 1 over a column that was padding when it was new is an error
        (its K/V were never stored).
        """
        if self.pool is None:
            self._allocate(batch, num_new, dtype, device)
        elif batch != self.num_seqs:
            raise ValueError(f"this PagedCache holds {self.num_seqs} sequences but the input has batch {batch}")
        if torch.device(device) != self.pool.device:
            raise ValueError(f"the cache lives on {self.pool.device} but the input is on {device}")
        seen = self.seen_tokens
        new_real = torch.ones(batch, num_new, dtype=torch.bool)
        hidden = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seen + num_new):
                raise ValueError(f"attention_mask must be 2D [batch={batch}, past + new = {seen + num_new}] with a "
                                 f"paged cache, got {tuple(attention_mask.shape)}")
            mask = (attention_mask != 0).to("cpu")                                               # [B, seen + T]
            new_real = mask[:, seen:]
            # The usual step (every column real, none ever padding) has nothing to revive or hide.
            if seen and not (self._stored_every_column and bool(mask.all())):
                past = mask[:, :seen]
                revived = past & ~self.columns
                if bool(revived.any()):
                    row, column = revived.nonzero()[0].tolist()
                    raise ValueError(f"attention_mask marks column {column} of sequence {row} as real, but it was "
                                     "padding (0) when it was new, so the paged cache never stored its key/value. "
                                     "Unmasking an earlier padding column needs HF's own cache: pass a DynamicCache")
                hidden = self.columns & ~past
                hidden = hidden if bool(hidden.any()) else None
        lens_before = self.pool.seq_lens_host()[:batch]
        all_real = bool(new_real.all())
        counts = [num_new] * batch if all_real else new_real.sum(1).tolist()
        slots = self._reserve(counts)
        if not all_real:
            full = torch.full((batch * num_new,), -1, dtype=torch.int64, device=slots.device)
            slots = full.masked_scatter_(new_real.reshape(-1).to(slots.device), slots)
        decode = num_new == 1 and all_real and hidden is None
        # Only the table columns the longest sequence uses: the kernels' work (and Triton's split count)
        # then follows the actual lengths, not the model's maximum.
        table_blocks = max(blocks_for(max(n + c for n, c in zip(lens_before, counts)), self.block_size), 1)
        hidden_keys = None
        if hidden is not None:
            hidden_keys = torch.zeros(batch, table_blocks * self.block_size, dtype=torch.bool)
            for row in range(batch):
                stored = hidden[row][self.columns[row]]              # the hidden flags of row's stored tokens
                hidden_keys[row, :stored.numel()] = stored
        self.step = _Step(num_new, slots, decode, hidden_keys, new_real, table_blocks, lens_before)

    def end_step(self):
        skipped = sorted(self.step.updated - self.step.attended)
        if skipped:
            self.abort_step()
            raise RuntimeError(f"attention layer(s) {skipped} updated the paged cache but did not call transformers' "
                               "attention function (ALL_ATTENTION_FUNCTIONS): kvkernels cannot serve this model's "
                               "attention; call kvkernels.unpatch(model)")
        self.seen_tokens += self.step.num_new
        self._append_columns(self.step.new_real)
        self.step = None

    def abort_step(self):
        """Undoes a step whose forward failed: drops its reserved tokens, keeps everything before."""
        if self.step is not None and self.pool is not None:
            self._rebuild(list(range(self.num_seqs)), self.step.lens_before)
        self.step = None

    def _append_columns(self, new_real):
        self._stored_every_column = (self.columns is None or self._stored_every_column) and bool(new_real.all())
        self.columns = new_real.clone() if self.columns is None else torch.cat([self.columns, new_real], dim=1)

    # -- what the patched attention calls, layer by layer -------------------------------------

    def window_starts(self, window):
        """int64 [B, T] on the host: the first stored token query t of each sequence sees under HF's sliding window of
        `window` columns (key column > query column - window, padding columns counted), or None when the window
        hides no stored token in this step."""
        step = self.step
        if window is None:
            return None
        if window not in step.starts:
            stored = torch.cat([self.columns, step.new_real], dim=1) if self.columns is not None else step.new_real
            stored_before = torch.cat([torch.zeros(stored.shape[0], 1, dtype=torch.long), stored.long().cumsum(1)], 1)
            first_column = (self.seen_tokens + torch.arange(step.num_new) - window + 1).clamp(min=0)          # [T]
            starts = stored_before[:, first_column]                                                        # [B, T]
            step.starts[window] = starts if bool(starts.any()) else None
        return step.starts[window]

    def _decode_starts(self, window):
        """int32 [B] on the pool's device: each sequence's first stored token inside `window` for a decode step, or
        None when the window hides nothing."""
        step = self.step
        if window not in step.decode_starts:
            starts = self.window_starts(window)
            step.decode_starts[window] = None if starts is None else starts[:, 0].to(self.pool.device, torch.int32)
        return step.decode_starts[window]

    def _mask(self, window):
        """(attn_mask bool [B, 1, T, L], blind bool [B, T, 1, 1]) on the pool's device for this step's queries."""
        step = self.step
        if window not in step.masks:
            keys = torch.arange(step.table_blocks * self.block_size)
            # Query t of sequence b sees the stored tokens up to and including its column (its length so far).
            visible = torch.tensor(step.lens_before)[:, None] + step.new_real.long().cumsum(1)          # [B, T]
            host_mask = keys[None, None, :] < visible[:, :, None]                                      # [B, T, L]
            starts = self.window_starts(window)
            if starts is not None:
                host_mask &= keys[None, None, :] >= starts[:, :, None]
            if step.hidden_keys is not None:
                host_mask &= ~step.hidden_keys[:, None, :]
            device = self.pool.device
            step.masks[window] = (host_mask[:, None].to(device), (~host_mask.any(-1))[:, :, None, None].to(device))
        return step.masks[window]

    # -- what the "kvkernels" attention function calls, layer by layer ------------------------

    def attend(self, layer: int, query, key, value, scale: float, upcast: bool = False, window: int = None):
        """Writes this step's key/value and returns the attention output.

        query: [B, T, H, D], key, value: [B, T, H_kv, D], in the model's dtype. window: HF's sliding window (columns)
        of this layer, or None. upcast: softmax in fp32 (GPT-2's reorder_and_upcast_attn under eager).
        Returns [B, T, H, D] in query's dtype.
        """
        step = self.step
        if step is None or step.num_new != query.shape[1]:
            raise RuntimeError("PagedCache used outside a forward prepared by kvkernels.patch: call the patched "
                               "model, not its attention modules directly")
        batch, num_new, heads, dim = query.shape
        if tuple(key.shape[2:]) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"layer {layer} gives {key.shape[2]} key/value heads of dim {key.shape[3]}, but the cache "
                             f"was sized from the config for {self.num_kv_heads} of dim {self.head_dim}")
        step.attended.add(layer)
        pool = self.pool
        k_pages, v_pages = pool.k_pools[layer], pool.v_pools[layer]
        k_scale, v_scale = pool.k_scales[layer], pool.v_scales[layer]                # None unless fp8 / int8
        pool.append(layer, key.reshape(batch * num_new, self.num_kv_heads, dim).to(pool.dtype),
                    value.reshape(batch * num_new, self.num_kv_heads, dim).to(pool.dtype), step.slot_mapping)
        tables, lens = pool.block_tables[:batch, :step.table_blocks], pool.seq_lens[:batch]
        if step.decode:
            q = query.reshape(batch, heads, dim).to(pool.dtype)                                     # [B, H, D]
            plan = step.decode_plans.get(window)
            if plan is None or not plan.matches(q, k_pages, v_pages, k_scale, v_scale):
                # Checks, backend and split count once per step, not per layer (the layers share the tables).
                starts = self._decode_starts(window)
                # The CUDA kernel has no window start; Triton runs wherever CUDA does.
                backend = "triton" if starts is not None and self.backend == "cuda" else self.backend
                plan = step.decode_plans[window] = DecodePlan(
                    q, k_pages, v_pages, tables, lens, k_scale=k_scale, v_scale=v_scale, backend=backend,
                    validate=False, seq_starts=starts, split_counters=pool.split_counters[:batch])
            out = plan.run(q, k_pages, v_pages, scale=scale, k_scale=k_scale, v_scale=v_scale)  # [B, H, D]
            return out.to(query.dtype).view(batch, 1, heads, dim)
        attn_mask, blind = self._mask(window)
        group = heads // self.num_kv_heads
        # prefill reads the pages too: quantized ones come back dequantized, as the decode kernels see them
        keys, _ = gather_kv(k_pages, tables, lens, k_scale)                                     # [B, L, H_kv, D]
        values, _ = gather_kv(v_pages, tables, lens, v_scale)
        compute = torch.float32 if upcast else query.dtype
        # A query that sees nothing gets 0 from SDPA (torch >= 2.5), as under HF's sdpa.
        out = F.scaled_dot_product_attention(query.transpose(1, 2).to(compute),
                                             keys.repeat_interleave(group, dim=2).transpose(1, 2).to(compute),
                                             values.repeat_interleave(group, dim=2).transpose(1, 2).to(compute),
                                             attn_mask=attn_mask, scale=scale).transpose(1, 2)  # [B, T, H, D]
        if self.eager_padding_rows:
            # HF eager adds the dtype's minimum to every masked score: a row that sees nothing is uniform over
            # all seen + T columns. The stored ones plus this step's padding columns (earlier padding is not stored).
            padding = ~step.new_real.to(value.device)                                           # [B, T]
            total = values.sum(1) + (value * padding[:, :, None, None]).sum(1)                  # [B, H_kv, D]
            mean = (total / (self.seen_tokens + num_new)).to(out.dtype).repeat_interleave(group, dim=1)
            out = torch.where(blind, mean[:, None], out)
        return out.to(query.dtype)
