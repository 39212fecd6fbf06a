"""kvkernels.patch(model): serve a Hugging Face decoder's KV cache from kvkernels' paged pool.

One path for every decoder whose attention goes through transformers' attention registry (GPT-2, Llama, Mistral,
Qwen2, Qwen3, Phi3, ...): no per-family code. Two per-instance hooks (the classes are never touched; unpatch deletes
them again), each keeping the original method's `inspect.signature` (HF's tests and the Trainer read it):
    * the decoder stack's `forward` (GPT2Model, LlamaModel, ...; OPT's OPTDecoder: decoder_stack): creates a
      PagedCache where HF would create a DynamicCache, brackets the call with the cache's begin_step / end_step
      (which need the 2D padding mask), and for that call switches the model's configs to the "kvkernels"
      attention function (kvkernels.hf.attention), which writes each layer's new K/V into the pool and attends
      with the kvkernels kernels. Only where the paged path is
      exact: every module in eval mode (dropout off), no gradient can flow (the kernels have no autograd), no attention
      weights asked for, self-attention only, a 2D mask. Anything else runs HF's own forward, attention and
      DynamicCache, untouched, and says why once per model (a warning).
    * the head model's `_prepare_cache_for_generation`: `generate` gets a PagedCache sized for
      batch x (num_beams or num_return_sequences) x (prompt + max_new_tokens), after HF has settled every
      length, for greedy, sampling, beams and assisted decoding (the cache crops); other modes and explicit
      caches keep HF's.
A model loaded with `attn_implementation="kvkernels"` is patched with the default options on its first `generate`:
the one hook on a transformers class (GenerationMixin._prepare_cache_for_generation, installed on import), a no-op for
every model whose config names another attention implementation.
transformers renamed the `past_key_values` argument to `cache` after 5.17; both are accepted.
"""
import contextlib
import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel

from .._validate import is_quantized
from ..cache import static_scales
from ..gpt2_common import blocks_for, check_cache_dtype, check_positive_int
from ..ops import BACKENDS
from .attention import NAME, active_cache, model_configs
from .cache import PagedCache, attention_shape

_STATE = "_kvkernels_patch"


class _Missing:
    """Marks a hook that shadowed no instance attribute. copy, deepcopy and pickle keep the one instance (a
    deep-copied patched model must unpatch like the original)."""

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
_PAGED_GENERATION_MODES = ("greedy_search", "sample", "beam_search", "beam_sample", "assisted_generation")
_CACHE_ARGS = ("cache", "past_key_values")   # the cache argument's name: newest transformers first, then 5.17's
# Layer types (config.layer_types) the paged attention serves: softmax attention over the whole context or a sliding
# window ("attention" is full attention's older name). Other layers keep state a PagedCache has no room for (mamba,
# linear attention, convolution, compressed or shared K/V) or attend within chunks (Llama4), which it does not mask.
_SERVED_LAYER_TYPES = ("full_attention", "sliding_attention", "attention")


@dataclass
class PatchOptions:
    backend: str = "auto"
    block_size: int = 16
    max_tokens: int = None
    cache_dtype: torch.dtype = None
    k_scale: object = None
    v_scale: object = None


@dataclass
class _PatchState:
    options: PatchOptions
    configs: list                               # every config the base model's modules read the attention from
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

    def new_cache(self, base, **sizes):
        o = self.options
        return PagedCache(base.config, max_tokens=o.max_tokens, block_size=o.block_size, backend=o.backend,
                          cache_dtype=o.cache_dtype, position_limit=position_limit(base), k_scale=o.k_scale,
                          v_scale=o.v_scale, **sizes)


def position_limit(base):
    """The positions a learned position table gives (GPT-2's wpe: n_positions), or None (rotary, ALiBi, ...: HF runs
    past max_position_embeddings, and so does the paged cache). A table is any embedding besides the token embedding
    with at least max_position_embeddings rows."""
    limit = attention_shape(base.config).max_positions
    tokens = base.get_input_embeddings()
    tables = (m for m in base.modules() if isinstance(m, torch.nn.Embedding) and m is not tokens)
    return limit if any(table.num_embeddings >= limit for table in tables) else None


def decoder_stack(model):
    """The module whose forward runs `model`'s decoder layers, the one patch hooks: the base model, or the only
    PreTrainedModel under it when that one holds the token embedding and takes the cache (OPTModel.decoder, which
    OPTForCausalLM calls directly, past OPTModel.forward). Multimodal base models hold several and stay."""
    base = model.base_model
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return base
    inner = [m for m in base.children() if isinstance(m, PreTrainedModel)]
    if len(inner) == 1 and any(m is embeddings for m in inner[0].modules()) \
            and any(name in _parameters(type(inner[0]).forward)[0] for name in _CACHE_ARGS):
        return inner[0]
    return base


