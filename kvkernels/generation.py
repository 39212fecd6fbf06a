"""kvkernels.generate: generation over a preallocated paged cache, one CUDA graph per decode step.

GPT-2 runs the fused step below; every other decoder kvkernels.patch serves (Llama, Mistral, Qwen2, Qwen3, Phi3, ...)
runs its own modules with the "kvkernels" attention function on the same static pool (kvkernels.hf.runner).

Static shapes make the graph possible. The pool holds, for every sequence, room for its real prompt tokens
plus max_new_tokens, and its block table is filled before the first token; a decode step then only reads
and updates device tensors that never move:
    tokens [B] (the step's input), lengths int32 [B] (tokens cached = the input's position), finished [B],
    done_at [B], step [B] (output column), out [B, max_new_tokens], seen [B, V] (repetition penalty).
The step is one Python function of fused kernels (kvkernels.triton_step, or kvkernels.step_reference for the
PyTorch backend): an embedding prologue, five launches per layer (LayerNorm + QKV GEMM + K/V write, paged
decode attention, c_proj + residual, LayerNorm + c_fc + GELU, mlp c_proj + residual), ln_f + lm_head, and
one epilogue for the greedy choice and the EOS bookkeeping: 63 launches for GPT-2 124M (also when attention
splits a long context: its merge runs in the attention kernel's last program), where the module-by-module
step took about 160. It runs eagerly on the CPU, and on CUDA
it is captured once and replayed per token. The host reads the device only every EOS_CHECK_EVERY tokens
(each token for a streamer).

The pool, those tensors and the captured graph stay on the model after a call (`_Session`), so a later call
with the same batch, lengths budget and settings refills them in place and replays without capturing again.
`release(model)` frees them.
"""
import functools
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from ._validate import is_quantized, resolve_cache_dtype
from .cache import PagedKVCache
from .hf.cache import any_window, attention_shape, shared_window
from .gpt2_common import attention_scale, blocks_for, check_positive_int, gpt2_parts
from .ops import BACKENDS, paged_decode_attention, resolve_backend, triton_available
from .sampling import SamplingParams, generation_settings, hf_penalises_left_padding, process_logits, select_tokens

# activation_function values that are the tanh GELU the fused c_fc kernel applies
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")

# One host sync per this many tokens on CUDA to see whether every sequence has finished. With a streamer,
# or on the CPU (whose ops are synchronous anyway), it checks and streams every token.
EOS_CHECK_EVERY = 16


@dataclass
class _DecodeState:
    """Device tensors a decode step reads and updates in place (their addresses are baked into the graph)."""
    tokens: torch.Tensor      # int64 [B], the step's input tokens
    lengths: torch.Tensor     # int32 [B], tokens cached per sequence = position of `tokens`
    finished: torch.Tensor    # bool [B]
    done_at: torch.Tensor     # int64 [B], output column of the EOS (max_new_tokens while unfinished)
    step: torch.Tensor        # int64 [B], the output column this step writes (equal in every row)
    out: torch.Tensor         # int64 [B, max_new_tokens]
    seen: torch.Tensor        # bool [B, V] tokens present so far, or None without a repetition penalty
    eos: torch.Tensor         # int64 [num_eos]
    pad: int

    def mutable(self):
        return [t for t in (self.tokens, self.lengths, self.finished, self.done_at, self.step, self.out, self.seen)
                if t is not None]


@dataclass
class _Session:
    """What one generate configuration keeps between calls: the captured step points into all of it."""
    key: tuple
    pool: PagedKVCache
    runner: "_Runner"
    state: _DecodeState
    ring_blocks: int = None     # pages per sequence when every layer is windowed (PagedKVCache.reserve_ring)
    replay: object = None       # the captured decode step, once captured


_SESSION = "_kvkernels_generate_session"


def release(model) -> None:
    """Frees the paged pool and CUDA graph that kvkernels.generate keeps on `model` for reuse."""
    model.__dict__.pop(_SESSION, None)


