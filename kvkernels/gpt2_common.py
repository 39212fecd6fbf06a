"""What the HF patch and the fast generate loop share about a Hugging Face GPT-2: its parts and its softmax scale."""
import torch

from ._validate import is_quantized, resolve_cache_dtype

CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gpt2_parts(model):
    """(GPT2Model, lm_head or None) of `model`: a GPT2Model itself, or a head model holding one as `.transformer`."""
    from transformers import GPT2Model

    if isinstance(model, GPT2Model):
        return model, None
    base = getattr(model, "transformer", None)
    if isinstance(base, GPT2Model):
        return base, getattr(model, "lm_head", None)
    raise TypeError(f"model must be a Hugging Face GPT-2 (GPT2LMHeadModel, GPT2Model or another model whose "
                    f".transformer is a GPT2Model), got {type(model).__name__}")


def attention_scale(attn) -> float:
    """The softmax scale HF's GPT2Attention uses: 1/sqrt(D) if scale_attn_weights, over (layer_idx + 1) if
    scale_attn_by_inverse_layer_idx. Computed the way HF computes `scaling`, so the float is identical."""
    scale = 1.0
    if attn.scale_attn_weights:
        scale = attn.head_dim ** -0.5
    if attn.scale_attn_by_inverse_layer_idx:
        scale /= float(attn.layer_idx + 1)
    return scale


def check_cache_dtype(cache_dtype):
    """None, a page dtype (fp16 / bf16 / fp32: pages of that dtype; torch.float8_e4m3fn / torch.int8 or "fp8" /
    "int8": quantized pages with per-token scales) -> the torch dtype or None; TypeError / ValueError otherwise."""
    resolved = resolve_cache_dtype(cache_dtype)
    if resolved is not None and resolved not in CACHE_DTYPES and not is_quantized(resolved):
        raise TypeError(f"cache_dtype must be None (the model's dtype), one of "
                        f"{', '.join(str(d) for d in CACHE_DTYPES)}, 'fp8' / torch.float8_e4m3fn or 'int8' / "
                        f"torch.int8, got {cache_dtype!r}")
    return resolved


def check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
