"""kvkernels.patch(model): serve a Hugging Face GPT-2's KV cache from kvkernels' paged pool.

Three per-instance hooks (the classes are never touched; unpatch deletes them again). Each keeps the original
method's `inspect.signature` (HF's tests and the Trainer read it):
    * each GPT2Attention's `forward`: when the call's cache is a PagedGPT2Cache, write K/V into the pool and
      attend with kvkernels (decode kernel for one token per sequence); any other cache or none -> the
      original forward, untouched.
    * the GPT2Model's `forward`: creates a PagedGPT2Cache where HF would create a DynamicCache, and brackets the
      call with the cache's begin_step / end_step, which need the 2D padding mask HF reduces to a 4D one before
      the layers see it. Only where the paged path is exact: every module in eval mode (dropout off), no gradient
      can flow (the kernels have no autograd), no attention weights asked for, self-attention only, a 2D mask.
      Anything else runs HF's own forward and DynamicCache, and says why once per model (a warning).
    * the head model's `_prepare_cache_for_generation`: `generate` gets a PagedGPT2Cache sized for
      batch x (num_beams or num_return_sequences) x (prompt + max_new_tokens), after HF has settled every
      length, for greedy, sampling, beams and assisted decoding (the cache crops); other modes and explicit
      caches keep HF's.
transformers renamed GPT-2's `past_key_values` argument to `cache` after 5.17; both are accepted.
"""
import contextlib
import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .gpt2_common import attention_scale, blocks_for, check_cache_dtype, check_positive_int, gpt2_parts
from .hf_cache import PagedGPT2Cache
from .ops import BACKENDS

_STATE = "_kvkernels_patch"
_MISSING = object()
_PAGED_GENERATION_MODES = ("greedy_search", "sample", "beam_search", "beam_sample", "assisted_generation")
_CACHE_ARGS = ("cache", "past_key_values")   # the cache argument's name: newest transformers first, then 5.17's


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
    warned: set = field(default_factory=set)    # fallback reasons already reported

    def install(self, obj, name, function):
        """Sets obj.name to `function` bound to obj, showing the class method's signature and docstring."""
        self.saved.append((obj, name, obj.__dict__.get(name, _MISSING)))

        @functools.wraps(getattr(type(obj), name))
        def hook(module, *args, **kwargs):
            return function(module, *args, **kwargs)
        hook._kvkernels_hook = function
        object.__setattr__(obj, name, types.MethodType(hook, obj))

    def warn_once(self, reason):
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"kvkernels: this call runs HF's own attention and cache, not the paged cache: {reason}",
                          stacklevel=4)

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
        cache_dtype: dtype of the pages; None keeps the model's dtype (exact against HF). "fp8" /
            torch.float8_e4m3fn or "int8" / torch.int8 store quantized pages with per-token scales: ~2x the
            tokens per byte, no longer exact (BENCHMARKS.md, "Quantized KV"); Triton or the reference only.

    Patching twice only updates the options. `unpatch` restores the original methods exactly.
    """
    base, _ = gpt2_parts(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_positive_int("block_size", block_size)
    check_positive_int("max_tokens", max_tokens, allow_none=True)
    options = PatchOptions(backend, block_size, max_tokens, check_cache_dtype(cache_dtype))
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
            and getattr(installed, "_kvkernels_hook", None) is not _prepare_cache_for_generation:
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


@functools.lru_cache(maxsize=None)
def _parameters(function):
    """(names of `function`'s parameters after self, up to its **kwargs; the name it gives the cache)."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    names = tuple(p.name for p in parameters if p.kind is not p.VAR_KEYWORD)
    return names, next((n for n in _CACHE_ARGS if n in names), _CACHE_ARGS[-1])


def _named_arguments(function, args, kwargs):
    """Every argument of a call to `function` (a forward, called with `args` after self) by name, and the cache
    under the name `function` gives it (the other, deprecated name folded in). Returns (arguments, cache name).
    Cheaper than inspect's bind: the attention hook runs per layer per step."""
    names, cache_name = _parameters(function)
    if len(args) > len(names):
        raise TypeError(f"{function.__qualname__} takes {len(names)} positional arguments after self, got {len(args)}")
    arguments = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in arguments:
            raise TypeError(f"{function.__qualname__} got multiple values for argument {name!r}")
        arguments[name] = value
    for alias in _CACHE_ARGS:
        if alias != cache_name and alias in arguments:
            value = arguments.pop(alias)
            if arguments.get(cache_name) is None:
                arguments[cache_name] = value
    return arguments, cache_name


def _attention_forward(self, *args, **kwargs):
    if torch.compiler.is_compiling():           # a compiled forward traces HF's own code (never a paged cache)
        return type(self).forward(self, *args, **kwargs)
    arguments, cache_name = _named_arguments(type(self).forward, args, kwargs)
    cache = arguments.get(cache_name)
    if not isinstance(cache, PagedGPT2Cache):
        return type(self).forward(self, *args, **kwargs)
    if self.is_cross_attention or arguments.get("encoder_hidden_states") is not None:
        raise ValueError("kvkernels' paged cache serves GPT-2 self-attention only, not cross-attention")
    hidden_states = arguments["hidden_states"]
    batch, num_new, _ = hidden_states.shape
    query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)              # [B, T, E] each
    shape = (batch, num_new, self.num_heads, self.head_dim)
    # HF upcasts only on its eager path (_upcast_and_reordered_attn); sdpa runs in the model's dtype.
    upcast = self.reorder_and_upcast_attn and self.config._attn_implementation == "eager"
    out = cache.attend(self.layer_idx, query.view(shape), key.view(shape), value.view(shape),
                       attention_scale(self), upcast=upcast)                                   # [B, T, H, D]
    out = self.resid_dropout(self.c_proj(out.reshape(batch, num_new, -1)))
    return out, None