def decoder_parts(model):
    """(decoder stack, see decoder_stack; head model or None) of `model`, or a TypeError naming what kvkernels cannot
    serve."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a Hugging Face decoder-only model (GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi3, "
                        f"...), got {type(model).__name__}")
    base = model.base_model
    config = base.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{name} is an encoder-decoder model; kvkernels serves decoder-only models")
    if not getattr(type(base), "_supports_attention_backend", False):
        raise TypeError(f"{name}'s attention does not go through transformers' attention registry "
                        f"({type(base).__name__}._supports_attention_backend is False), which kvkernels plugs into")
    if getattr(model, "_is_stateful", False) or not _default_cache_fits(type(model)):
        raise TypeError(f"{name} keeps recurrent state or a cache of its own (not transformers' DynamicCache), which "
                        "kvkernels' paged cache cannot stand in for")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    other = sorted({t for t in getattr(text, "layer_types", None) or () if t not in _SERVED_LAYER_TYPES})
    if other:
        raise TypeError(f"{name} has {', '.join(other)} layers (config.layer_types), which kvkernels does not serve: "
                        "every layer must be softmax attention over the context or a sliding window")
    try:
        head_dim = attention_shape(config).head_dim
    except ValueError as err:
        raise TypeError(str(err)) from None
    key_dim, value_dim = getattr(text, "qk_head_dim", head_dim), getattr(text, "v_head_dim", head_dim)
    if (key_dim, value_dim) != (head_dim, head_dim):
        raise TypeError(f"{name}'s keys are {key_dim} wide and its values {value_dim} (multi-head latent attention), "
                        f"where kvkernels' pages hold head_dim={head_dim} for both")
    return decoder_stack(model), (model if model is not base else None)


def _default_cache_fits(model_class) -> bool:
    """transformers' own test of whether generate may give `model_class` a DynamicCache: a GenerationMixin
    classmethod (by class name), which base models lack."""
    method = getattr(model_class, "_supports_default_dynamic_cache", None)
    return method() if method is not None else GenerationMixin._supports_default_dynamic_cache.__func__(model_class)


def patch(model, *, backend="auto", block_size=16, max_tokens=None, cache_dtype=None, k_scale=None, v_scale=None):
    """Serves `model`'s KV cache from a kvkernels paged pool; returns `model` (patched in place).

    Args:
        model: a Hugging Face decoder-only model whose attention uses transformers' attention registry: a head model
            (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
            Phi3ForCausalLM, ...) or its base model (GPT2Model, LlamaModel, ...).
        backend: kernel backend, "auto" | "triton" | "cuda" | "torch" (resolved on the first call, per device).
        block_size: tokens per page.
        max_tokens: fixes the pool at this many tokens over all sequences (CacheFullError past it).
            None sizes it per call: batch x (prompt + max_new_tokens) in generate, grown when a call needs more.
        cache_dtype: dtype of the pages; None keeps the model's dtype (exact against HF). "fp8" /
            torch.float8_e4m3fn or "int8" / torch.int8 store quantized pages with per-token scales: ~2x the
            tokens per byte, no longer exact (BENCHMARKS.md, "Quantized KV"); Triton or the reference only.
        k_scale, v_scale: with fp8 / int8 pages, static scales instead of per-token ones (vLLM's k_scale /
            v_scale): fp32, broadcastable to [num_layers, H_kv]; values past +-448 x scale (fp8) or +-127 x scale
            (int8) saturate. None: per (token, KV head) scales from each written row's absmax.

    Patching twice only updates the options. `unpatch` restores the original methods exactly.
    """
    base, head = decoder_parts(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_positive_int("block_size", block_size)
    check_positive_int("max_tokens", max_tokens, allow_none=True)
    cache_dtype = check_cache_dtype(cache_dtype)
    shape = attention_shape(base.config)
    static_scales(k_scale, v_scale, is_quantized(cache_dtype), shape.num_layers, shape.num_kv_heads, "cpu")  # checks
    options = PatchOptions(backend, block_size, max_tokens, cache_dtype, k_scale, v_scale)
    state = base.__dict__.get(_STATE)
    if state is not None:
        state.options = options
    else:
        state = _PatchState(options, model_configs(base))
        state.install(base, "forward", _model_forward)
        object.__setattr__(base, _STATE, state)
    installed = getattr(model.__dict__.get("_prepare_cache_for_generation"), "__func__", None)
    if head is not None and hasattr(head, "_prepare_cache_for_generation") \
            and getattr(installed, "_kvkernels_hook", None) is not _prepare_cache_for_generation:
        state.install(head, "_prepare_cache_for_generation", _prepare_cache_for_generation)
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
    del decoder_stack(model).__dict__[_STATE]
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
    # None for anything unpatched, a model patch refuses included
    return decoder_stack(model).__dict__.get(_STATE) if isinstance(model, PreTrainedModel) else None


# -- the hooks ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _parameters(function):
    """(names of `function`'s parameters after self, up to its **kwargs; the name it gives the cache)."""
    parameters = list(inspect.signature(function).parameters.values())[1:]
    names = tuple(p.name for p in parameters if p.kind is not p.VAR_KEYWORD)
    return names, next((n for n in _CACHE_ARGS if n in names), _CACHE_ARGS[-1])


def _named_arguments(function, args, kwargs):
    """Every argument of a call to `function` (a forward, called with `args` after self) by name, and the cache
    under the name `function` gives it (an older name folded in). Returns (arguments, cache name).
    Cheaper than inspect's bind: the attention hook runs per layer per step."""
    names, cache_name = _parameters(function)
    if len(args) > len(names):
        raise TypeError(f"{function.__qualname__} takes {len(names)} positional arguments after self, got {len(args)}")
    arguments = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in arguments:
            raise TypeError(f"{function.__qualname__} got multiple values for argument {name!r}")
        arguments[name] = value
    # Only an older name is an alias: on 5.17 a `cache` keyword is continuous batching's own PagedAttentionCache,
    # which HF hands through **kwargs to the attention functions.
    for alias in _CACHE_ARGS[_CACHE_ARGS.index(cache_name) + 1:]:
        if alias in arguments:
            value = arguments.pop(alias)
            if arguments.get(cache_name) is None:
                arguments[cache_name] = value
    return arguments, cache_name


def _gradient_can_flow(base, arguments):
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in arguments.values()) \
        or any(p.requires_grad for p in base.parameters())


