"""PagedKVCache: preallocated per-layer K/V block pools, a block allocator, block tables and lengths.

Layout per layer (NHD pages, what the kernels read):
    k_pools[layer], v_pools[layer]   [num_blocks, block_size, H_kv, D]
    k_scales[layer], v_scales[layer] fp8 / int8 pages only: fp32 [num_blocks, block_size, H_kv] (one scale per
                                     cached token and KV head, addressed by the same slots) or [H_kv] (static)
    block_tables                     int32 [max_batch_size, max_blocks_per_seq]  (device)
    seq_lens                         int32 [max_batch_size]                      (device)
    split_counters                   int32 [max_batch_size, H_kv], zero          (device): a split decode's merge
The allocator and a host mirror of tables and lengths live on the host, so appending tokens never
reads the device. Only the rows of active sequences are meaningful to the kernels.
"""
import numbers
from dataclasses import dataclass

import torch

from ._validate import is_quantized, resolve_cache_dtype
from .gpt2_common import check_positive_int
from .ops import BACKENDS, paged_decode_attention, write_kv_cache


# The dtypes the decode kernels compute in (fp32 accumulation).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CacheFullError(RuntimeError):
    """Raised when an append needs more free blocks than the pool has. Nothing cached is lost."""

    def __init__(self, needed: int, free: int, num_blocks: int):
        self.needed, self.free, self.num_blocks = needed, free, num_blocks
        super().__init__(f"paged KV cache is out of blocks: this append needs {needed} new block(s) but only "
                         f"{free} of {num_blocks} are free; free finished sequences or build a larger cache")


class BlockAllocator:
    """Hands out physical block ids from a free list; each id is owned by at most one sequence."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._in_use = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return len(self._in_use)

    def allocate(self, n: int) -> list:
        """n distinct free block ids, or CacheFullError with nothing taken."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise CacheFullError(n, len(self._free), self.num_blocks)
        blocks = [self._free.pop() for _ in range(n)]
        self._in_use.update(blocks)
        return blocks

    def free(self, blocks) -> None:
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise ValueError("the same block id was given twice to free()")
        for b in blocks:
            if b not in self._in_use:
                raise ValueError(f"block {b} is not allocated")
        for b in blocks:
            self._in_use.remove(b)
            self._free.append(b)


@dataclass(frozen=True)
class CacheMemory:
    num_blocks: int
    blocks_in_use: int
    bytes_per_token: int        # K + V over all layers
    bytes_per_block: int
    total_bytes: int

    def __str__(self):
        return (f"{self.blocks_in_use}/{self.num_blocks} blocks in use, {self.bytes_per_token} B/token, "
                f"{self.total_bytes / 2**20:.1f} MiB pooled")


