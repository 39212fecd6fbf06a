"""kvkernels for Hugging Face decoders: the "kvkernels" attention function (attention.py), the paged `Cache`
(cache.py), `patch` / `unpatch` / `patched` (patch.py) and HF's continuous batching on the decode kernel
(continuous_batching.py). Importing it registers the attention functions ("kvkernels", "kvkernels_paged",
"paged|kvkernels")."""
from .attention import load_time_attention, paged_attention
from .continuous_batching import continuous_batching_attention
from .cache import PagedCache
from .patch import is_patched, patch, patched, unpatch

__all__ = ["PagedCache", "paged_attention", "load_time_attention", "continuous_batching_attention", "patch", "unpatch",
           "patched", "is_patched"]
