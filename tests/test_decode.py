"""Every kernel backend against the reference: dtypes, head dims, block sizes, splits, GQA, ragged lengths."""
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvkernels
from kvkernels import reference, triton_decode
from kvkernels._validate import check_decode_inputs
from conftest import DEVICE, kernel_backends
from helpers import TOLERANCE, dense_attention_fp64, make_problem, nan_output

BACKENDS = kernel_backends()
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = [32, 64, 80, 96, 128, 256]
BLOCK_SIZES = [8, 16, 32, 64]


def check_against_reference(p, out, scale=None):
    assert not out.isnan().any(), "output has unwritten (NaN) elements or read a free slot"
    expected = reference.paged_decode_attention(*p.args(), scale=scale)
    tol = TOLERANCE[p.q.dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)


def run_backend(p, backend, **kw):
    out = nan_output(p.q)
    result = kvkernels.paged_decode_attention(*p.args(), backend=backend, out=out, **kw)
    assert result is out
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_dtypes_and_head_dims(backend, dtype, head_dim):
    p = make_problem([1, 23, 40], num_heads=2, num_kv_heads=2, head_dim=head_dim, dtype=dtype, device=DEVICE)
    check_against_reference(p, run_backend(p, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_boundaries(backend, block_size):
    lens = [1, block_size - 1, block_size, block_size + 1, 2 * block_size, 2 * block_size + 1]
    p = make_problem(lens, num_heads=2, num_kv_heads=1, head_dim=32, block_size=block_size, device=DEVICE)
    check_against_reference(p, run_backend(p, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 1), (6, 2), (12, 3)], ids=["gqa4", "mqa", "gqa3", "gqa4x3"])
def test_grouped_query_heads(backend, dtype, heads):
    p = make_problem([9, 70], num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, dtype=dtype, device=DEVICE)
    check_against_reference(p, run_backend(p, backend, scale=0.3), scale=0.3)


def zero_counters(p):
    """Split counters for p's decode: int32 [B, H_kv], zero."""
    return torch.zeros(p.q.shape[0], p.k_cache.shape[2], dtype=torch.int32, device=p.q.device)


def check_counters_left_zero(counters):
    if counters is not None:
        assert not counters.any(), "the folded merge must leave its counters at zero for the next launch"


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(1, 90), min_size=1, max_size=4), block_size=st.sampled_from([4, 6, 8, 12, 16]),
       group=st.sampled_from([1, 2, 3]), num_splits=st.integers(1, 4), fold=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_random_ragged_batches(lens, block_size, group, num_splits, fold, seed):
    p = make_problem(lens, num_heads=2 * group, num_kv_heads=2, head_dim=32, block_size=block_size, device=DEVICE,
                     generator=torch.Generator().manual_seed(seed))
    out = nan_output(p.q)
    counters = zero_counters(p) if fold else None
    triton_decode.paged_decode_attention(*p.args(), check_decode_inputs(*p.args()), 32 ** -0.5, out,
                                         num_splits=num_splits, min_split_tokens=16, split_counters=counters)
    check_against_reference(p, out)
    check_counters_left_zero(counters)


def split_config(head_dim=64):
    return triton_decode.decode_config(types.SimpleNamespace(head_dim=head_dim), torch.float16)


def split_tile(head_dim=64):
    return split_config(head_dim).tile