class PagedKVCache:
    """Per-layer paged K/V pools shared by up to `max_batch_size` sequences (slots 0..max_batch_size-1).

    Size the pool with exactly one of `num_blocks`, `max_tokens` (rounded up to whole blocks) or
    `memory_bytes` (K + V over all layers, scales included). `max_blocks_per_seq` fixes the block-table
    width, so shapes stay static for CUDA graphs; by default it covers the whole pool.

    `dtype` is what k, v and q come in as. `cache_dtype` "fp8" / torch.float8_e4m3fn or "int8" / torch.int8
    stores the pages quantized (1 byte per element): each written row of each KV head gets an fp32 scale
    (absmax x (1 / 448) for fp8, x (1 / 127) for int8) in k_scales / v_scales, so the same memory holds ~2x the
    tokens of fp16 at a small accuracy cost (BENCHMARKS.md, "Quantized KV"). `k_scale`, `v_scale` (floats, or fp32
    tensors broadcastable to [num_layers, H_kv]) make the scales static per layer and head instead (vLLM's
    k_scale / v_scale: values past 448 x scale or 127 x scale saturate).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, max_batch_size: int,
                 num_blocks: int = None, max_tokens: int = None, memory_bytes: int = None,
                 block_size: int = 16, max_blocks_per_seq: int = None,
                 dtype=torch.float16, device="cpu", backend: str = "auto", cache_dtype=None, k_scale=None,
                 v_scale=None):
        if sum(x is not None for x in (num_blocks, max_tokens, memory_bytes)) != 1:
            raise ValueError("give exactly one of num_blocks, max_tokens, memory_bytes")
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_batch_size", max_batch_size), ("block_size", block_size)):
            check_positive_int(name, value)
        for name, value in (("num_blocks", num_blocks), ("max_tokens", max_tokens), ("memory_bytes", memory_bytes),
                            ("max_blocks_per_seq", max_blocks_per_seq)):
            check_positive_int(name, value, allow_none=True)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(map(str, DTYPES))} (what the kernels compute in), "
                            f"got {dtype!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.max_batch_size = block_size, max_batch_size
        self.dtype, self.device, self.backend = dtype, torch.device(device), backend
        self.cache_dtype = _page_dtype(cache_dtype, dtype)
        self.quantized = is_quantized(self.cache_dtype)
        static = static_scales(k_scale, v_scale, self.quantized, num_layers, num_kv_heads, self.device)
        scale_bytes = 0 if static or not self.quantized else 4                   # fp32 per token and KV head
        element = self.cache_dtype.itemsize
        self.bytes_per_token = 2 * num_layers * num_kv_heads * (head_dim * element + scale_bytes)
        if max_tokens is not None:
            num_blocks = -(-max_tokens // block_size)
        elif memory_bytes is not None:
            num_blocks = memory_bytes // (self.bytes_per_token * block_size)
            if num_blocks < 1:
                raise ValueError(f"memory_bytes={memory_bytes} holds no block of {self.bytes_per_token * block_size} B")
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = num_blocks if max_blocks_per_seq is None else max_blocks_per_seq
        pool_shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_pools = [torch.empty(pool_shape, dtype=self.cache_dtype, device=self.device)
                        for _ in range(num_layers)]
        self.v_pools = [torch.empty(pool_shape, dtype=self.cache_dtype, device=self.device)
                        for _ in range(num_layers)]
        if static:
            self.k_scales, self.v_scales = static
        elif self.quantized:
            self.k_scales, self.v_scales = ([torch.empty(pool_shape[:3], device=self.device) for _ in range(num_layers)]
                                            for _ in range(2))
        else:
            self.k_scales = self.v_scales = [None] * num_layers
        self.block_tables = torch.zeros(max_batch_size, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=self.device)
        # A split Triton decode's counters (int32 [max_batch_size, H_kv]): its last program per (sequence, KV head)
        # merges the partitions, in the same launch. Zero before and after each decode; one decode at a time.
        self.split_counters = torch.zeros(max_batch_size, num_kv_heads, dtype=torch.int32, device=self.device)
        self._tables = [[] for _ in range(max_batch_size)]   # host mirror of block_tables rows
        self._lens = [0] * max_batch_size                     # host mirror of seq_lens

    # -- bookkeeping ---------------------------------------------------------------------------

    def seq_len(self, seq: int) -> int:
        self._check_slots([seq], "seq")
        return self._lens[seq]

    def seq_lens_host(self) -> list:
        """The host mirror of seq_lens, every slot (a copy): no device read."""
        return list(self._lens)

    def _check_slots(self, seqs, name: str) -> None:
        """Slots index host lists: a negative one would silently mean another sequence."""
        if all(type(seq) is int for seq in seqs) and (not seqs or 0 <= min(seqs) and max(seqs) < self.max_batch_size):
            return  # plain ints in range: the usual case, checked without a per-slot isinstance (this runs per step)
        for seq in seqs:
            if isinstance(seq, bool) or not isinstance(seq, numbers.Integral):
                raise TypeError(f"{name}: sequence slots are ints, got {seq!r}")
            if not 0 <= seq < self.max_batch_size:
                raise ValueError(f"{name}: sequence slot {seq} is outside [0, {self.max_batch_size}) "
                                 f"(max_batch_size={self.max_batch_size})")

    def _check_layer(self, layer) -> None:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.num_layers:  # -1 would silently read the last layer's pool
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers}) (num_layers={self.num_layers})")

    def memory(self) -> CacheMemory:
        per_block = self.bytes_per_token * self.block_size
        return CacheMemory(self.num_blocks, self.allocator.num_in_use, self.bytes_per_token, per_block,
                           per_block * self.num_blocks)

    def reserve(self, seqs, num_new_tokens) -> torch.Tensor:
        """Makes room for `num_new_tokens[i]` more tokens in sequence slot `seqs[i]`.

        Allocates blocks as needed (all or nothing), advances the lengths and returns the int64
        slot_mapping [sum(num_new_tokens)] for `append`, sequence by sequence in order.
        """
        seqs, counts = list(seqs), list(num_new_tokens)
        if len(seqs) != len(counts) or len(set(seqs)) != len(seqs):
            raise ValueError("seqs must be distinct and match num_new_tokens one to one")
        self._check_slots(seqs, "seqs")
        plan = []
        for seq, n in zip(seqs, counts):
            if n < 0:
                raise ValueError(f"num_new_tokens must be >= 0, got {n}")
            new_len = self._lens[seq] + n
            blocks_needed = -(-new_len // self.block_size)
            if blocks_needed > self.max_blocks_per_seq:
                raise ValueError(f"sequence {seq} would hold {new_len} tokens, more than the block table covers "
                                 f"({self.max_blocks_per_seq} x {self.block_size})")
            plan.append((seq, n, blocks_needed - len(self._tables[seq])))
        new_blocks = self.allocator.allocate(sum(extra for _, _, extra in plan))  # raises before any change
        slots = []
        grown = [seq for seq, _, extra in plan if extra]
        for seq, n, extra in plan:
            table = self._tables[seq]
            table.extend(new_blocks[:extra])
            del new_blocks[:extra]
            start = self._lens[seq]
            slots.extend(table[pos // self.block_size] * self.block_size + pos % self.block_size
                         for pos in range(start, start + n))
            self._lens[seq] = start + n
        self._sync_rows(seqs, table_seqs=grown)
        return torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)

    def reserve_ring(self, seqs, num_tokens, ring_blocks: int) -> None:
        """Sliding-window sequences: empty sequence slot seqs[i] gets `ring_blocks` blocks, reused in turn for all its
        num_tokens[i] positions (table column c holds block c mod ring_blocks). Position p and p + ring_blocks x
        block_size share a slot, so a sequence holds its last ring_blocks x block_size tokens: a kernel reading
        from a window start at most that far back reads only the tokens written last (kvkernels.generate). The
        tables are complete up front, as `reserve` leaves them."""
        seqs, counts = list(seqs), list(num_tokens)
        self._check_slots(seqs, "seqs")
        if len(set(seqs)) != len(seqs) or len(seqs) != len(counts) or any(self._lens[s] for s in seqs):
            raise ValueError("reserve_ring takes distinct, empty sequence slots, one token count each")
        check_positive_int("ring_blocks", ring_blocks)
        columns = [-(-n // self.block_size) for n in counts]
        if max(columns, default=0) > self.max_blocks_per_seq:
            raise ValueError(f"a sequence of {max(counts)} tokens needs more than the block table's "
                             f"{self.max_blocks_per_seq} columns")
        blocks = self.allocator.allocate(sum(min(ring_blocks, c) for c in columns))
        for seq, n, c in zip(seqs, counts, columns):
            ring, blocks = blocks[:min(ring_blocks, c)], blocks[min(ring_blocks, c):]
            self._tables[seq] = [ring[column % ring_blocks] for column in range(c)]
            self._lens[seq] = n
        self._sync_rows(seqs)

    def free(self, seqs) -> None:
        """Returns the blocks of these sequence slots to the pool and empties them."""
        seqs = list(seqs)
        self._check_slots(seqs, "seqs")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs: each sequence slot may be freed once, got {seqs}")
        for seq in seqs:
            self.allocator.free(list(dict.fromkeys(self._tables[seq])))   # a ring lists its blocks repeatedly
            self._tables[seq] = []
            self._lens[seq] = 0
        self._sync_rows(seqs)

    def truncate(self, seqs, lens) -> None:
        """Shortens sequence slot seqs[i] to its first lens[i] tokens; whole blocks past them go back to the pool."""
        seqs, lens = list(seqs), list(lens)
        if len(seqs) != len(lens) or len(set(seqs)) != len(seqs):
            raise ValueError("seqs must be distinct and match lens one to one")
        self._check_slots(seqs, "seqs")
        for seq, n in zip(seqs, lens):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= self._lens[seq]:
                raise ValueError(f"cannot truncate sequence {seq} of {self._lens[seq]} tokens to {n}")
        for seq, n in zip(seqs, lens):
            keep = -(-n // self.block_size)
            kept = set(self._tables[seq][:keep])
            self.allocator.free([b for b in dict.fromkeys(self._tables[seq][keep:]) if b not in kept])
            del self._tables[seq][keep:]
            self._lens[seq] = n
        self._sync_rows(seqs)

    def reset(self) -> None:
        self.free(range(self.max_batch_size))
        self.split_counters.zero_()   # a decode interrupted mid-launch can leave a count behind

    def _sync_rows(self, seqs, table_seqs=None) -> None:
        """Copies the host lengths of `seqs` and the table rows of `table_seqs` (default: the same) to the device. A
        decode step's reserve changes a table row once per block_size tokens, a length every time."""
        table_seqs = seqs if table_seqs is None else table_seqs
        if table_seqs:
            rows = torch.zeros(len(table_seqs), self.max_blocks_per_seq, dtype=torch.int32)
            for i, seq in enumerate(table_seqs):
                rows[i, :len(self._tables[seq])] = torch.tensor(self._tables[seq], dtype=torch.int32)
            index = torch.tensor(table_seqs, dtype=torch.long, device=self.device)
            self.block_tables.index_copy_(0, index, rows.to(self.device, non_blocking=True))
        lens = torch.tensor([self._lens[s] for s in seqs], dtype=torch.int32)
        if list(seqs) == list(range(len(seqs))):   # leading slots (every HF step): a slice, no index tensor
            self.seq_lens[:len(seqs)].copy_(lens, non_blocking=True)
        else:
            self.seq_lens.index_copy_(0, torch.tensor(seqs, dtype=torch.long, device=self.device),
                                      lens.to(self.device, non_blocking=True))

    # -- kernels -------------------------------------------------------------------------------

    def slot_tensors(self, layer: int) -> list:
        """The tensors of `layer` indexed by slot, each viewed as [num_slots, ...]: pages, and per-token scales.
        fp8 pages come as their bytes (uint8): torch's CPU index_copy_ has no float8 kernel."""
        pages = [self.k_pools[layer], self.v_pools[layer]]
        tensors = [p.view(torch.uint8) for p in pages] if self.cache_dtype == torch.float8_e4m3fn else pages
        if self.quantized and self.k_scales[layer].dim() == 3:
            tensors += [self.k_scales[layer], self.v_scales[layer]]
        return [t.view(self.num_blocks * self.block_size, *t.shape[2:]) for t in tensors]

    def read(self, layer: int, slot_mapping):
        """k, v [N, H_kv, D] in `dtype` as the kernels see them (dequantized) at int64 slots [N] (no -1)."""
        self._check_layer(layer)
        rows = []
        for pages, scales in ((self.k_pools[layer], self.k_scales[layer]), (self.v_pools[layer], self.v_scales[layer])):
            x = pages.view(-1, self.num_kv_heads, self.head_dim)[slot_mapping]
            if scales is not None:
                scale = scales.view(-1, self.num_kv_heads)[slot_mapping] if scales.dim() == 3 else scales[None]
                x = x.float() * scale[..., None]
            rows.append(x.to(self.dtype))
        return rows

    def append(self, layer: int, k, v, slot_mapping) -> None:
        """Writes k, v [N, H_kv, D] (`dtype`) of `layer` into the slots that `reserve` returned."""
        self._check_layer(layer)
        write_kv_cache(k, v, self.k_pools[layer], self.v_pools[layer], slot_mapping, k_scale=self.k_scales[layer],
                       v_scale=self.v_scales[layer], backend=self.backend, validate=False)

    def decode(self, layer: int, q, seqs=None, *, scale=None):
        """Decode attention of q [B, H, D] over sequence slots `seqs` (default: slots 0..B-1).

        A split Triton decode merges its partitions in its own launch through the pool's `split_counters`, which it
        leaves at zero: decodes of one pool must not overlap in time (another stream or thread, two CUDA graphs
        replayed at once). `reset()` zeroes them."""
        self._check_layer(layer)
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ValueError(f"q must be a tensor [batch, num_heads, head_dim], got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        seqs = list(range(q.shape[0])) if seqs is None else list(seqs)
        self._check_slots(seqs, "seqs")
        if len(seqs) != q.shape[0]:
            raise ValueError(f"q has {q.shape[0]} rows but {len(seqs)} sequence slots were given")
        empty = [s for s in seqs if self._lens[s] == 0]
        if empty:
            raise ValueError(f"sequence slot(s) {empty} hold no tokens; reserve and append before decoding")
        if seqs == list(range(len(seqs))):  # leading slots: views, no gather
            tables, lens = self.block_tables[:len(seqs)], self.seq_lens[:len(seqs)]
        else:
            index = torch.tensor(seqs, dtype=torch.long, device=self.device)
            tables, lens = self.block_tables[index], self.seq_lens[index]
        return paged_decode_attention(q, self.k_pools[layer], self.v_pools[layer], tables, lens, scale=scale,
                                      k_scale=self.k_scales[layer], v_scale=self.v_scales[layer],
                                      backend=self.backend, validate=False, split_counters=self.split_counters[:len(seqs)])


def _page_dtype(cache_dtype, dtype):
    """cache_dtype (None, a name or a torch dtype) -> the pages' torch dtype; TypeError for anything else."""
    page_dtype = resolve_cache_dtype(cache_dtype) if cache_dtype is not None else dtype
    if page_dtype != dtype and not is_quantized(page_dtype):
        raise TypeError(f"cache_dtype must be None (pages in dtype={dtype}), 'fp8' / torch.float8_e4m3fn or "
                        f"'int8' / torch.int8, got {cache_dtype!r}")
    return page_dtype


def static_scales(k_scale, v_scale, quantized, num_layers, num_kv_heads, device):
    """User-given static scales -> ([fp32 [H_kv]] * num_layers for K, same for V), or None when not given."""
    if k_scale is None and v_scale is None:
        return None
    if not quantized:
        raise ValueError("k_scale / v_scale go with cache_dtype='fp8' or 'int8'")
    if k_scale is None or v_scale is None:
        raise ValueError("give both k_scale and v_scale (static scales), or neither (per-token scales)")
    out = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        scale = torch.as_tensor(scale, dtype=torch.float32)
        try:
            scale = scale.expand(num_layers, num_kv_heads)
        except RuntimeError:
            raise ValueError(f"{name} must broadcast to [num_layers, H_kv] = [{num_layers}, {num_kv_heads}], got "
                             f"shape {list(scale.shape)}") from None
        if not (scale.isfinite() & (scale > 0)).all():
            raise ValueError(f"{name} must be finite and > 0")
        out.append([s.contiguous().to(device) for s in scale])
    return out
