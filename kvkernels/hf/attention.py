"""kvkernels' two entries in transformers' attention registry.

Every decoder whose attention modules call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`
after `cache.update(...)` (GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi3 and most of transformers' decoders) reaches the
function registered under its config's implementation name:
    * "kvkernels_paged" -> `paged_attention`, the paged cache's attention. kvkernels.patch (and kvkernels.generate)
      switch a model's configs to it for the duration of each forward they serve and name the cache in
      `active_cache`. No mask function is registered under this name, so transformers builds no mask (as for vLLM's
      and TGI's backends); the cache applies causal, padding and sliding-window masking itself.
    * "kvkernels" -> `load_time_attention`, what `from_pretrained(..., attn_implementation="kvkernels")` selects.
      transformers gives an attention function no say in which cache `generate` creates, so the model is patched on
      its first `generate` (kvkernels.hf.patch installs that hook). A forward kvkernels does not serve (one before
      that generate, or one patch hands back to HF: training, gradients, ...) runs HF's SDPA with SDPA's mask,
      exactly as `attn_implementation="sdpa"` would.
"""
import contextlib
import contextvars

from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvkernels"                # the public name, for attn_implementation at load time
PAGED_NAME = "kvkernels_paged"    # the name patched forwards run under
_ACTIVE = contextvars.ContextVar("kvkernels_active_cache", default=None)
# Arguments some attention modules pass that change the math in ways the paged kernels do not implement.
_UNSUPPORTED = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                "sinks": "attention sinks", "head_mask": "a head mask"}


def model_configs(module):
    """Every distinct config the modules under `module` read their attention implementation from."""
    return list({id(m.config): m.config for m in module.modules()
                 if isinstance(getattr(m, "config", None), PretrainedConfig)}.values())


@contextlib.contextmanager
def active_cache(cache, configs):
    """Within the block, the attention of modules whose config is in `configs` runs on `cache` through
    `paged_attention`. Restores each config's implementation afterwards."""
    originals = {id(config): config._attn_implementation_internal for config in configs}
    token = _ACTIVE.set((cache, originals, set()))     # the set: layers attended in this forward
    for config in configs:
        config._attn_implementation_internal = PAGED_NAME
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation_internal = originals[id(config)]
        _ACTIVE.reset(token)


def refuse_unsupported(module, kwargs):
    """NotImplementedError for attention arguments that change the math in ways kvkernels does not implement."""
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"kvkernels' attention does not implement {what} ({name}=...), which "
                                      f"{type(module).__name__} uses: load the model with another attn_implementation "
                                      "or call kvkernels.unpatch(model)")


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    **kwargs):
    """transformers' attention-function contract on kvkernels' paged cache.

    Args:
        module: the attention module (its `layer_idx` names the cache layer).
        query: [B, H, T, D]; key, value: [B, H_kv, T, D], this step's new tokens only (PagedCache.update passes them
            through unchanged).
        attention_mask: what transformers hands a backend without a mask function: the 2D padding mask or None;
            the cache already holds this step's mask (kvkernels.patch gave it to begin_step).
        scaling: softmax scale (None: D ** -0.5). dropout: must be 0 (patch serves eval mode only).
        sliding_window: HF's window in columns for this layer, or None.

    Returns:
        (out [B, T, H, D] in query's dtype, None): attention weights are never materialised.
    """
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(f"attn_implementation={PAGED_NAME!r} runs only inside a forward that kvkernels.patch(model) "
                           f"serves on its paged cache: load the model with attn_implementation={NAME!r} or call "
                           "kvkernels.patch(model)")
    cache, originals, attended = active
    refuse_unsupported(module, kwargs)
    if dropout:
        raise NotImplementedError("kvkernels' paged attention has no attention dropout (the model is in training mode)")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise NotImplementedError(f"kvkernels' paged attention is causal; {type(module).__name__} asks for "
                                  "bidirectional attention")
    if module.layer_idx in attended:
        raise NotImplementedError(f"{type(module).__name__} (layer {module.layer_idx}) calls the attention function "
                                  "more than once per forward (as DiffLlama's differential attention does); kvkernels "
                                  "writes a layer's keys and values into its pages as it attends, so it cannot serve "
                                  "this model: call kvkernels.unpatch(model)")
    attended.add(module.layer_idx)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    # GPT-2's reorder_and_upcast_attn runs its softmax in fp32 on HF's eager path only.
    upcast = bool(getattr(module, "reorder_and_upcast_attn", False)) and originals.get(id(module.config)) == "eager"
    out = cache.attend(module.layer_idx, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale,
                       upcast=upcast, window=sliding_window)                                    # [B, T, H, D]
    return out, None


def load_time_attention(module, query, key, value, attention_mask, **kwargs):
    """attn_implementation="kvkernels" outside a forward kvkernels serves: HF's SDPA, with the mask transformers built
    for it (SDPA's, registered under the same name). Same contract as transformers' sdpa_attention_forward."""
    refuse_unsupported(module, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PAGED_NAME, paged_attention)
AttentionInterface.register(NAME, load_time_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
