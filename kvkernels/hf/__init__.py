"""kvkernels for Hugging Face decoders: the "kvkernels" attention function (attention.py), the paged `Cache`
(cache.py) and `patch` / `unpatch` / `patched` (patch.py). Importing it registers the attention function."""
from .attention import paged_attention
from .cache import PagedCache
from .patch import is_patched, patch, patched, unpatch

__all__ = ["PagedCache", "paged_attention", "patch", "unpatch", "patched", "is_patched"]