@pytest.mark.parametrize("fold", [False, True], ids=["merge-launch", "merge-folded"])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_triton_split_k_matches_reference(num_splits, heads, fold, monkeypatch):
    """Forced split counts at lengths around partition edges; partial buffers start as NaN. Folded: the last
    program of each (sequence, KV head) merges, twice in a row on the same counters."""
    tile = split_tile()
    lens = [1, tile - 1, tile, tile + 1, 3 * tile - 1, 3 * tile + 1, 5 * tile]
    p = make_problem(lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, dtype=torch.float16,
                     device=DEVICE)
    real_empty = torch.empty

    def nan_empty(*size, **kw):  # poison the fp32 partial buffers: unwritten slots must never be merged
        t = real_empty(*size, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    shape = check_decode_inputs(*p.args())
    counters = zero_counters(p) if fold else None
    for _ in range(2 if fold else 1):
        out = nan_output(p.q)
        launches = triton_decode.decode_launches(*p.args(), shape, 64 ** -0.5, out, split_config(), num_splits,
                                                 tile, counters)
        assert len(launches) == (2 if num_splits > 1 and not fold else 1)
        triton_decode.paged_decode_attention(*p.args(), shape, 64 ** -0.5, out, num_splits=num_splits,
                                             min_split_tokens=tile, split_counters=counters)
        check_against_reference(p, out)
        check_counters_left_zero(counters)


def test_triton_default_split_heuristic_splits_long_contexts():
    """With the heuristic's own choice (several splits for one long sequence) the result still matches."""
    p = make_problem([700, 3], num_heads=1, num_kv_heads=1, head_dim=32, block_size=32, device=DEVICE)
    shape = check_decode_inputs(*p.args())
    assert kvkernels.split.choose_num_splits(2, 1, shape.max_blocks_per_seq * 32, kvkernels.split.num_sms(DEVICE),
                                             triton_decode.STATIC_CTAS_PER_SM[False, False]) > 1
    check_against_reference(p, run_backend(p, "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_plan_runs_each_layer_as_the_one_shot_decode(backend):
    """A DecodePlan made from one layer's tensors runs another layer's (same layout, other data) exactly as
    paged_decode_attention does, splitting included (the one-shot call's own split count), with per-layer scales."""
    p = make_problem([700, 3, 260], num_heads=8, num_kv_heads=2, head_dim=64, block_size=32, dtype=torch.float16,
                     device=DEVICE)
    g = torch.Generator().manual_seed(1)

    def redrawn(pages):  # another layer: new data in the same slots, NaN left in the free ones
        return torch.where(pages.isnan(), pages, torch.randn(pages.shape, generator=g).to(pages))
    other = (redrawn(p.q), redrawn(p.k_cache), redrawn(p.v_cache))
    counters = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    plan = kvkernels.DecodePlan(*p.args(), backend=backend, split_counters=counters)
    if backend == "triton":
        assert plan.num_splits > 1, "the 700-token sequence splits"
    for (q, k_cache, v_cache), scale in (((p.q, p.k_cache, p.v_cache), None), (other, 0.3)):
        out = plan.run(q, k_cache, v_cache, scale=scale, out=nan_output(p.q))
        check_counters_left_zero(counters)
        expected = kvkernels.paged_decode_attention(q, k_cache, v_cache, p.block_tables, p.seq_lens, scale=scale,
                                                    backend=backend, out=nan_output(p.q), split_counters=counters)
        assert torch.equal(out, expected)
    check_against_reference(p, plan.run(p.q, p.k_cache, p.v_cache, out=nan_output(p.q)))


def test_decode_plan_refuses_tensors_laid_out_otherwise():
    """run takes only tensors with the plan's shapes, strides, dtypes and device: anything else would be launched
    with the plan's split count and checks, made for other tensors."""
    p = make_problem([40, 17], num_heads=4, num_kv_heads=2, head_dim=32, device=DEVICE)
    plan = kvkernels.DecodePlan(*p.args(), backend="torch")
    assert plan.matches(p.q, p.k_cache, p.v_cache)
    for q, k_cache in ((p.q[:1], p.k_cache), (p.q.half(), p.k_cache), (p.q, p.k_cache[:-1]),
                       (p.q.transpose(0, 1).contiguous().transpose(0, 1), p.k_cache)):
        assert not plan.matches(q, k_cache, p.v_cache)
        with pytest.raises(ValueError, match="make a DecodePlan for these"):
            plan.run(q, k_cache, p.v_cache)
    with pytest.raises(ValueError, match="make a DecodePlan for these"):
        plan.run(p.q, p.k_cache, p.v_cache, k_scale=0.5, v_scale=0.5)
    with pytest.raises(ValueError, match="out must be"):
        plan.run(p.q, p.k_cache, p.v_cache, out=torch.empty(3, device=DEVICE))


def test_a_wrong_out_is_reported_before_the_values_are_read():
    """`out` is checked with the shapes, before validate's device sync reads seq_lens."""
    p = make_problem([4, 9], head_dim=32, device=DEVICE)
    p.seq_lens[0] = 0
    with pytest.raises(ValueError, match="out must be"):
        kvkernels.paged_decode_attention(*p.args(), backend="torch", out=torch.empty(3, device=DEVICE))
    with pytest.raises(ValueError, match="seq_lens must be >= 1"):
        kvkernels.paged_decode_attention(*p.args(), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_query_and_fresh_draws(backend):
    """q as views (a slice of a fused projection; a transposed copy), several independent draws."""
    for seed in range(3):
        p = make_problem([5, 17, 31], num_heads=4, num_kv_heads=4, head_dim=32, device=DEVICE,
                         generator=torch.Generator().manual_seed(100 + seed))
        wide = torch.randn(3, 4, 96, device=DEVICE)
        wide[..., 32:64] = p.q
        p.q = wide[..., 32:64] if seed < 2 else p.q.transpose(1, 2).contiguous().transpose(1, 2)
        check_against_reference(p, run_backend(p, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_index_tensors(backend):
    """Tables and lengths as column / element slices of wider tensors (strides other than 1)."""
    p = make_problem([3, 29, 18], num_heads=2, num_kv_heads=1, head_dim=32, block_size=8, device=DEVICE)
    wide_tables = torch.full((3, 2 * p.block_tables.shape[1]), -7, dtype=torch.int32, device=DEVICE)
    wide_tables[:, ::2] = p.block_tables
    wide_lens = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    wide_lens[::2] = p.seq_lens
    p.block_tables, p.seq_lens = wide_tables[:, ::2], wide_lens[::2]
    assert p.block_tables.stride(-1) == 2 and p.seq_lens.stride(-1) == 2
    check_against_reference(p, run_backend(p, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    p = make_problem([4], head_dim=32, device=DEVICE)
    out = kvkernels.paged_decode_attention(p.q[:0], p.k_cache, p.v_cache, p.block_tables[:0], p.seq_lens[:0],
                                           backend=backend)
    assert out.shape == (0, 4, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [False, True], ids=["merge-launch", "merge-folded"])
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_cuda_graph_replay_follows_new_lengths_and_tables(backend, fold):
    """Capture once; permute the tables, shorten the lengths and redraw q in place; replays equal eager."""
    p = make_problem([3000, 7, 640], num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, device="cuda")
    tables0, lens0 = p.block_tables.clone(), p.seq_lens.clone()
    out = nan_output(p.q)
    counters = zero_counters(p) if fold else None
    kw = dict(backend=backend, validate=False, out=out, split_counters=counters)
    kvkernels.paged_decode_attention(*p.args(), **kw)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvkernels.paged_decode_attention(*p.args(), **kw)
    # each row keeps a table that covers its new length
    for perm, lens in [([2, 0, 1], [610, 2500, 7]), ([1, 2, 0], [1, 330, 17]), ([0, 1, 2], [3000, 7, 640])]:
        p.block_tables.copy_(tables0[perm])
        p.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        assert (p.seq_lens <= lens0[perm]).all()
        p.q.normal_()
        out.fill_(float("nan"))
        graph.replay()
        expected = kvkernels.paged_decode_attention(*p.args(), backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        check_counters_left_zero(counters)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the intended 0 / 0
@pytest.mark.parametrize("fold", [False, True], ids=["merge-launch", "merge-folded"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_out_of_range_lengths_stay_in_bounds(num_splits, fold):
    """Unvalidated lengths: past the table -> clamped to its capacity; 0 or negative -> NaN, never a read."""
    p = make_problem([20, 9, 9], num_heads=2, num_kv_heads=2, head_dim=32, block_size=8, extra_table_cols=0,
                     device=DEVICE)
    capacity = p.block_tables.shape[1] * 8
    last_block = int(p.block_tables[0, -1])
    p.k_cache[last_block, 4:] = torch.randn(4, 2, 32, dtype=p.k_cache.dtype, device=DEVICE)  # tokens 20..23 finite
    p.v_cache[last_block, 4:] = torch.randn(4, 2, 32, dtype=p.v_cache.dtype, device=DEVICE)
    p.seq_lens = torch.tensor([1000, 0, -4], dtype=torch.int32, device=DEVICE)
    out = nan_output(p.q)
    counters = zero_counters(p) if fold else None
    triton_decode.paged_decode_attention(*p.args(), check_decode_inputs(*p.args()), 32 ** -0.5, out,
                                         num_splits=num_splits, min_split_tokens=16, split_counters=counters)
    assert out[1:].isnan().all(), "an empty sequence must give NaN, not a plausible answer"
    check_counters_left_zero(counters)
    p.seq_lens = torch.tensor([capacity, 1, 1], dtype=torch.int32, device=DEVICE)
    expected = reference.paged_decode_attention(*p.args())
    assert expected[0].isfinite().all()
    torch.testing.assert_close(out[0], expected[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("ctas_per_sm", [3, 6, 7])
@pytest.mark.parametrize("batch, context", [(16, 4096), (64, 16384), (4, 8192)])
def test_split_count_fills_the_last_wave(ctas_per_sm, batch, context):
    """GPT-2 heads on 132 SMs: the split count from the kernel's occupancy leaves the last wave >= 90% busy
    (the old rule, 4 programs per SM whatever fitted, ran 1.45 waves at B=16 x 4k with 3 CTAs per SM)."""
    slots = ctas_per_sm * 132
    splits = kvkernels.split.choose_num_splits(batch, 12, context, 132, ctas_per_sm)
    assert 1 <= splits <= min(kvkernels.split.MAX_SPLITS, context // kvkernels.split.MIN_SPLIT_TOKENS)
    assert kvkernels.split.wave_utilisation(batch * 12 * splits, slots) >= 0.9, splits


def test_split_count_follows_occupancy():
    split = kvkernels.split
    assert split.choose_num_splits(66, 12, 16384, 132, 6) == 1, "one exactly full wave needs no merge"
    assert split.choose_num_splits(1, 12, 16384, 132, 7) == split.MAX_SPLITS, "one sequence: as many as allowed"
    assert split.choose_num_splits(4, 12, 200, 132, 7) == 1, "shorter than one partition"
    assert split.choose_num_splits(16, 12, 4096, 132, 3) < split.choose_num_splits(16, 12, 4096, 132, 7)


def test_host_next_power_of_2_is_tritons():
    import triton
    assert [kvkernels.split.next_power_of_2(n) for n in range(300)] == [triton.next_power_of_2(n) for n in range(300)]


def test_ctas_per_sm_from_registers_shared_memory_and_warps():
    ctas = kvkernels.split.ctas_per_sm
    assert ctas(168, 4096, 4) == 3   # the review's triton 3.6 cubin: registers bind
    assert ctas(72, 544, 4) == 7     # csrc's one-head kernel
    assert ctas(32, 100 * 1024, 4) == 2  # shared memory binds
    assert ctas(16, 0, 1) == 32      # the CTA limit binds


SANITIZED_TRITON_RUN = textwrap.dedent("""
    import torch, kvkernels
    from kvkernels import triton_decode
    from kvkernels._validate import check_decode_inputs
    torch.manual_seed(0)
    k_cache = torch.randn(12, 16, 2, 64, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.tensor([[3, 1, 7, 0, 6, 10], [11, 2, 5, 4, 9, 8]], device="cuda", dtype=torch.int32)
    lens = torch.tensor([50, 96], device="cuda", dtype=torch.int32)
    for heads in (2, 8):  # one head and grouped heads per KV head
        q = torch.randn(2, heads, 64, device="cuda", dtype=torch.float16)
        shape = check_decode_inputs(q, k_cache, v_cache, tables, lens)
        for splits, counters in ((1, None), (4, None), (4, torch.zeros(2, 2, dtype=torch.int32, device="cuda"))):
            out = torch.empty_like(q)
            triton_decode.paged_decode_attention(q, k_cache, v_cache, tables, lens, shape, 0.125, out,
                                                 num_splits=splits, min_split_tokens=16, split_counters=counters)
    k_new = torch.randn(2, 2, 64, device="cuda", dtype=torch.float16)
    kvkernels.write_kv_cache(k_new, k_new + 1, k_cache, v_cache, torch.tensor([191, -1], device="cuda"),
                             backend="triton")
    torch.cuda.synchronize()
    print("sanitized run done")
""")


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
def test_triton_kernels_pass_compute_sanitizer_memcheck(tmp_path):
    """Decode (unsplit, split with a merge launch, split with the merge folded in, one head and grouped) and
    write, under memcheck; torch's caching allocator off so an overrun is not hidden inside a cached block."""
    script = tmp_path / "triton_run.py"
    script.write_text(SANITIZED_TRITON_RUN)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                             sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "sanitized run done" in output, output[-6000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]


def poison_before(p, starts):
    """NaN in every page slot before each sequence's window start: a kernel that reads one returns NaN."""
    block_size = p.k_cache.shape[1]
    for seq, start in enumerate(starts):
        for pos in range(start):
            block = int(p.block_tables[seq, pos // block_size])
            p.k_cache[block, pos % block_size] = float("nan")
            p.v_cache[block, pos % block_size] = float("nan")


@pytest.mark.parametrize("fold", [False, True], ids=["merge-launch", "merge-folded"])
@pytest.mark.parametrize("num_splits", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_sliding_window_reads_only_the_window(num_splits, group, fold):
    """seq_starts: each query sees tokens [start, len); the pages before the start hold NaN and are never read."""
    lens, starts = [1, 37, 70, 90], [0, 30, 5, 89]
    p = make_problem(lens, num_heads=2 * group, num_kv_heads=2, head_dim=64, block_size=8, device=DEVICE)
    poison_before(p, starts)
    seq_starts = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    expected = dense_attention_fp64(p.q, [k[s:] for k, s in zip(p.k_rows, starts)],
                                    [v[s:] for v, s in zip(p.v_rows, starts)], 64 ** -0.5)
    reference_out = reference.paged_decode_attention(*p.args(), seq_starts=seq_starts)
    out = nan_output(p.q)
    counters = zero_counters(p) if fold else None
    triton_decode.paged_decode_attention(*p.args(), check_decode_inputs(*p.args()), 64 ** -0.5, out,
                                         num_splits=num_splits, min_split_tokens=16, seq_starts=seq_starts,
                                         split_counters=counters)
    check_counters_left_zero(counters)
    for got in (reference_out, out, run_backend(p, "auto", seq_starts=seq_starts)):
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5)


def test_sliding_window_starts_are_checked():
    p = make_problem([5, 9], device=DEVICE)
    with pytest.raises(ValueError, match=r"seq_starts\[1\] = 9"):
        kvkernels.paged_decode_attention(*p.args(), seq_starts=torch.tensor([0, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="seq_starts"):
        kvkernels.paged_decode_attention(*p.args(), seq_starts=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(NotImplementedError, match="backend='cuda' has no seq_starts"):
        kvkernels.paged_decode_attention(*p.args(), backend="cuda",
                                         seq_starts=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE))


def test_32_bit_address_math_only_where_no_offset_reaches_2_pow_31():
    """The decode kernel's block id x stride products run in 32 bits (a fifth fewer loop instructions) unless an
    element offset into a page or scale pool can reach 2**31: decided from shapes and strides, views included
    (tests/test_large_pool.py runs a pool past 2**31 elements end to end)."""
    small = torch.empty(4, 16, 2, 64, dtype=torch.float16)
    assert not triton_decode.needs_int64_offsets(small, small, None, None)
    assert triton_decode.needs_int64_offsets(small, torch.empty(2**25, 16, 2, 64, device="meta"))
    storage = torch.empty(2**31 + 4096, dtype=torch.int8, device="meta")
    last_in_32_bits = storage.as_strided((2, 16, 2, 64), (2**31 - 2048, 128, 64, 1))  # last offset 2**31 - 1
    one_past = storage.as_strided((2, 16, 2, 64), (2**31 - 2047, 128, 64, 1))
    assert not triton_decode.needs_int64_offsets(last_in_32_bits)
    assert triton_decode.needs_int64_offsets(last_in_32_bits, one_past)
