"""HF's continuous batching (`model.generate_batch`, `init_continuous_batching`) on the kvkernels decode kernel.

transformers up to 5.22 runs continuous batching through the attention function registered as "paged|<name>" and
hands it its own paged cache (`cache`), the flat slot indices each token reads and writes (`read_index`,
`write_index`, one tensor per layer group) and the cumulative lengths (`cu_seq_lens_q`, `cu_seq_lens_k`). A model
loaded with attn_implementation="kvkernels" is switched to "paged|kvkernels" for the batch, which reaches
`continuous_batching_attention`:
    * a decode-only batch (every request adds one token) of a full-attention layer: the new K/V go into HF's pages
      with kvkernels.write_kv_cache and attention runs kvkernels.paged_decode_attention over those pages. HF's page
      pool [num_blocks * block_size, H_kv, D] is the kernels' [num_blocks, block_size, H_kv, D]; each request's
      block table is read off its read indices (one per page: position j * block_size lies at offset 0 of page j);
    * anything else (prefill, mixed or padded batches, sliding-window layers, whose pages HF reuses as a ring): HF's
      cache.update writes and reads back each request's keys and values, and SDPA attends with the mask a varlen
      flash kernel applies (causal from the bottom right, within the window), which continuous batching builds
      for "paged|eager" / "paged|sdpa" only.
transformers 5.23 and later accept only "paged|eager", "sdpa" and flash implementations for continuous batching
(their generate_batch says so): there the kvkernels kernels serve `generate` (patch) and kvkernels.generate only.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..ops import paged_decode_attention, write_kv_cache
from .attention import NAME, refuse_unsupported

CB_NAME = f"paged|{NAME}"   # transformers 5.23 on strip the "paged|" prefix and never call it


def _full_attention(value):
    """cu_seq_lens_k / max_seqlen_k are a dict per layer type when the model mixes full and sliding layers."""
    return value["full_attention"] if isinstance(value, dict) else value


def continuous_batching_attention(module, query, key, value, attention_mask, *, scaling=None, cache=None, **kwargs):
    """transformers' "paged|" attention contract, on kvkernels' decode kernel for decode-only batches.

    Args:
        module: the attention module (`layer_idx`, `sliding_window`).
        query: [1, H, T, D]; key, value: [1, H_kv, T, D]: the batch's T new tokens, requests one after another.
        attention_mask: HF's 4D mask over the read tokens, or None (used by HF's path only).
        cache: HF's PagedAttentionCache. kwargs: `read_index`, `write_index`, `cu_seq_lens_q`, `cu_seq_lens_k`,
            `max_seqlen_q`, `max_seqlen_k`, as continuous batching passes them.

    Returns:
        ([1, T, H, D] in query's dtype, None).
    """
    if cache is None:
        raise ValueError(f"attn_implementation={CB_NAME!r} serves HF's continuous batching only (generate_batch); "
                         f"load the model with attn_implementation={NAME!r}")
    refuse_unsupported(module, kwargs)
    group, index_in_group = cache.layer_index_to_group_indices[module.layer_idx]
    decode_batch = kwargs.get("max_seqlen_q") == 1
    window = cache.sliding_windows[module.layer_idx]     # 1 for full attention
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if not decode_batch or window != 1:
        keys, values = cache.update(key, value, module.layer_idx, read_index=kwargs["read_index"],
                                    write_index=kwargs["write_index"])                        # [total_k, H_kv, D]
        layer_type = "full_attention" if window == 1 else "sliding_attention"
        seq_lens_k = kwargs["cu_seq_lens_k"]
        seq_lens_k = seq_lens_k[layer_type] if isinstance(seq_lens_k, dict) else seq_lens_k
        visible = _varlen_causal_mask(kwargs["cu_seq_lens_q"], seq_lens_k, query.shape[2], keys.shape[0],
                                      None if window == 1 else window)                       # [T, total_k]
        group = query.shape[1] // keys.shape[1]
        out = F.scaled_dot_product_attention(query, keys.transpose(0, 1)[None].repeat_interleave(group, dim=1),
                                             values.transpose(0, 1)[None].repeat_interleave(group, dim=1),
                                             attn_mask=visible, scale=scale)                  # [1, H, T, D]
        return out.transpose(1, 2), None
    block_size = cache.block_size
    k_pages = cache.key_cache[index_in_group].view(-1, block_size, cache.num_key_value_heads, cache.head_dim)
    v_pages = cache.value_cache[index_in_group].view(-1, block_size, cache.num_key_value_heads, cache.head_dim)
    # [num_blocks, block_size, H_kv, D]
    starts = _full_attention(kwargs["cu_seq_lens_k"]).long()                                      # [B + 1]
    seq_lens = (starts[1:] - starts[:-1]).to(torch.int32)                                         # [B], new token in
    read_index = kwargs["read_index"][group]                                                      # [sum(seq_lens)]
    max_blocks = -(-int(_full_attention(kwargs["max_seqlen_k"])) // block_size)
    first_of_page = starts[:-1, None] + block_size * torch.arange(max_blocks, device=starts.device)  # [B, M]
    block_tables = (read_index[first_of_page.clamp(max=read_index.numel() - 1)] // block_size).to(torch.int32)
    write_kv_cache(key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous(), k_pages, v_pages,
                   kwargs["write_index"][group], validate=False)
    out = paged_decode_attention(query[0].transpose(0, 1), k_pages, v_pages, block_tables, seq_lens, scale=scale,
                                 validate=False)                                                  # [B, H, D]
    return out[None], None


def _varlen_causal_mask(cu_seq_lens_q, cu_seq_lens_k, num_queries, num_keys, window):
    """bool [num_queries, num_keys]: query t sees key s of its own request at or before its position, the last
    query of a request aligned with its last key (a request's keys are its whole visible past plus the new tokens),
    and within `window` positions when given."""
    device = cu_seq_lens_q.device
    cu_q, cu_k = cu_seq_lens_q.long(), cu_seq_lens_k.long()
    q_index, k_index = torch.arange(num_queries, device=device), torch.arange(num_keys, device=device)
    q_request = torch.searchsorted(cu_q[1:], q_index, right=True)                                 # [T]
    k_request = torch.searchsorted(cu_k[1:], k_index, right=True)                                 # [total_k]
    q_from_end = cu_q[1:].gather(0, q_request.clamp(max=cu_q.numel() - 2)) - 1 - q_index         # 0: last query
    k_from_end = cu_k[1:].gather(0, k_request.clamp(max=cu_k.numel() - 2)) - 1 - k_index
    visible = (q_request[:, None] == k_request[None, :]) & (k_from_end[None, :] >= q_from_end[:, None])
    if window is not None:
        visible &= k_from_end[None, :] < q_from_end[:, None] + window
    return visible


AttentionInterface.register(CB_NAME, continuous_batching_attention)