def _gradient_can_flow(base, arguments):
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in arguments.values()) \
        or any(p.requires_grad for p in base.parameters())


def _unsupported_reason(base, arguments):
    """Why this forward cannot run exactly on a paged cache, or None."""
    if any(module.training for module in base.modules()):
        return "a module of the model is in training mode, so dropout must run (call model.eval())"
    if _gradient_can_flow(base, arguments):
        return ("a gradient can flow through this forward (a parameter or input requires grad) and the paged "
                "kernels have no autograd; run under torch.no_grad() or freeze the weights and inputs")
    if arguments.get("output_attentions") or getattr(base.config, "output_attentions", False):
        return "output_attentions=True needs the attention matrix, which paged attention never materialises"
    if arguments.get("encoder_hidden_states") is not None or base.config.add_cross_attention:
        return "cross-attention GPT-2 configs are not supported"
    attention_mask = arguments.get("attention_mask")
    if attention_mask is not None and attention_mask.dim() != 2:
        return "the attention_mask is not 2D [batch, past + new tokens]"
    if arguments.get("is_causal", getattr(base.config, "is_causal", True)) is False:
        return "bidirectional attention (is_causal=False) is not supported"
    return None


def _model_forward(self, *args, **kwargs):
    if torch.compiler.is_compiling():
        return type(self).forward(self, *args, **kwargs)
    arguments, cache_name = _named_arguments(type(self).forward, args, kwargs)
    original = type(self).forward.__get__(self)
    state = self.__dict__[_STATE]
    cache = arguments.pop(cache_name, None)
    if cache is None:
        use_cache = arguments.get("use_cache")
        if use_cache if use_cache is not None else self.config.use_cache:
            reason = _unsupported_reason(self, arguments)
            if reason is None:
                cache = state.new_cache(self.config)
            else:
                state.warn_once(reason)
    elif type(cache) is DynamicCache and cache.get_seq_length() == 0 \
            and not getattr(cache, "_is_user_defined", False) and _unsupported_reason(self, arguments) is None:
        state.warn_once(f"it was given an empty {type(cache).__name__} (what model.generate makes when only "
                        "model.transformer is patched: patch the model with its LM head; or pass no cache)")
    if not isinstance(cache, PagedGPT2Cache):
        return original(**arguments, **{cache_name: cache})
    reason = _unsupported_reason(self, arguments)
    if reason is not None:
        raise ValueError(f"cannot run with kvkernels' PagedGPT2Cache: {reason}. Call kvkernels.unpatch(model) or "
                         "pass a DynamicCache for this call")
    input_ids, inputs_embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
    inputs = input_ids if input_ids is not None else inputs_embeds
    if inputs is None:
        raise ValueError("You have to specify either input_ids or inputs_embeds")
    if input_ids is not None:
        num_new = input_ids.shape[-1]
        batch = input_ids.numel() // max(num_new, 1)
    else:
        batch, num_new = inputs.shape[:2]
    if arguments.get("position_ids") is None and cache.get_seq_length() + num_new > self.config.n_positions:
        raise ValueError(f"this call would reach position {cache.get_seq_length() + num_new - 1}, but the model has "
                         f"n_positions={self.config.n_positions} (positions 0..{self.config.n_positions - 1})")
    cache.begin_step(batch, num_new, arguments.get("attention_mask"), self.wte.weight.dtype, inputs.device)
    try:
        out = original(**arguments, **{cache_name: cache})
    except BaseException:
        cache.abort_step()
        raise
    cache.end_step()
    return out


def _generation_fallback_reason(model, base, generation_config, model_kwargs, generation_mode):
    mode = getattr(generation_mode, "value", generation_mode)
    if getattr(model.forward, "_torchdynamo_orig_callable", None) is not None \
            or getattr(model, "_compiled_call_impl", None) is not None:
        return "the model is compiled (torch.compile), and only HF's own caches can be traced"
    if generation_config.cache_implementation is not None:
        return f"cache_implementation={generation_config.cache_implementation!r} asks for HF's own cache"
    if generation_config.output_attentions:
        return "output_attentions=True needs the attention matrix, which paged attention never materialises"
    if mode not in _PAGED_GENERATION_MODES:
        return f"generation mode {mode!r} is not served by the paged cache"
    return _unsupported_reason(base, model_kwargs)


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length, *args, **kwargs):
    original = type(self)._prepare_cache_for_generation.__get__(self)
    base, _ = gpt2_parts(self)
    state = base.__dict__[_STATE]
    cache_name = _parameters(type(base).forward)[1]
    reason = _generation_fallback_reason(self, base, generation_config, model_kwargs, generation_mode)
    eligible = model_kwargs.get(cache_name) is None and generation_config.use_cache is not False
    if eligible and reason is not None:
        state.warn_once(reason)
    if not eligible or reason is not None:
        return original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
    attention_mask = model_kwargs.get("attention_mask")
    max_length = max_cache_length + 1                    # HF's max_length: padded prompt + max_new_tokens
    longest = max_length
    if attention_mask is not None:                       # left padding is not stored, nor given a position
        longest = int(attention_mask.sum(-1).max()) + max_length - attention_mask.shape[-1]
    n_positions = base.config.n_positions
    if longest > n_positions:
        raise ValueError(f"generate would reach {longest} positions (prompt + max_new_tokens) but the model has "
                         f"n_positions={n_positions}: shorten the prompt or lower max_new_tokens")
    num_seqs = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    planned = num_seqs * blocks_for(longest, state.options.block_size) * state.options.block_size
    model_kwargs[cache_name] = state.new_cache(base.config, num_seqs=num_seqs, planned_tokens=planned)
