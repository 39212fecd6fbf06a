"""Input checks shared by every backend: clear errors instead of wrong answers or bad memory access."""
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference also takes float64 so tests can use it against a float64 oracle.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
# Quantized page dtypes -> the largest magnitude a page element holds (per (token, KV head) scales map onto it).
QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
CACHE_DTYPE_NAMES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def resolve_cache_dtype(cache_dtype):
    """None, a torch dtype, or "fp8" / "int8" -> None or a torch dtype (unchecked beyond the names)."""
    if isinstance(cache_dtype, str):
        if cache_dtype not in CACHE_DTYPE_NAMES:
            raise ValueError(f"cache_dtype names are {', '.join(map(repr, CACHE_DTYPE_NAMES))}, got {cache_dtype!r}")
        return CACHE_DTYPE_NAMES[cache_dtype]
    return cache_dtype


def is_quantized(dtype) -> bool:
    return dtype in QUANT_MAX


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks_per_seq: int


def _require_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _require_same_device(named):
    devices = {name: x.device for name, x in named.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all tensors must share a device")


def _require_last_dim_contiguous(name, x):
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got strides {tuple(x.stride())}")


def _require_dtype(named, dtype, like):
    for name, x in named:
        if x.dtype != dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {like} has {dtype}; they must match")


def _require_supported(name, x, dtypes):
    if x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}")


def _require_index_dtype(name, x, dtype):
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {x.dtype}")


def _require_cache_pair(k_cache, v_cache):
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _require_last_dim_contiguous(name, x)


