"""kvkernels.patch(model): serve a Hugging Face GPT-2's KV cache from kvkernels' paged pool.

Three per-instance hooks (the classes are never touched; unpatch deletes them again):
    * each GPT2Attention's `forward`: when the call's cache is a PagedGPT2Cache, write K/V into the pool and
      attend with kvkernels (decode kernel for one token per sequence); any other cache or none -> the
      original forward, untouched.
    * the GPT2Model's `forward`: creates a PagedGPT2Cache where HF would create a DynamicCache (eval, use_cache,
      no gradients, no attention outputs), and brackets the call with the cache's begin_step / end_step,
      which need the 2D padding mask HF reduces to a 4D one before the layers see it.
    * the head model's `_prepare_cache_for_generation`: `generate` gets a PagedGPT2Cache sized for
      batch x (num_beams or num_return_sequences) x (prompt + max_new_tokens), after HF has settled every
      length; unsupported modes (assisted, DoLa, output_attentions, explicit caches) keep HF's own cache.
"""
import contextlib
import types
from dataclasses import dataclass, field

import torch

from .gpt2_common import attention_scale, blocks_for, check_cache_dtype, check_positive_int, gpt2_parts
from .hf_cache import PagedGPT2Cache
from .ops import BACKENDS

_STATE = "_kvkernels_patch"
_MISSING = object()
_PAGED_GENERATION_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")
# GPT2Model.forward's parameters after attention_mask, in order, so positional calls can be named.
_FORWARD_ARGS = ("token_type_ids", "position_ids", "inputs_embeds", "encoder_hidden_states", "encoder_attention_mask",
                 "use_cache")


@dataclass
class PatchOptions:
    backend: str = "auto"
    block_size: int = 16
    max_tokens: int = None
    cache_dtype: torch.dtype = None


@dataclass
class _PatchState:
    options: PatchOptions
    saved: list = field(default_factory=list)   # (object, attribute, previous instance value or _MISSING)

    def install(self, obj, name, function):
        self.saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        object.__setattr__(obj, name, types.MethodType(function, obj))

    def new_cache(self, config, **sizes):
        o = self.options
        return PagedGPT2Cache(config, max_tokens=o.max_tokens, block_size=o.block_size, backend=o.backend,
                              cache_dtype=o.cache_dtype, **sizes)


def patch(model, *, backend="auto", block_size=16, max_tokens=None, cache_dtype=None):
    """Serves `model`'s KV cache from a kvkernels paged pool; returns `model` (patched in place).

    Args:
        model: a Hugging Face GPT2LMHeadModel or GPT2Model (or a model whose `.transformer` is a GPT2Model).
        backend: kernel backend, "auto" | "triton" | "cuda" | "torch" (resolved on the first call, per device).
        block_size: tokens per page.
        max_tokens: fixes the pool at this many tokens over all sequences (CacheFullError past it).
            None sizes it per call: batch x (prompt + max_new_tokens) in generate, grown when a call needs more.
        cache_dtype: dtype of the pages; None keeps the model's dtype (exact against HF).

    Patching twice only updates the options. `unpatch` restores the original methods exactly.
    """
    base, _ = gpt2_parts(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_positive_int("block_size", block_size)
    check_positive_int("max_tokens", max_tokens, allow_none=True)
    check_cache_dtype(cache_dtype)
    options = PatchOptions(backend, block_size, max_tokens, cache_dtype)
    state = base.__dict__.get(_STATE)
    if state is not None:
        state.options = options
    else:
        state = _PatchState(options)
        for block in base.h:
            state.install(block.attn, "forward", _attention_forward)
        state.install(base, "forward", _model_forward)
        object.__setattr__(base, _STATE, state)
    installed = getattr(model.__dict__.get("_prepare_cache_for_generation"), "__func__", None)
    if model is not base and hasattr(model, "_prepare_cache_for_generation") \
            and installed is not _prepare_cache_for_generation:
        state.install(model, "_prepare_cache_for_generation", _prepare_cache_for_generation)
    return model


def unpatch(model):
    """Removes everything `patch` installed on `model` (a no-op if it is not patched). Returns `model`."""
    state = _state(model)
    if state is None:
        return model
    for obj, name, previous in reversed(state.saved):
        if previous is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = previous
    del gpt2_parts(model)[0].__dict__[_STATE]
    return model


def is_patched(model) -> bool:
    return _state(model) is not None


@contextlib.contextmanager
def patched(model, **options):
    """`with kvkernels.patched(model, backend=...):` patches for the block, then restores: unpatched if it was
    not patched before, else its previous options."""
    state = _state(model)
    previous = None if state is None else state.options
    patch(model, **options)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            _state(model).options = previous


def _state(model):
    return gpt2_parts(model)[0].__dict__.get(_STATE)


# -- the hooks ---------------------------------------------------------------------------------


def _attention_forward(self, hidden_states, *args, **kwargs):
    cache = kwargs.get("past_key_values", args[0] if args else None)
    if not isinstance(cache, PagedGPT2Cache):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    if self.is_cross_attention or kwargs.get("encoder_hidden_states") is not None:
        raise ValueError("kvkernels' paged cache serves GPT-2 self-attention only, not cross-attention")
    batch, num_new, _ = hidden_states.shape
    query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)              # [B, T, E] each
    shape = (batch, num_new, self.num_heads, self.head_dim)
    out = cache.attend(self.layer_idx, query.view(shape), key.view(shape), value.view(shape),
                       attention_scale(self), upcast=self.reorder_and_upcast_attn)              # [B, T, H, D]
    out = self.resid_dropout(self.c_proj(out.reshape(batch, num_new, -1)))
    return out, None


