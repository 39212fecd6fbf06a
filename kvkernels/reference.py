"""Plain PyTorch paged decode attention and KV write: the oracle for every test and the CPU fallback.

Shapes follow the kernels exactly (NHD pages, as vLLM and FlashInfer):
    q            [B, H, D]
    k_cache      [num_blocks, block_size, H_kv, D]  (v_cache the same)
    block_tables int32 [B, max_blocks_per_seq]
    seq_lens     int32 [B]
"""
import torch

from ._validate import REFERENCE_DTYPES, check_decode_inputs, check_decode_values, check_slot_values, check_write_inputs


def gather_kv(cache, block_tables, seq_lens):
    """Pages -> contiguous rows. Returns ([B, L, H_kv, D] with unused rows zeroed, valid mask [B, L]).

    L = max_blocks_per_seq * block_size. Unused rows are replaced with zeros (not multiplied by a mask),
    so NaN left in free slots can never leak into the result.
    """
    batch, max_blocks = block_tables.shape
    block_size = cache.shape[1]
    positions = torch.arange(max_blocks * block_size, device=cache.device)                  # [L]
    valid = positions[None, :] < seq_lens.long()[:, None]                                  # [B, L]
    blocks_used = (seq_lens.long() + block_size - 1) // block_size                        # [B]
    table_in_use = torch.arange(max_blocks, device=cache.device)[None, :] < blocks_used[:, None]
    tables = torch.where(table_in_use, block_tables.long(), 0)                             # unused ids may be junk
    rows = cache[tables].reshape(batch, max_blocks * block_size, *cache.shape[2:])         # [B, L, H_kv, D]
    return torch.where(valid[:, :, None, None], rows, torch.zeros((), dtype=cache.dtype, device=cache.device)), valid


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, validate=True,
                           seq_starts=None):
    """out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over cached tokens seq_starts[b] (default 0) to seq_lens[b] - 1.

    Query head h reads KV head h // (H / H_kv) (grouped-query, as HF's repeat_kv).
    Accumulates in float32 (float64 for float64 inputs); returns [B, H, D] in q's dtype.
    """
    shape = check_decode_inputs(q, k_cache, v_cache, block_tables, seq_lens, REFERENCE_DTYPES, seq_starts)
    if validate:
        check_decode_values(block_tables, seq_lens, shape, seq_starts)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = shape.head_dim ** -0.5 if scale is None else scale
    group = shape.num_heads // shape.num_kv_heads

    k, valid = gather_kv(k_cache, block_tables, seq_lens)                                  # [B, L, H_kv, D]
    v, _ = gather_kv(v_cache, block_tables, seq_lens)
    if seq_starts is not None:  # tokens before the window: zeroed like unused rows, so NaN there cannot leak
        seen = torch.arange(valid.shape[1], device=valid.device)[None, :] >= seq_starts.long()[:, None]   # [B, L]
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        k, v = torch.where(seen[:, :, None, None], k, zero), torch.where(seen[:, :, None, None], v, zero)
        valid = valid & seen
    k = k.to(compute_dtype).repeat_interleave(group, dim=2)                                # [B, L, H, D]
    v = v.to(compute_dtype).repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.to(compute_dtype), k) * scale                 # [B, H, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhl,blhd->bhd", probs, v)                                          # [B, H, D]
    return out.to(q.dtype)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, validate=True):
    """k_cache.view(-1, H_kv, D)[slot] = k[i] for each token i whose slot is not -1 (same for v).

    k, v [N, H_kv, D]; slot_mapping int64 [N] = block * block_size + offset.
    """
    _, num_slots = check_write_inputs(k, v, k_cache, v_cache, slot_mapping, REFERENCE_DTYPES)
    if validate:
        check_slot_values(slot_mapping, num_slots)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]
