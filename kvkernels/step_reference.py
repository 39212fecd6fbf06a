"""The decode step's fused operations in plain PyTorch: the oracle for kvkernels.triton_step and the path of
kvkernels.generate with backend="torch". Same functions, arguments and in-place results as the Triton module;
each is written the way HF's GPT-2 computes it (Conv1D is addmm), so float32 matches HF bit for bit.
"""
import torch
import torch.nn.functional as F

from . import reference
from .sampling import SamplingParams, process_logits


def embed(tokens, lengths, wte, wpe, x, seq_lens):
    """x[b] = wte[tokens[b]] + wpe[lengths[b]]; seq_lens[b] = lengths[b] + 1 (see triton_step.embed)."""
    x.copy_(wte[tokens] + wpe[lengths.long()])
    seq_lens.copy_(lengths + 1)


def _layer_norm(x, layer_norm):
    weight, bias, eps = layer_norm
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x, weight, bias, out, *, layer_norm=None, gelu=False, residual=False, workspace=None):
    """out = [out +] gelu?(LayerNorm?(x) @ weight + bias) (see triton_step.linear; addmm needs no workspace)."""
    if layer_norm is not None:
        x = _layer_norm(x, layer_norm)
    y = x @ weight if bias is None else torch.addmm(bias, x, weight)                # [M, N], the model dtype
    if gelu:
        y = F.gelu(y, approximate="tanh")
    out.copy_(out + y if residual else y)


def gemm_workspace(M, shapes, dtype, device):
    """None: addmm splits nothing (see triton_step.gemm_workspace)."""
    return None


def qkv_write(x, layer_norm, weight, bias, q, k_cache, v_cache, block_tables, lengths, *, workspace=None):
    """[q | k | v] = LayerNorm(x) @ weight + bias; q out, k and v into slot `lengths[b]` of each row's pages (see
    triton_step.qkv_write; addmm needs no workspace)."""
    batch = x.shape[0]
    _, block_size, heads, head_dim = k_cache.shape
    query, key, value = torch.addmm(bias, _layer_norm(x, layer_norm), weight).view(batch, 3, heads, head_dim).unbind(1)
    q.copy_(query)
    positions = lengths.long()                                                      # [B]
    blocks = block_tables.long().gather(1, (positions // block_size)[:, None]).squeeze(1)
    reference.write_kv_cache(key, value, k_cache, v_cache, blocks * block_size + positions % block_size,
                             validate=False)


def update_state(state, logits=None, chosen=None, *, penalty=1.0, grow=False):
    """Records each row's next token: greedy argmax of penalised `logits`, or `chosen` (see
    triton_step.update_state for the state's tensors)."""
    if chosen is None:
        chosen = process_logits(logits, SamplingParams(repetition_penalty=penalty), state.seen).argmax(dim=-1)
    chosen = torch.where(state.finished, state.pad, chosen)                      # finished rows emit padding
    state.out.scatter_(1, state.step[:, None], chosen[:, None])
    newly_done = (chosen[:, None] == state.eos[None, :]).any(dim=1) & ~state.finished
    state.done_at.copy_(torch.where(newly_done, state.step, state.done_at))
    if grow:
        state.lengths.add_((~state.finished).int())
    state.finished.logical_or_(newly_done)
    if state.seen is not None:
        state.seen.scatter_(1, chosen[:, None], True)
    state.tokens.copy_(chosen)
    state.step.add_(1)
