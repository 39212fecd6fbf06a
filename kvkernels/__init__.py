"""kvkernels: paged-KV decode attention kernels (Triton, CUDA, PyTorch) and a Hugging Face decoder integration."""
from . import reference
from .cache import BlockAllocator, CacheFullError, PagedKVCache
from .ops import DecodePlan, paged_decode_attention, write_kv_cache

__version__ = "0.1.0"

# The Hugging Face integration imports transformers, which is slow: load it on first use only.
_LAZY = {"patch": "hf", "unpatch": "hf", "patched": "hf", "is_patched": "hf", "generate": "generation"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'kvkernels' has no attribute {name!r}")


__all__ = ["paged_decode_attention", "DecodePlan", "write_kv_cache", "reference", "PagedKVCache", "BlockAllocator",
           "CacheFullError", "patch", "unpatch", "patched", "is_patched", "generate"]