def check_decode_inputs(q, k_cache, v_cache, block_tables, seq_lens, dtypes=KERNEL_DTYPES,
                        seq_starts=None) -> DecodeShape:
    """Checks types, dtypes, devices and shapes (no device sync). Returns the problem's sizes."""
    if seq_starts is not None:
        _require_tensor("seq_starts", seq_starts)
        _require_same_device({"seq_lens": seq_lens, "seq_starts": seq_starts})
        _require_index_dtype("seq_starts", seq_starts, torch.int32)
        if seq_starts.shape != seq_lens.shape:
            raise ValueError(f"seq_starts must have seq_lens' shape {tuple(seq_lens.shape)}, "
                             f"got {tuple(seq_starts.shape)}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        _require_tensor(name, x)
    _require_same_device({"q": q, "k_cache": k_cache, "v_cache": v_cache,
                          "block_tables": block_tables, "seq_lens": seq_lens})
    _require_supported("q", q, dtypes)
    if is_quantized(k_cache.dtype):
        _require_dtype((("v_cache", v_cache),), k_cache.dtype, "k_cache")
    else:
        _require_dtype((("k_cache", k_cache), ("v_cache", v_cache)), q.dtype, "q")
    _require_index_dtype("block_tables", block_tables, torch.int32)
    _require_index_dtype("seq_lens", seq_lens, torch.int32)
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {tuple(q.shape)}")
    _require_cache_pair(k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache head_dim is {cache_head_dim} but q head_dim is {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks_per_seq], got shape {tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [batch={batch}], got shape {tuple(seq_lens.shape)}")
    if block_size == 0 or num_blocks == 0 or head_dim == 0:
        raise ValueError(f"k_cache has an empty dimension: shape {tuple(k_cache.shape)}")
    return DecodeShape(batch, num_heads, num_kv_heads, head_dim, num_blocks, block_size, block_tables.shape[1])


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_decode_values(block_tables, seq_lens, shape: DecodeShape, seq_starts=None) -> None:
    """Checks seq_lens, seq_starts and the block ids in use. Costs one device sync on GPU; skipped under graph
    capture."""
    if shape.batch == 0 or _capturing(seq_lens.device):
        return
    if seq_starts is not None and bool(((seq_starts < 0) | (seq_starts >= seq_lens)).any()):
        row = int(((seq_starts < 0) | (seq_starts >= seq_lens)).nonzero()[0])
        raise ValueError(f"seq_starts[{row}] = {int(seq_starts[row])} must be in [0, seq_lens[{row}] = "
                         f"{int(seq_lens[row])}): each query sees at least one token")
    capacity = shape.max_blocks_per_seq * shape.block_size
    lens = seq_lens.long()
    blocks_used = (lens + shape.block_size - 1) // shape.block_size                       # [B]
    in_use = torch.arange(shape.max_blocks_per_seq, device=lens.device) < blocks_used[:, None]
    bad_ids = in_use & ((block_tables < 0) | (block_tables >= shape.num_blocks))
    flags = torch.stack([(lens < 1).any(), (lens > capacity).any(), bad_ids.any()]).tolist()
    if flags[0]:
        raise ValueError(f"seq_lens must be >= 1 for every sequence, got min {int(lens.min())}")
    if flags[1]:
        raise ValueError(f"seq_lens max {int(lens.max())} exceeds what block_tables covers "
                         f"({shape.max_blocks_per_seq} blocks x {shape.block_size} = {capacity} tokens)")
    if flags[2]:
        row, col = bad_ids.nonzero()[0].tolist()
        raise ValueError(f"block_tables[{row}, {col}] = {int(block_tables[row, col])} is in use but outside "
                         f"[0, num_blocks={shape.num_blocks})")


def check_split_counters(split_counters, shape: DecodeShape, device: torch.device, check_zero: bool) -> None:
    """Checks the decode's split counters: int32 [B, H_kv], contiguous, on `device`; all zero when check_zero
    (one device sync; skipped under graph capture)."""
    _require_tensor("split_counters", split_counters)
    expected = (shape.batch, shape.num_kv_heads)
    if (split_counters.dtype != torch.int32 or tuple(split_counters.shape) != expected
            or split_counters.device != device or not split_counters.is_contiguous()):
        raise ValueError(f"split_counters must be a contiguous int32 tensor of shape {expected} on {device}, got "
                         f"{split_counters.dtype} {tuple(split_counters.shape)} on {split_counters.device}")
    if check_zero and not _capturing(device) and bool(split_counters.any()):
        raise ValueError("split_counters must be all zero (the kernel leaves them zero; do not share them "
                         "between decodes running at the same time)")


def check_write_inputs(k, v, k_cache, v_cache, slot_mapping, dtypes=KERNEL_DTYPES):
    """Checks write_kv_cache's arguments (no device sync). Returns (num_tokens, num_slots)."""
    for name, x in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        _require_tensor(name, x)
    _require_same_device({"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slot_mapping})
    if is_quantized(k_cache.dtype):  # new rows in any compute dtype, quantized on the way in
        _require_supported("k", k, dtypes)
        _require_dtype((("v", v),), k.dtype, "k")
        _require_dtype((("v_cache", v_cache),), k_cache.dtype, "k_cache")
    else:
        _require_supported("k_cache", k_cache, dtypes)
        _require_dtype((("k", k), ("v", v), ("v_cache", v_cache)), k_cache.dtype, "k_cache")
    _require_index_dtype("slot_mapping", slot_mapping, torch.int64)
    _require_cache_pair(k_cache, v_cache)
    head_shape = tuple(k_cache.shape[2:])
    if k.dim() != 3 or tuple(k.shape[1:]) != head_shape:
        raise ValueError(f"k must be [num_tokens, {head_shape[0]}, {head_shape[1]}], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [num_tokens={k.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    return k.shape[0], k_cache.shape[0] * k_cache.shape[1]


def check_slot_values(slot_mapping, num_slots: int) -> None:
    """Slots must be -1 (skip) or in [0, num_slots), each used at most once. One sync on GPU; skipped under capture."""
    if slot_mapping.numel() == 0 or _capturing(slot_mapping.device):
        return
    ordered = slot_mapping.sort().values
    out_of_range = (ordered[0] < -1) | (ordered[-1] >= num_slots)
    repeated = ((ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)).any()
    flags = torch.stack([out_of_range, repeated]).tolist()
    if flags[0]:
        raise ValueError(f"slot_mapping values must be -1 (skip) or in [0, {num_slots}), "
                         f"got range [{int(ordered[0])}, {int(ordered[-1])}]")
    if flags[1]:
        raise ValueError("slot_mapping writes the same slot more than once")


def check_kv_scales(k_cache, v_cache, k_scale, v_scale) -> bool:
    """Scales go with fp8 / int8 pages and only with them: fp32, [num_blocks, block_size, H_kv] (one per cached
    token and KV head, written by write_kv_cache) or [H_kv] (static per-head scales). Returns True for
    per-token scales. No device sync."""
    if not is_quantized(k_cache.dtype):
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale belong to fp8 or int8 pages; these pages are {k_cache.dtype}")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError(f"{k_cache.dtype} pages need k_scale and v_scale: fp32 [num_blocks, block_size, H_kv] "
                         "(per token, as PagedKVCache keeps them) or [H_kv] (static per-head scales)")
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        _require_tensor(name, x)
        if x.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {x.dtype}")
        if x.device != k_cache.device:
            raise ValueError(f"{name} is on {x.device} but k_cache is on {k_cache.device}")
    per_token, per_head = tuple(k_cache.shape[:3]), (k_cache.shape[2],)
    if tuple(k_scale.shape) not in (per_token, per_head):
        raise ValueError(f"k_scale must be [num_blocks, block_size, H_kv] = {list(per_token)} or [H_kv] = "
                         f"{list(per_head)}, got {list(k_scale.shape)}")
    if v_scale.shape != k_scale.shape:
        raise ValueError(f"v_scale has shape {list(v_scale.shape)} but k_scale has {list(k_scale.shape)}")
    return tuple(k_scale.shape) == per_token
