"""How many context partitions (split-K / flash-decoding) a decode launch uses.

Shared by the Triton and CUDA backends so both split the same way. The host picks only a static
maximum (from the table's capacity, never from seq_lens, so no device sync and CUDA-graph safe);
each sequence then uses as many of those partitions as its own length needs, on the device.
"""
import functools

import torch

# A partition shorter than this costs more in the merge than it wins in parallelism.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
# Decode is bandwidth-bound: aim for a few resident programs per SM so enough loads are in flight.
PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU (Triton's interpreter): a stand-in so the split path gets exercised


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, sm_count: int,
                      min_split_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """Upper bound on partitions per sequence; 1 means no merge launch at all."""
    programs = batch * num_kv_heads
    target = PROGRAMS_PER_SM * sm_count
    if programs >= target or max_context <= min_split_tokens:
        return 1
    return max(1, min(cdiv(target, programs), cdiv(max_context, min_split_tokens), MAX_SPLITS))

