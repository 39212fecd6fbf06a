"""How many context partitions (split-K / flash-decoding) a decode launch uses.

Shared by the Triton and CUDA backends so both split the same way. The host picks only a static
maximum (from the table's capacity, never from seq_lens, so no device sync and CUDA-graph safe);
each sequence then uses as many of those partitions as its own length needs, on the device.

The count comes from occupancy: the CTAs per SM the compiled kernel fits (registers, shared memory,
warps) times the SM count is one wave; the split count is the smallest that fills whole waves best.
"""
import functools

import torch

# A partition shorter than this costs more in the merge than it wins in parallelism.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
# Splitting costs a merge launch and partial-output traffic: worth it only for this much more utilisation.
MERGE_COST = 0.05
# A split count within this much of the best wave utilisation is as good: prefer fewer (a smaller merge).
UTILISATION_SLACK = 0.02


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU (Triton's interpreter): a stand-in so the split path gets exercised


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def wave_utilisation(programs: int, slots: int) -> float:
    """Busy fraction of `ceil(programs / slots)` waves of `slots` resident programs."""
    return programs / (cdiv(programs, slots) * slots)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, sm_count: int, ctas_per_sm: int,
                      min_split_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """Upper bound on partitions per sequence; 1 means no merge launch at all.

    batch * num_kv_heads programs per split; `ctas_per_sm * sm_count` of them run at once.
    """
    programs = max(1, batch * num_kv_heads)
    slots = max(1, ctas_per_sm) * sm_count
    cap = max(1, min(MAX_SPLITS, cdiv(max_context, min_split_tokens)))
    scores = {s: wave_utilisation(programs * s, slots) - (MERGE_COST if s > 1 else 0.0) for s in range(1, cap + 1)}
    best = max(scores.values())
    return min(s for s, score in scores.items() if score >= best - UTILISATION_SLACK)
