"""How many context partitions (split-K / flash-decoding) a decode launch uses, and how the decode step's skinny
GEMMs split their K.

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
# The merge launch and its partial-output round trip, in DRAM latencies (one tile costs about one).
MERGE_COST_TILES = 3
# More splits must win by more than this fraction of the modelled time (each costs partial-output traffic).
SPLIT_GAIN = 0.05


# sm_90 (H100) limits per SM.
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024  # the driver's per-CTA reservation
MAX_CTAS_PER_SM = 32
MAX_THREADS_PER_SM = 2048


# Every Triton launch's fused multiply-adds, pinned: the sm_90 analysis and its bounds assume them, Triton 3.10 turns
# its default to unfused, and Triton 3.9 warns about that on each process's first compile unless a launch says.
FP_FUSION = dict(enable_fp_fusion=True)


def ctas_per_sm(n_regs: int, shared_bytes: int, num_warps: int) -> int:
    """Resident CTAs per SM for a kernel's registers per thread, shared bytes per CTA and warps."""
    regs_per_warp = -(-n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_CTA)
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_threads, MAX_CTAS_PER_SM))


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU (Triton's interpreter): a stand-in so the split path gets exercised


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 for host code: triton's is a constexpr function, ~10 µs a call on the host, and the
    launchers call it several times per layer per decode step."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def wave_utilisation(programs: int, slots: int) -> float:
    """Busy fraction of the `ceil(programs / slots)` waves of `slots` resident programs."""
    return programs / (cdiv(programs, slots) * slots)


def modelled_latencies(programs: int, splits: int, slots: int, max_context: int, tile: int) -> int:
    """Decode time in DRAM latencies: waves of resident programs, each streaming its partition's tiles."""
    waves = cdiv(programs * splits, slots)
    return waves * cdiv(cdiv(max_context, splits), tile) + (MERGE_COST_TILES if splits > 1 else 0)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, sm_count: int, ctas_per_sm: int,
                      tile: int = 64, min_split_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """Upper bound on partitions per sequence; 1 means no merge launch at all.

    batch * num_kv_heads programs per split, `ctas_per_sm * sm_count` of them resident at once (a wave),
    each streaming `tile` tokens per DRAM latency: the fewest splits within SPLIT_GAIN of the least
    modelled time, so the last wave is as full as the cap (`min_split_tokens` per partition,
    MAX_SPLITS) allows.
    """
    programs = max(1, batch * num_kv_heads)
    slots = max(1, ctas_per_sm) * sm_count
    cap = max(1, min(MAX_SPLITS, cdiv(max_context, min_split_tokens)))
    times = {s: modelled_latencies(programs, s, slots, max_context, tile) for s in range(1, cap + 1)}
    best = min(times.values())
    return min(s for s, t in times.items() if t <= best * (1 + SPLIT_GAIN))


# Split K until a GEMM launches about this many programs per SM (or each split has one BLOCK_K): two keep a
# weight tile or more in flight on every SM while the other waits on its reduction.
SPLIT_K_PROGRAMS_PER_SM = 2


def split_k(tiles: int, K: int, block_k: int, sms: int):
    """(splits, k_chunk): how many programs share each output tile's K, and the K rows each streams (a multiple
    of block_k; the last split may get fewer)."""
    k_blocks = cdiv(K, block_k)
    wanted = max(1, min(k_blocks, round(SPLIT_K_PROGRAMS_PER_SM * sms / tiles)))
    chunk_blocks = cdiv(k_blocks, wanted)
    return cdiv(k_blocks, chunk_blocks), chunk_blocks * block_k


class GemmWorkspace:
    """The split-K GEMMs' fp32 partials and int32 arrival counters (all zero), shared by the GEMMs of a stream:
    they run one after another, and each leaves the counters at zero. Sized once
    (triton_step.gemm_workspace), so a captured graph's addresses stay valid: a GEMM that needs more raises."""

    def __init__(self, device, partials: int, counters: int):
        self.partials = torch.empty(partials, dtype=torch.float32, device=device)
        self.counters = torch.zeros(counters, dtype=torch.int32, device=device)

    def take(self, partials: int, counters: int):
        if self.partials.numel() < partials or self.counters.numel() < counters:
            raise ValueError(f"this GEMM needs {partials} split-K partials and {counters} counters; the workspace "
                             f"holds {self.partials.numel()} and {self.counters.numel()}")
        return self.partials, self.counters