class _Runner:
    """Prefill and the decode step of one generate call, over one preallocated PagedKVCache."""

    def __init__(self, base, lm_head, pool: PagedKVCache, batch: int, params: SamplingParams):
        self.base, self.lm_head, self.pool, self.params = base, lm_head, pool, params
        self.tables = pool.block_tables[:batch]                                     # int32 [B, M], static
        self.scales = [attention_scale(block.attn) for block in base.h]
        self.num_heads, self.head_dim = base.h[0].attn.num_heads, base.h[0].attn.head_dim
        self.ops = _step_ops(pool.backend, base.wte.weight.device)
        self.fused_gelu = base.config.activation_function in _TANH_GELU
        # The step's activations: static buffers, so a captured graph finds them at the same addresses.
        weight = base.wte.weight
        embed_dim, inner_dim = weight.shape[1], base.h[0].mlp.c_fc.weight.shape[1]
        self.x = weight.new_empty(batch, embed_dim)                                 # residual stream [B, E]
        self.seq_lens = torch.empty(batch, dtype=torch.int32, device=weight.device)  # lengths attention sees
        self.q = weight.new_empty(batch, self.num_heads, self.head_dim)               # [B, H, D]
        self.attn = torch.empty_like(self.q)                                        # [B, H, D]
        # A split attention merges in its own last program (no merge launch); the kernel leaves these zero.
        self.split_counters = torch.zeros(batch, self.num_heads, dtype=torch.int32, device=weight.device)
        vocab = lm_head.out_features
        # The split-K GEMMs' partials and counters, sized for the step's GEMMs ([(K, N)]): no step allocates.
        gemms = [(embed_dim, 3 * embed_dim), (embed_dim, embed_dim), (embed_dim, inner_dim), (inner_dim, embed_dim),
                 (embed_dim, vocab)]
        self.workspace = self.ops.gemm_workspace(batch, gemms, weight.dtype, weight.device)
        self.hidden = weight.new_empty(batch, inner_dim)                            # MLP activations [B, 4E]
        self.logits = torch.empty(batch, vocab, dtype=torch.float32, device=weight.device)
        if pool.quantized:
            # fp8 / int8 pages: the fused QKV kernel writes this step's K and V into a one-slot-per-row staging
            # pool (block b = row b, position 0), then write_kv_cache quantizes them into their slots (the
            # scales need a whole row of a head, which no QKV program owns): one more launch per layer.
            self.k_new = weight.new_empty(batch, 1, self.num_heads, self.head_dim)   # [B, 1, H, D]
            self.v_new = torch.empty_like(self.k_new)
            self.stage_table = torch.arange(batch, dtype=torch.int32, device=weight.device)[:, None]  # [B, 1]
            self.stage_position = torch.zeros(batch, dtype=torch.int32, device=weight.device)
            self.slots = torch.empty(batch, dtype=torch.long, device=weight.device)  # this step's slots [B]

    @staticmethod
    def _attention_inputs(block, x):
        """query, key, value [..., E] each, views of one c_attn output."""
        return block.attn.c_attn(block.ln_1(x)).split(block.attn.split_size, dim=-1)

    @staticmethod
    def _mlp(block, x):
        mlp = block.mlp
        if isinstance(mlp.act, NewGELUActivation):
            # HF's "gelu_new" is eight elementwise kernels; PyTorch's tanh GELU is the same formula in one
            # (within 1 ulp in float32, and closer to the exact value in half precision).
            return mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
        return mlp(x)

    def prefill(self, input_ids, real):
        """Runs the prompts (left padded; real: bool [B, P]) into the pool; returns float32 logits [B, V]."""
        batch, prompt_len = input_ids.shape
        heads, dim, pool = self.num_heads, self.head_dim, self.pool
        positions = (real.long().cumsum(1) - 1).clamp(min=0)                          # HF's position_ids
        block = positions // pool.block_size
        slots = self.tables.long().gather(1, block) * pool.block_size + positions % pool.block_size
        slots = torch.where(real, slots, -1).reshape(-1)                              # [B * P], pads skipped
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=real.device).tril()
        eye = torch.eye(prompt_len, dtype=torch.bool, device=real.device)
        # A padding query attends to itself only: finite, never read (keys at padding are never visible).
        mask = (causal & (real[:, None, :] | eye))[:, None]                             # [B, 1, P, P]
        x = self.base.wte(input_ids) + self.base.wpe(positions)                       # [B, P, E]
        shape = (batch, prompt_len, heads, dim)
        for layer, block in enumerate(self.base.h):
            query, key, value = self._attention_inputs(block, x)
            key, value = key.reshape(-1, heads, dim).to(pool.dtype), value.reshape(-1, heads, dim).to(pool.dtype)
            pool.append(layer, key, value, slots)
            if pool.quantized:  # attend over what the pages hold, as decode will (padding keeps its own rows)
                stored = pool.read(layer, slots.clamp(min=0))
                key, value = (torch.where(real.reshape(-1, 1, 1), page, fresh)
                              for page, fresh in zip(stored, (key, value)))
            compute = torch.float32 if block.attn.reorder_and_upcast_attn else x.dtype
            q, k, v = (t.view(shape).transpose(1, 2).to(compute) for t in (query, key, value))
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scales[layer])  # [B, H, P, D]
            x = x + block.attn.c_proj(attn.transpose(1, 2).reshape(batch, prompt_len, -1).to(x.dtype))
            x = x + self._mlp(block, block.ln_2(x))
        return self.lm_head(self.base.ln_f(x[:, -1])).float()                         # last column is real

    def select(self, logits, state: _DecodeState, grow=False):
        _select(self.ops, self.params, logits, state, grow)

    def decode_step(self, state: _DecodeState):
        """One token per sequence: embed state.tokens, append their K/V, attend over the pages, select."""
        base, pool, ops, x = self.base, self.pool, self.ops, self.x
        ops.embed(state.tokens, state.lengths, base.wte.weight, base.wpe.weight, x, self.seq_lens)
        if pool.quantized:
            positions = state.lengths.long()
            self.slots.copy_(self.tables.gather(1, (positions // pool.block_size)[:, None]).squeeze(1).long()
                             * pool.block_size + positions % pool.block_size)
        for layer, block in enumerate(base.h):
            attn, mlp = block.attn, block.mlp
            if pool.quantized:
                ops.qkv_write(x, _norm(block.ln_1), attn.c_attn.weight, attn.c_attn.bias, self.q, self.k_new,
                              self.v_new, self.stage_table, self.stage_position, workspace=self.workspace)
                pool.append(layer, self.k_new.view(self.q.shape), self.v_new.view(self.q.shape), self.slots)
            else:
                ops.qkv_write(x, _norm(block.ln_1), attn.c_attn.weight, attn.c_attn.bias, self.q,
                              pool.k_pools[layer], pool.v_pools[layer], self.tables, state.lengths,
                              workspace=self.workspace)
            paged_decode_attention(self.q, pool.k_pools[layer], pool.v_pools[layer], self.tables, self.seq_lens,
                                   scale=self.scales[layer], k_scale=pool.k_scales[layer],
                                   v_scale=pool.v_scales[layer], backend=pool.backend, validate=False, out=self.attn,
                                   split_counters=self.split_counters)
            ops.linear(self.attn.view(x.shape), attn.c_proj.weight, attn.c_proj.bias, x, residual=True,
                       workspace=self.workspace)
            ops.linear(x, mlp.c_fc.weight, mlp.c_fc.bias, self.hidden, layer_norm=_norm(block.ln_2),
                       gelu=self.fused_gelu, workspace=self.workspace)
            hidden = self.hidden if self.fused_gelu else mlp.act(self.hidden)
            ops.linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias, x, residual=True, workspace=self.workspace)
        ops.linear(x, self.lm_head.weight.t(), self.lm_head.bias, self.logits, layer_norm=_norm(base.ln_f),
                   workspace=self.workspace)
        # Finished sequences stop growing (grow skips them): their next, ignored token overwrites the same slot.
        self.select(self.logits, state, grow=True)


def _select(ops, params: SamplingParams, logits, state: _DecodeState, grow=False):
    """Picks the next tokens from logits float32 [B, V] and does the EOS / output bookkeeping, on the device.
    grow: this follows a decode step, which cached each unfinished row's input token."""
    if params.do_sample:
        chosen = select_tokens(process_logits(logits, params, state.seen), params)
        ops.update_state(state, chosen=chosen, penalty=params.repetition_penalty, grow=grow)
    else:
        ops.update_state(state, logits, penalty=params.repetition_penalty, grow=grow)


def _is_gpt2(model) -> bool:
    try:
        gpt2_parts(model)
    except TypeError:
        return False
    return True


def _model_parts(model):
    """(base model, LM head) of a GPT-2 or of any decoder kvkernels.patch serves; a TypeError names what is missing."""
    if _is_gpt2(model):
        return gpt2_parts(model)
    from .hf.patch import decoder_parts
    base, head = decoder_parts(model)
    return base, (head.get_output_embeddings() if head is not None else None)


def _norm(layer_norm):
    return layer_norm.weight, layer_norm.bias, layer_norm.eps


def _step_ops(backend: str, device: torch.device):
    """The decode step's fused operations: Triton kernels, or their PyTorch reference for backend="torch" (and
    for the CUDA backend where Triton is not installed)."""
    if backend == "torch" or not triton_available(device):
        from . import step_reference
        return step_reference
    from . import triton_step
    return triton_step


def _warm_up(runner: _Runner, state: _DecodeState, steps: int = 2):
    """Runs decode steps (compiling the kernels) and undoes their effect on the state and on the random
    generator, so a call that captures samples exactly like one that replays. The K/V they wrote sit in
    slots that the real steps overwrite before reading them. `steps` must stay below the output columns
    left (state.out has max_new_tokens; prefill filled the first)."""
    device = state.tokens.device
    saved = [t.clone() for t in state.mutable()]
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    for _ in range(steps):
        runner.decode_step(state)
    for t, value in zip(state.mutable(), saved):
        t.copy_(value)
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng, device)
    else:
        torch.set_rng_state(rng)