def _any_training(module) -> bool:
    """Whether `module` or a module under it is in training mode. A walk of `_modules`: `modules()` builds every
    module's dotted name, which cost ~0.1 ms per step on GPT-2."""
    stack = [module]
    while stack:
        module = stack.pop()
        if module is None:          # a registered child slot left empty
            continue
        if module.training:
            return True
        stack.extend(module._modules.values())
    return False


def _unsupported_reason(base, arguments):
    """Why this forward cannot run exactly on a paged cache, or None."""
    if _any_training(base):
        return "a module of the model is in training mode, so dropout must run (call model.eval())"
    if _gradient_can_flow(base, arguments):
        return ("a gradient can flow through this forward (a parameter or input requires grad) and the paged "
                "kernels have no autograd; run under torch.no_grad() or freeze the weights and inputs")
    if arguments.get("output_attentions") or getattr(base.config, "output_attentions", False):
        return "output_attentions=True needs the attention matrix, which paged attention never materialises"
    if arguments.get("encoder_hidden_states") is not None or getattr(base.config, "add_cross_attention", False):
        return "cross-attention is not served by the paged cache"
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
                cache = state.new_cache(self)
            else:
                state.warn_once(reason)
    elif type(cache) is DynamicCache and cache.get_seq_length() == 0 \
            and not getattr(cache, "_is_user_defined", False) and _unsupported_reason(self, arguments) is None:
        state.warn_once(f"it was given an empty {type(cache).__name__} (what model.generate makes when only "
                        f"model.{self.base_model_prefix} is patched: patch the model with its LM head; or pass no "
                        "cache)")
    if not isinstance(cache, PagedCache):
        return original(**arguments, **{cache_name: cache})
    reason = _unsupported_reason(self, arguments)
    if reason is not None:
        raise ValueError(f"cannot run with kvkernels' PagedCache: {reason}. Call kvkernels.unpatch(model) or "
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
    limit = cache.position_limit
    if limit is not None and arguments.get("position_ids") is None and cache.get_seq_length() + num_new > limit:
        raise ValueError(f"this call would reach position {cache.get_seq_length() + num_new - 1}, but the model has "
                         f"{attention_shape(self.config).max_positions_name}={limit} (positions 0..{limit - 1})")
    cache.begin_step(batch, num_new, arguments.get("attention_mask"), self.dtype, inputs.device)
    try:
        with active_cache(cache, state.configs):
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
    base = decoder_stack(self)
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
    limit = position_limit(base)
    if limit is not None and longest - 1 > limit:        # the last new token is never fed back
        raise ValueError(f"generate would reach {longest - 1} positions (prompt + max_new_tokens - 1) but the model "
                         f"has {attention_shape(base.config).max_positions_name}={limit}: shorten the prompt or lower "
                         "max_new_tokens")
    num_seqs = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    planned = num_seqs * blocks_for(longest, state.options.block_size) * state.options.block_size
    model_kwargs[cache_name] = state.new_cache(base, num_seqs=num_seqs, planned_tokens=planned)


def _install_load_time_hook():
    """Wraps GenerationMixin._prepare_cache_for_generation (once): a model whose config asks for
    attn_implementation="kvkernels" and is not patched yet is patched with the default options, then prepared by the
    patched method; any other model gets HF's method, untouched."""
    original = GenerationMixin._prepare_cache_for_generation
    if getattr(original, "_kvkernels_hook", False):
        return

    @functools.wraps(original)
    def prepare_cache(self, *args, **kwargs):
        if getattr(self.config, "_attn_implementation", None) == NAME and not is_patched(self):
            patch(self)
            return self._prepare_cache_for_generation(*args, **kwargs)
        return original(self, *args, **kwargs)
    prepare_cache._kvkernels_hook = True
    GenerationMixin._prepare_cache_for_generation = prepare_cache


_install_load_time_hook()
