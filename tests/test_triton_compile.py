"""The static performance model's bounds: the Triton kernels compiled for Hopper (sm_90) on the CPU, with
the specialisation a real launch gets (aligned pointers and strides), keep HBM busy.

Catches what the CPU interpreter cannot (codegen type and layout errors) and what would sink bandwidth on
the H100 without a GPU to time it: spills, narrow loads, lost occupancy, loads waiting on each other.
The compile runs in a child process without TRITON_INTERPRET.
"""
import pytest

pytest.importorskip("triton")

from helpers import run_sm90_compile  # noqa: E402
from kvkernels import static_model, triton_decode  # noqa: E402

CASES = ["decode-fp16-d64", "decode-bf16-d80-split8", "decode-bf16-d80-split8-merge", "decode-fp16-d128-gqa4",
         "decode-fp32-d256-split4", "decode-fp32-d256-split4-merge", "decode-fp16-d96-gqa3-split2",
         "decode-fp16-d96-gqa3-split2-merge", "decode-fp32-d128-gqa4", "decode-bf16-d128-gqa4",
         "gpt2-split22", "gpt2-split22-merge", "gpt2-split22-folded",
         "gqa-32x8-d128-split8", "gqa-32x8-d128-split8-merge", "gqa-32x8-d128-split8-folded", "write-h12-d64"]
# design point -> (grouped heads, K and V bytes of one tile: TILE_N * D fp16 elements each)
DESIGN_POINTS = {"gpt2-split22": (False, 2 * 64 * 64 * 2), "gqa-32x8-d128-split8": (True, 2 * 32 * 128 * 2)}
DESIGN_POINTS.update({name + "-folded": bounds for name, bounds in DESIGN_POINTS.items()})
FOLDED = sorted(name for name in DESIGN_POINTS if name.endswith("-folded"))


@pytest.fixture(scope="module")
def analysis():
    return run_sm90_compile("compile_sm90.py", timeout=600)


def test_every_case_compiled(analysis):
    assert sorted(analysis) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_no_register_spills(analysis, case):
    assert analysis[case]["spill_bytes"] == 0, f"{case} spills {analysis[case]['spill_bytes']} bytes on sm_90"


@pytest.mark.parametrize("case", sorted(DESIGN_POINTS))
def test_kv_tiles_stream_with_128_bit_loads_issued_together(analysis, case):
    row, (_, kv_bytes) = analysis[case], DESIGN_POINTS[case]
    wide_bytes = row["load_widths"].get("128", 0) * 16 * 32 * row["warps"]
    assert wide_bytes >= kv_bytes, f"{case}: only {wide_bytes} of a tile's {kv_bytes} K/V bytes in 128-bit loads"
    # table entries (prefetched a tile ahead), K and V: one DRAM latency per tile, not three in series
    assert row["serial_load_groups"] == 1, row


@pytest.mark.parametrize("case", sorted(DESIGN_POINTS))
def test_occupancy_and_bytes_in_flight(analysis, case):
    row, (grouped, _) = analysis[case], DESIGN_POINTS[case]
    # the split count on the CPU comes from this table: it must not promise more than the kernel fits
    assert row["ctas_per_sm"] >= triton_decode.STATIC_CTAS_PER_SM[grouped], row
    in_flight = row["bytes_in_flight_per_cta"] * row["ctas_per_sm"]
    assert in_flight >= 4 * static_model.TARGET_BYTES_IN_FLIGHT_PER_SM, \
        f"{case}: {in_flight} bytes in flight per SM, Little's law needs {static_model.TARGET_BYTES_IN_FLIGHT_PER_SM:.0f}"


@pytest.mark.parametrize("case", FOLDED)
def test_folded_merge_orders_its_counter(analysis, case):
    """The last program merges partials other CTAs wrote: barrier, GPU fence, atomic add, L1 invalidation.
    Without the fold the kernel has no atomic at all."""
    assert analysis[case]["split_counter_ordered"] is True, analysis[case]
    assert analysis[case.replace("-folded", "")]["split_counter_ordered"] is None
