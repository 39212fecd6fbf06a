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
         "gqa-32x8-d128-split8", "gqa-32x8-d128-split8-merge", "gqa-32x8-d128-split8-folded", "write-h12-d64",
         "gpt2-fp8-split22", "gpt2-fp8-split22-merge", "gpt2-int8-split22", "gpt2-int8-split22-merge",
         "gqa-32x8-d128-fp8-split8", "gqa-32x8-d128-fp8-split8-merge", "gqa-32x8-d128-int8-split8",
         "gqa-32x8-d128-int8-split8-merge", "decode-bf16-d128-gqa4-fp8", "decode-fp32-d256-int8",
         "decode-fp32-d128-gqa4-fp8", "decode-fp16-d80-gqa4-int8", "decode-fp16-d32-gqa4-int8", "write-h12-d64-fp8",
         "write-h12-d64-int8"]
# design point -> (grouped heads, quantized pages, K and V bytes of one tile, narrowest load width (bits) that
# carries them, bytes in flight per SM as a multiple of Little's law's need, most warp instructions the loop
# may issue per K/V page byte).
# fp16 pages: TILE_N * D fp16 elements each in 128-bit loads, 4x the need. fp8 / int8 pages read twice fp16's
# tokens (the same 8 KB): GPT-2's one head 128 tokens at 4 CTAs per SM (still 4x), grouped heads 64 tokens in
# 64- and 128-bit loads at 4 CTAs per SM (the converted tiles cost registers).
# Instructions per K/V page byte (scales excluded): the H100 ran the quantized loops at 2.5-3.7 warp
# instructions per SM per ns (kvkernels/static_model.py), so a loop above ~0.16 per byte cannot stream 3 TB/s.
# With one head's row slots (no per-tile cross-warp reduction) and 32-bit address math, triton 3.6 / 3.9:
# one head 0.084 / 0.082 (fp16), 0.137 / 0.145 (fp8), 0.146 / 0.153 (int8), against 0.13 / 0.21 before;
# grouped heads 0.067 / 0.061 (fp16); fp8 0.188 / 0.14 with V converted before its transpose and 64-token
# tiles, int8 0.203 / 0.157 read as int32 words in byte lanes, against 0.29 / 0.25 and 0.30 / 0.27 when V's
# bytes were gathered one by one. A row's slot in its block as unsigned % (a mask, not signed rounding toward
# zero) then took one head to 0.078 / 0.076 (fp16), 0.133 / 0.137 (fp8), 0.141 / 0.144 (int8) and grouped heads
# to 0.061 / 0.057 (fp16), 0.172 / 0.132 (fp8), 0.184 / 0.146 (int8).
DESIGN_POINTS = {
    "gpt2-split22": (False, False, 2 * 64 * 64 * 2, 128, 4, 0.081),
    "gqa-32x8-d128-split8": (True, False, 2 * 32 * 128 * 2, 128, 4, 0.065),
    "gpt2-fp8-split22": (False, True, 2 * 128 * 64, 128, 4, 0.14),
    "gpt2-int8-split22": (False, True, 2 * 128 * 64, 128, 4, 0.15),
    "gqa-32x8-d128-fp8-split8": (True, True, 2 * 64 * 128, 64, 1.5, 0.18),
    "gqa-32x8-d128-int8-split8": (True, True, 2 * 64 * 128, 64, 1.5, 0.19),
}
DESIGN_POINTS.update({name + "-folded": DESIGN_POINTS[name] for name in ("gpt2-split22", "gqa-32x8-d128-split8")})
FOLDED = sorted(name for name in DESIGN_POINTS if name.endswith("-folded"))


@pytest.fixture(scope="module")
def analysis():
    return run_sm90_compile("compile_sm90.py", timeout=600)


def test_every_case_compiled(analysis):
    assert sorted(analysis) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_no_register_spills(analysis, case):
    assert analysis[case]["spill_bytes"] == 0, f"{case} spills {analysis[case]['spill_bytes']} bytes on sm_90"


@pytest.mark.parametrize("case", CASES)
def test_launches_pin_fused_multiply_adds(analysis, case):
    """The compiling child runs with Triton's default unfused (Triton 3.10's): the launches still fuse, as the
    bounds here and the static model assume."""
    assert analysis[case]["fp_fusion"] is True


@pytest.mark.parametrize("case", sorted(DESIGN_POINTS))
def test_kv_tiles_stream_with_wide_loads_issued_together(analysis, case):
    row, (_, _, kv_bytes, min_width, _, _) = analysis[case], DESIGN_POINTS[case]
    wide_bytes = sum(count * int(width) // 8 * 32 * row["warps"] for width, count in row["load_widths"].items()
                     if int(width) >= min_width)
    assert wide_bytes >= kv_bytes, \
        f"{case}: only {wide_bytes} of a tile's {kv_bytes} K/V bytes in {min_width}-bit loads"
    # table entries (prefetched a tile ahead), K and V: one DRAM latency per tile, not three in series
    assert row["serial_load_groups"] == 1, row


@pytest.mark.parametrize("case", sorted(DESIGN_POINTS))
def test_occupancy_and_bytes_in_flight(analysis, case):
    row, (grouped, quantized, _, _, multiple, _) = analysis[case], DESIGN_POINTS[case]
    # the split count on the CPU comes from this table: it must not promise more than the kernel fits
    assert row["ctas_per_sm"] >= triton_decode.STATIC_CTAS_PER_SM[grouped, quantized], row
    in_flight = row["bytes_in_flight_per_cta"] * row["ctas_per_sm"]
    need = static_model.TARGET_BYTES_IN_FLIGHT_PER_SM
    assert in_flight >= multiple * need, f"{case}: {in_flight} bytes in flight per SM, Little's law needs {need:.0f}"


@pytest.mark.parametrize("case", sorted(DESIGN_POINTS))
def test_loop_instructions_per_kv_byte(analysis, case):
    """The decode loop's issue cost: warp instructions per tile over the tile's K/V page bytes."""
    row, (_, _, kv_bytes, _, _, bound) = analysis[case], DESIGN_POINTS[case]
    per_byte = row["loop_instructions"] * row["warps"] / kv_bytes
    assert per_byte <= bound, f"{case}: {per_byte:.3f} warp instructions per K/V byte (bound {bound})"


@pytest.mark.parametrize("case", FOLDED)
def test_folded_merge_orders_its_counter(analysis, case):
    """The last program merges partials other CTAs wrote: barrier, GPU fence, atomic add, L1 invalidation.
    Without the fold the kernel has no atomic at all."""
    assert analysis[case]["split_counter_ordered"] is True, analysis[case]
    assert analysis[case.replace("-folded", "")]["split_counter_ordered"] is None


def test_modelled_bandwidth_is_capped_by_instruction_issue():
    """The static model streams a loop at most at ISSUE_RATE / its instructions per byte: two kernels with the
    same bytes in flight differ only by their loops' issue cost."""
    row = dict(programs=2 * 132, ctas_per_sm=4, bytes_in_flight_per_cta=32 * 1024)
    lean = static_model._throughput(dict(row, instructions_per_kv_byte=0.1), 132)
    heavy = static_model._throughput(dict(row, instructions_per_kv_byte=0.3), 132)
    assert lean["modelled_tb_s"] == static_model.HBM_BYTES_PER_S / 1e12  # bandwidth-bound
    assert heavy["modelled_tb_s"] == heavy["issue_tb_s"] == round(static_model.ISSUE_RATE * 132 / 0.3 / 1e12, 2)
    assert heavy["modelled_tb_s"] < lean["modelled_tb_s"]