def _unsupported_reason(base, attention_mask, kwargs):
    """Why this forward cannot use a paged cache, or None."""
    if base.training:
        return "the model is in training mode (call model.eval())"
    if torch.is_grad_enabled() and (base.wte.weight.requires_grad or base.h[0].attn.c_attn.weight.requires_grad):
        return "gradients are enabled (run under torch.no_grad() or torch.inference_mode())"
    if kwargs.get("output_attentions", getattr(base.config, "output_attentions", False)):
        return "output_attentions=True needs the attention matrix, which paged attention never materialises"
    if kwargs.get("encoder_hidden_states") is not None or base.config.add_cross_attention:
        return "cross-attention GPT-2 configs are not supported"
    if attention_mask is not None and attention_mask.dim() != 2:
        return "the attention_mask is not 2D [batch, past + new tokens]"
    if kwargs.get("is_causal", getattr(base.config, "is_causal", True)) is False:
        return "bidirectional attention (is_causal=False) is not supported"
    return None


def _model_forward(self, input_ids=None, past_key_values=None, attention_mask=None, *args, **kwargs):
    if len(args) > len(_FORWARD_ARGS):
        raise TypeError(f"GPT2Model.forward got {3 + len(args)} positional arguments")
    for name, value in zip(_FORWARD_ARGS, args):
        if name in kwargs:
            raise TypeError(f"GPT2Model.forward got multiple values for argument {name!r}")
        kwargs[name] = value
    original = type(self).forward.__get__(self)
    cache = past_key_values
    if cache is None:
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and _unsupported_reason(self, attention_mask, kwargs) is None:
            cache = self.__dict__[_STATE].new_cache(self.config)
    if not isinstance(cache, PagedGPT2Cache):
        return original(input_ids, past_key_values=cache, attention_mask=attention_mask, **kwargs)
    reason = _unsupported_reason(self, attention_mask, kwargs)
    if reason is not None:
        raise ValueError(f"cannot run with kvkernels' PagedGPT2Cache: {reason}. Call kvkernels.unpatch(model) or "
                         "pass a DynamicCache for this call")
    inputs = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if input_ids is not None:
        num_new = input_ids.shape[-1]
        batch = input_ids.numel() // max(num_new, 1)
    else:
        batch, num_new = inputs.shape[:2]
    if kwargs.get("position_ids") is None and cache.get_seq_length() + num_new > self.config.n_positions:
        raise ValueError(f"this call would reach position {cache.get_seq_length() + num_new - 1}, but the model has "
                         f"n_positions={self.config.n_positions} (positions 0..{self.config.n_positions - 1})")
    cache.begin_step(batch, num_new, attention_mask, self.wte.weight.dtype, inputs.device)
    try:
        out = original(input_ids, past_key_values=cache, attention_mask=attention_mask, **kwargs)
    except BaseException:
        cache.abort_step()
        raise
    cache.end_step()
    return out


def _generation_mode_name(mode):
    return getattr(mode, "value", mode)


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length, *args, **kwargs):
    original = type(self)._prepare_cache_for_generation.__get__(self)
    base, _ = gpt2_parts(self)
    attention_mask = model_kwargs.get("attention_mask")
    eligible = (model_kwargs.get("past_key_values") is None
                and generation_config.use_cache is not False
                and generation_config.cache_implementation is None
                and not generation_config.output_attentions
                and not model_kwargs.get("output_attentions", False)
                and _generation_mode_name(generation_mode) in _PAGED_GENERATION_MODES
                and _unsupported_reason(base, attention_mask, model_kwargs) is None)
    if not eligible:
        return original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
    max_length = max_cache_length + 1                    # HF's max_length: padded prompt + max_new_tokens
    longest = max_length
    if attention_mask is not None:                       # left padding is not stored, nor given a position
        longest = int(attention_mask.sum(-1).max()) + max_length - attention_mask.shape[-1]
    n_positions = base.config.n_positions
    if longest > n_positions:
        raise ValueError(f"generate would reach {longest} positions (prompt + max_new_tokens) but the model has "
                         f"n_positions={n_positions}: shorten the prompt or lower max_new_tokens")
    num_seqs = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    state = base.__dict__[_STATE]
    planned = num_seqs * blocks_for(longest, state.options.block_size) * state.options.block_size
    model_kwargs["past_key_values"] = state.new_cache(base.config, num_seqs=num_seqs, planned_tokens=planned)