def _graphs_supported(device: torch.device, backend: str) -> bool:
    # The PyTorch reference writes K/V through boolean indexing, a host sync that capture forbids; it is
    # the oracle, not the fast path, so it runs eagerly.
    return device.type == "cuda" and backend != "torch"


def _capture(runner: _Runner, state: _DecodeState, warm_up_steps: int):
    """Captures one decode step as a CUDA graph (warmed up on a side stream first); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _warm_up(runner, state, warm_up_steps)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner.decode_step(state)
    return graph.replay


def _token_ids(value, name):
    if value is None:
        return []
    if isinstance(value, torch.Tensor):             # as HF's generate takes them too
        value = value.tolist()
    values = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a token id or a list of token ids, got {value!r}")
    return values


def _check_inputs(model, input_ids, attention_mask, max_new_tokens):
    base, lm_head = _model_parts(model)
    if lm_head is None:
        raise TypeError(f"model must have a language-modelling head (GPT2LMHeadModel, LlamaForCausalLM, ...), got "
                        f"{type(model).__name__}")
    if model.training:
        raise ValueError("kvkernels.generate runs inference: call model.eval() first")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.dim() != 2:
        raise TypeError("input_ids must be an int64 tensor [batch, prompt_len]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    check_positive_int("max_new_tokens", max_new_tokens)
    device = lm_head.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
        real = attention_mask.to(device).bool()
        if not bool(real[:, -1].all()):
            raise ValueError("attention_mask: prompts must be left-padded (the last column real in every row)")
        # HF's sliding window counts columns, masked ones too; the decode step's counts stored tokens. The two differ
        # only where the window binds: within the columns fed (the prompt's and all but the last new token's).
        window = any_window(base.config)
        if window is not None and input_ids.shape[1] + max_new_tokens - 1 > window \
                and bool((real[:, 1:] < real[:, :-1]).any()):
            raise ValueError(f"attention_mask: a masked column after a prompt's first real token, in a model whose "
                             f"sliding window ({window}) is shorter than prompt + max_new_tokens - 1, is not "
                             "supported by kvkernels.generate (the window would count tokens where HF counts "
                             "columns): left-pad the prompts, or use kvkernels.patch and model.generate")
    lengths = real.sum(1).tolist()
    from .hf.patch import position_limit
    limit = position_limit(base)                     # a learned position table (GPT-2's n_positions), else None
    # The last new token is never fed back, so prompt + max_new_tokens may be limit + 1 tokens (as in HF).
    if limit is not None and max(lengths) + max_new_tokens - 1 > limit:
        name = attention_shape(base.config).max_positions_name
        raise ValueError(f"the longest prompt ({max(lengths)} tokens) plus max_new_tokens ({max_new_tokens}) minus the "
                         f"last token, which is never fed back, exceeds the model's {name}={limit}")
    return base, lm_head, input_ids, real, lengths


def _session(model, base, lm_head, params, lengths, max_new_tokens, eos, pad, backend, block_size,
             cache_dtype, scales) -> _Session:
    """The model's kept session if this call fits it, else a new one (replacing the old, freed first)."""
    batch, device, dtype = len(lengths), lm_head.weight.device, lm_head.weight.dtype
    blocks_per_seq = blocks_for(max(lengths) + max_new_tokens, block_size)
    key = (batch, blocks_per_seq, block_size, max_new_tokens, params, tuple(eos), pad, backend, device, dtype,
           cache_dtype, tuple(None if s is None else tuple(torch.as_tensor(s, dtype=torch.float32).flatten().tolist())
                              for s in scales), tuple(p.data_ptr() for p in model.parameters()))
    session = model.__dict__.get(_SESSION)
    if session is not None and session.key == key:
        return session
    release(model)
    shape = attention_shape(base.config)
    window = None if _is_gpt2(model) else shared_window(base.config)
    # Every layer windowed: each sequence keeps a ring of the pages its window spans, not its whole context, plus
    # two tokens: graph capture's warm-up steps write positions n and n + 1 ahead of the real steps (which rewrite
    # them), and their ring slots must lie outside every window still to be read.
    ring_blocks = None if window is None else min(blocks_for(window + 2, block_size), blocks_per_seq)
    pool = PagedKVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, max_batch_size=batch,
                        num_blocks=batch * (ring_blocks or blocks_per_seq), block_size=block_size,
                        max_blocks_per_seq=blocks_per_seq,
                        dtype=dtype, device=device, backend=backend, cache_dtype=cache_dtype, k_scale=scales[0],
                        v_scale=scales[1])
    state = _DecodeState(
        tokens=torch.zeros(batch, dtype=torch.long, device=device),
        lengths=torch.zeros(batch, dtype=torch.int32, device=device),
        finished=torch.zeros(batch, dtype=torch.bool, device=device),
        done_at=torch.zeros(batch, dtype=torch.long, device=device),
        step=torch.zeros(batch, dtype=torch.long, device=device),
        out=torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device),
        seen=torch.zeros(batch, lm_head.out_features, dtype=torch.bool, device=device) if params.uses_penalty else None,
        eos=torch.tensor(eos, dtype=torch.long, device=device), pad=pad)
    if _is_gpt2(model):
        runner = _Runner(base, lm_head, pool, batch, params)
    else:
        from .hf.runner import DecoderRunner
        runner = DecoderRunner(model, pool, batch, functools.partial(_select, _step_ops(pool.backend, device), params),
                               ring_window=window if ring_blocks else None, ring_blocks=ring_blocks)
    session = _Session(key, pool, runner, state, ring_blocks)
    model.__dict__[_SESSION] = session
    return session


def _reset_state(state: _DecodeState, input_ids, real, lengths):
    """Refills a session's state tensors in place (the captured graph holds their addresses)."""
    state.tokens.zero_()
    state.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
    state.finished.zero_()
    state.done_at.fill_(state.out.shape[1])
    state.step.zero_()
    state.out.fill_(state.pad)
    if state.seen is not None:
        state.seen.zero_()
        # The prompt tokens HF's repetition penalty counts: every column up to transformers 5.17, from the first
        # real one on after it (left padding skipped).
        counted = torch.ones_like(real) if hf_penalises_left_padding() else real.long().cummax(1).values.bool()
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
        state.seen[rows[counted], input_ids[counted]] = True


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, *, max_new_tokens=None, do_sample=None, temperature=None,
             top_k=None, top_p=None, repetition_penalty=None, eos_token_id=None, pad_token_id=None, cuda_graph=True,
             streamer=None, backend="auto", block_size=16, cache_dtype=None, k_scale=None, v_scale=None):
    """Generates up to `max_new_tokens` tokens per prompt with a Hugging Face decoder.

    Args:
        model: GPT2LMHeadModel, or any head model kvkernels.patch serves (LlamaForCausalLM, MistralForCausalLM,
            Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, ...), in eval mode (fp32 / fp16 / bf16).
        input_ids: int64 [B, P], prompts left-padded to a common length.
        attention_mask: [B, P] of 0/1 (padding 0), or None when nothing is padded. The last column must be
            real; a 0 after a row's first real column is refused where a sliding window is shorter than
            P + max_new_tokens - 1.
        max_new_tokens: tokens to generate; the longest prompt plus this, less the last token (never fed back),
            must fit in a learned position table (GPT-2's n_positions; rotary models have none).
        do_sample, temperature, top_k, top_p, repetition_penalty: as in HF generate.
        Each of these left None means what it means in `model.generate`: model.generation_config's value, else
        HF's default (greedy; top_k=50 when sampling; 20 new tokens). A generation_config
        that asks for a logits processor this loop lacks (no_repeat_ngram_size, min_length, ...) is an error.
        The repetition penalty counts the prompt as the installed transformers does: left padding included up to
        5.17, excluded after.
        eos_token_id: int or list; None takes model.generation_config.eos_token_id, [] disables stopping.
        pad_token_id: emitted after a sequence's EOS; None takes the generation config's pad, else the first EOS.
        cuda_graph: capture the decode step once and replay it (CUDA with the Triton or CUDA backend; the CPU
            and the PyTorch reference backend run eagerly).
        streamer: HF streamer protocol: `put(prompt ids [B, P])` first, then `put(tokens [B])` per step, `end()`.
        backend: kernel backend, "auto" | "triton" | "cuda" | "torch".
        block_size: tokens per page.
        cache_dtype: None (pages in the model's dtype: tokens as HF's), or "fp8" / torch.float8_e4m3fn or "int8" /
            torch.int8: quantized pages with per-token scales, ~2x the tokens per byte of fp16 and about half
            the bytes each decode step reads, at an accuracy cost (BENCHMARKS.md, "Quantized KV"); Triton or
            the PyTorch reference only.
        k_scale, v_scale: with fp8 / int8 pages, static scales instead of per-token ones (vLLM's k_scale /
            v_scale): fp32, broadcastable to [num_layers, H_kv]; a value past +-448 x scale (fp8) or +-127 x scale
            (int8) saturates. None: per (token, KV head) scales from each written row's absmax.

    Returns:
        int64 [B, P + n]: prompts then generated tokens, n <= max_new_tokens (fewer when every sequence
        reached EOS, as in HF). Sampling draws from torch's default generator: seed it for reproducibility.
    """
    prompt_width = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0
    _model_parts(model)                                # a clear TypeError for a model it cannot serve first
    settings = generation_settings(model, prompt_width, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty)
    max_new_tokens = settings["max_new_tokens"]
    params = SamplingParams(settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"],
                            settings["repetition_penalty"])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_positive_int("block_size", block_size)
    base, lm_head, input_ids, real, lengths = _check_inputs(model, input_ids, attention_mask, max_new_tokens)
    gen_config = getattr(model, "generation_config", None)
    eos = _token_ids(getattr(gen_config, "eos_token_id", None) if eos_token_id is None else eos_token_id,
                     "eos_token_id")
    pad = getattr(gen_config, "pad_token_id", None) if pad_token_id is None else pad_token_id
    pad = pad.tolist() if isinstance(pad, torch.Tensor) else pad
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, numbers.Integral)):
        raise ValueError(f"pad_token_id must be one token id, got {pad!r}")
    pad_token_id = (eos[0] if eos else 0) if pad is None else int(pad)
    # A sequence that ends feeds pad back in (as in HF); without an EOS it is never fed (some configs pad with -1).
    if eos and not 0 <= pad_token_id < lm_head.out_features:
        raise ValueError(f"pad_token_id={pad_token_id} must be a token id in [0, {lm_head.out_features}) when an EOS "
                         "can end a sequence: an ended sequence feeds it back, as in HF")
    device = input_ids.device
    cache_dtype = resolve_cache_dtype(cache_dtype)
    session = _session(model, base, lm_head, params, lengths, max_new_tokens, eos, pad_token_id,
                       resolve_backend(backend, device, quantized=is_quantized(cache_dtype)), block_size, cache_dtype,
                       (k_scale, v_scale))
    pool, runner, state = session.pool, session.runner, session.state
    pool.reset()
    totals = [n + max_new_tokens for n in lengths]                 # every block table filled up front
    if session.ring_blocks:
        pool.reserve_ring(range(len(lengths)), totals, session.ring_blocks)
    else:
        pool.reserve(range(len(lengths)), totals)
    _reset_state(state, input_ids, real, lengths)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    runner.select(runner.prefill(input_ids, real), state)
    if cuda_graph and _graphs_supported(device, pool.backend) and max_new_tokens > 1:
        if session.replay is None:
            session.replay = _capture(runner, state, warm_up_steps=min(2, max_new_tokens - 1))
        decode_step = session.replay
    else:
        decode_step = functools.partial(runner.decode_step, state)
    # A streamer wants each token as it is made (HF streams per step); CPU ops are synchronous anyway.
    check_every = EOS_CHECK_EVERY if device.type == "cuda" and streamer is None else 1
    generated, streamed = 1, 0
    while True:
        at_check = generated == max_new_tokens or generated % check_every == 0
        if at_check:
            all_done = bool(eos) and bool(state.finished.all())
            columns = int(state.done_at.max()) + 1 if all_done else generated
            if streamer is not None:
                for column in state.out[:, streamed:columns].cpu().unbind(1):
                    streamer.put(column)
                streamed = columns
            if all_done or generated == max_new_tokens:
                break
        decode_step()
        generated += 1
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, state.out[:, :columns]], dim=1)
