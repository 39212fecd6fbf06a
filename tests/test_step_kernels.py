"""The fused decode-step kernels (kvkernels.triton_step) against their PyTorch reference (kvkernels.step_reference),
and the launch budget of a whole decode step of kvkernels.generate."""
import copy
import os
from dataclasses import dataclass

import pytest
import torch
import triton

import kvkernels
from conftest import DEVICE
from helpers import KernelCounter, make_gpt2, padded_batch, run_sm90_compile
from kvkernels import generation, split, step_reference, triton_step

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The fused kernels round where the reference rounds, but LayerNorm and GEMM sums run in a different order:
# one unit in the last place of the model dtype, carried through one more rounding.
STEP_TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def randn(*shape, dtype, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype)


def interpreted_bf16(dtype):
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def assert_step_close(got, expected, dtype):
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got.float(), expected.float(), rtol=STEP_TOLERANCE[dtype], atol=STEP_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    wte, wpe = randn(50, 40, dtype=dtype, generator=g), randn(30, 40, dtype=dtype, generator=g)
    tokens = torch.randint(0, 50, (5,), generator=g).to(DEVICE)
    lengths = torch.randint(0, 30, (5,), generator=g).int().to(DEVICE)
    outputs = {}
    for ops in (triton_step, step_reference):
        x, seq_lens = torch.full((5, 40), float("nan"), dtype=dtype, device=DEVICE), torch.full_like(lengths, -7)
        ops.embed(tokens, lengths, wte, wpe, x, seq_lens)
        outputs[ops] = x, seq_lens
    (x, seq_lens), (want_x, want_seq_lens) = outputs[triton_step], outputs[step_reference]
    # One rounding of one add: bit exact, but Triton's interpreter rounds to bfloat16 by truncation (one ulp).
    torch.testing.assert_close(x, want_x, rtol=2 ** -7 if interpreted_bf16(dtype) else 0, atol=0)
    torch.testing.assert_close(seq_lens, lengths + 1, rtol=0, atol=0)
    torch.testing.assert_close(want_seq_lens, lengths + 1, rtol=0, atol=0)


LINEAR_CASES = {
    "c_proj+residual": dict(K=72, N=100, residual=True),
    "ln+c_fc+gelu": dict(K=200, N=300, layer_norm=True, gelu=True),
    "ln+lm_head(transposed, float32 out)": dict(K=96, N=257, layer_norm=True, bias=False, transposed=True,
                                                out_dtype=torch.float32),
}


@pytest.mark.parametrize("rows", [1, 5, 40])                   # 40: two row tiles of 32
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_matches_reference(case, dtype, rows):
    spec = dict(layer_norm=False, gelu=False, residual=False, bias=True, transposed=False, out_dtype=dtype)
    spec.update(LINEAR_CASES[case])
    g = torch.Generator().manual_seed(rows)
    K, N = spec["K"], spec["N"]
    x = randn(rows, K, dtype=dtype, generator=g, scale=3.0) + 1.0                 # a mean for LayerNorm to remove
    weight = randn(N, K, dtype=dtype, generator=g, scale=K ** -0.5).t() if spec["transposed"] else \
        randn(K, N, dtype=dtype, generator=g, scale=K ** -0.5)
    bias = randn(N, dtype=dtype, generator=g) if spec["bias"] else None
    layer_norm = (randn(K, dtype=dtype, generator=g), randn(K, dtype=dtype, generator=g), 1e-5) \
        if spec["layer_norm"] else None
    residual = randn(rows, N, dtype=spec["out_dtype"], generator=g)
    outputs = []
    for ops in (triton_step, step_reference):
        out = residual.clone() if spec["residual"] else torch.full((rows, N), float("nan"), dtype=spec["out_dtype"],
                                                                    device=DEVICE)
        ops.linear(x, weight, bias, out, layer_norm=layer_norm, gelu=spec["gelu"], residual=spec["residual"])
        outputs.append(out)
    assert_step_close(*outputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, 40])
def test_qkv_write_matches_reference(dtype, rows):
    heads, head_dim, block_size, blocks_per_seq = 3, 16, 4, 5
    embed_dim = heads * head_dim
    g = torch.Generator().manual_seed(rows)
    x = randn(rows, embed_dim, dtype=dtype, generator=g, scale=2.0)
    layer_norm = (randn(embed_dim, dtype=dtype, generator=g), randn(embed_dim, dtype=dtype, generator=g), 1e-5)
    weight = randn(embed_dim, 3 * embed_dim, dtype=dtype, generator=g, scale=embed_dim ** -0.5)
    bias = randn(3 * embed_dim, dtype=dtype, generator=g)
    num_blocks = rows * blocks_per_seq + 2
    tables = torch.randperm(num_blocks, generator=g)[: rows * blocks_per_seq].view(rows, blocks_per_seq).int()
    lengths = torch.randint(0, blocks_per_seq * block_size, (rows,), generator=g).int()
    tables, lengths = tables.to(DEVICE), lengths.to(DEVICE)
    outputs = []
    for ops in (triton_step, step_reference):
        q = torch.full((rows, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        k_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        v_cache = torch.full_like(k_cache, float("nan"))
        ops.qkv_write(x, layer_norm, weight, bias, q, k_cache, v_cache, tables, lengths)
        outputs.append((q, k_cache, v_cache))
    (q, k_cache, v_cache), (want_q, want_k, want_v) = outputs
    assert_step_close(q, want_q, dtype)
    written = want_k[:, :, 0, 0].isfinite()                                     # [num_blocks, block_size]
    assert int(written.sum()) == rows, "the reference writes one slot per row"
    for cache, want in ((k_cache, want_k), (v_cache, want_v)):
        assert cache[~written].isnan().all(), "a slot other than the rows' new ones was written"
        assert_step_close(cache[written], want[written], dtype)


# K split in 2-3 (the last chunk shorter); one BLOCK_K per split
@pytest.mark.parametrize("sms", [6, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_split_k_gemms_match_reference_run_to_run_identical(monkeypatch, sms, dtype, rows):
    """K split across programs (fp32 partials, summed in split order by the tile's last program to arrive): the
    reference's results, bit-identical from run to run whatever the arrival order (the interpreter runs programs
    in order: only a GPU run varies it), and the arrival counters left at zero for the next launch (a replayed
    graph). One workspace sized for both GEMMs serves them all."""
    monkeypatch.setattr(triton_step, "num_sms", lambda device: sms)
    g = torch.Generator().manual_seed(rows)
    K, N = 600, 100
    (_, block_k, _), (_, _, splits), k_chunk, _ = triton_step._gemm_plan(rows, N, K, dtype, DEVICE)   # as launched
    assert splits > 1 and (splits - 1) * k_chunk < K <= splits * k_chunk
    if sms == 64:
        assert k_chunk == block_k, "every split streams one BLOCK_K"
    x = randn(rows, K, dtype=dtype, generator=g, scale=3.0) + 1.0
    weight, bias = randn(K, N, dtype=dtype, generator=g, scale=K ** -0.5), randn(N, dtype=dtype, generator=g)
    layer_norm = (randn(K, dtype=dtype, generator=g), randn(K, dtype=dtype, generator=g), 1e-5)
    residual = randn(rows, N, dtype=dtype, generator=g)
    heads, head_dim, block_size = 4, 64, 4                                       # c_attn: K = 256, N = 768
    embed_dim = heads * head_dim
    workspace = triton_step.gemm_workspace(rows, [(K, N), (embed_dim, 3 * embed_dim)], dtype, DEVICE)
    for epilogue in (dict(layer_norm=layer_norm, gelu=True), dict(residual=True)):   # c_fc's, c_proj's
        runs = []
        for ops in (triton_step, triton_step, step_reference):
            out = residual.clone()
            ops.linear(x, weight, bias, out, workspace=workspace, **epilogue)
            runs.append(out)
        assert_step_close(runs[0], runs[2], dtype)
        assert torch.equal(runs[0], runs[1])
        assert (workspace.counters == 0).all()

    x = randn(rows, embed_dim, dtype=dtype, generator=g, scale=2.0)
    layer_norm = (randn(embed_dim, dtype=dtype, generator=g), randn(embed_dim, dtype=dtype, generator=g), 1e-5)
    weight = randn(embed_dim, 3 * embed_dim, dtype=dtype, generator=g, scale=embed_dim ** -0.5)
    bias = randn(3 * embed_dim, dtype=dtype, generator=g)
    tables = torch.arange(rows, dtype=torch.int32, device=DEVICE)[:, None]        # row b's slots: block b
    lengths = torch.randint(0, block_size, (rows,), generator=g).int().to(DEVICE)
    outputs = []
    for ops in (triton_step, step_reference):
        q = torch.full((rows, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        k_cache = torch.full((rows, block_size, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
        v_cache = torch.full_like(k_cache, float("nan"))
        ops.qkv_write(x, layer_norm, weight, bias, q, k_cache, v_cache, tables, lengths, workspace=workspace)
        outputs.append((q, k_cache, v_cache))
    for got, want in zip(*outputs):
        written = want.isfinite()
        assert torch.equal(got.isfinite(), written), "written elements differ from the reference's"
        assert_step_close(got[written], want[written], dtype)
    assert (workspace.counters == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, K, N", [(1, 128, 50257), (17, 16, 151936)])
def test_a_vocabulary_wide_gemm_matches_reference(dtype, M, K, N):
    """lm_head shapes at small widths: 50257 / 151936 columns (64-column tiles on a GPU, few wide ones in the
    interpreter, where GPT-2's took 786 programs a token, then weight or accumulator tiles over the interpreter's
    2**20 elements), the last tile partial; logits in float32."""
    g = torch.Generator().manual_seed(0)
    if DEVICE.type == "cpu" and M == 1:
        assert triton_step._gemm_plan(M, N, K, dtype, DEVICE)[1][0] <= 8
    x = randn(M, K, dtype=dtype, generator=g)
    weight = randn(K, N, dtype=dtype, generator=g, scale=K ** -0.5)
    layer_norm = (randn(K, dtype=dtype, generator=g), randn(K, dtype=dtype, generator=g), 1e-5)
    outputs = []
    for ops in (triton_step, step_reference):
        out = torch.full((M, N), float("nan"), device=DEVICE)
        ops.linear(x, weight, None, out, layer_norm=layer_norm)
        outputs.append(out)
    assert outputs[0].isfinite().all()
    assert_step_close(*outputs, dtype)


def test_a_gemm_the_workspace_was_not_sized_for_raises():
    """A captured step's GEMMs keep their workspace's addresses: one that needs more than it holds raises, not
    reallocates."""
    g = torch.Generator().manual_seed(0)
    x, weight = randn(1, 600, dtype=torch.float32, generator=g), randn(600, 100, dtype=torch.float32, generator=g)
    out = torch.full((1, 100), float("nan"), device=DEVICE)
    small = triton_step.gemm_workspace(1, [(600, 50)], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="split-K partials"):
        triton_step.linear(x, weight, None, out, workspace=small)
    triton_step.linear(x, weight, None, out, workspace=triton_step.gemm_workspace(1, [(600, 100)], torch.float32,
                                                                                  DEVICE))
    torch.testing.assert_close(out, x @ weight, rtol=2e-5, atol=2e-5)


def test_split_k_gives_gpt2_124m_gemms_about_two_programs_per_h100_sm():
    """Batch 1, fp16, 132 SMs: c_attn, c_proj, c_fc and the MLP's down-projection launched 72, 24, 96 and 24
    programs (one per 32-column tile); split K gives each 144-288, and the lm_head's 786 tiles stay whole."""
    programs = {}
    for name, (K, N) in dict(c_attn=(768, 2304), c_proj=(768, 768), c_fc=(768, 3072), mlp_c_proj=(3072, 768),
                             lm_head=(768, 50257)).items():
        block_m, block_k, block_n = triton_step._gemm_blocks(1, N, K, torch.float16)
        tiles = triton.cdiv(N, block_n)
        splits, k_chunk = split.split_k(tiles, K, block_k, 132)
        assert k_chunk % block_k == 0 and (splits - 1) * k_chunk < K <= splits * k_chunk, name
        programs[name] = tiles * splits
    assert programs == dict(c_attn=216, c_proj=144, c_fc=288, mlp_c_proj=192, lm_head=786), programs


@dataclass
class State:
    """kvkernels.generation._DecodeState's tensors, as update_state reads them."""
    tokens: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    done_at: torch.Tensor
    step: torch.Tensor
    out: torch.Tensor
    seen: torch.Tensor
    eos: torch.Tensor
    pad: int


def random_state(batch, vocab, eos, penalty, generator):
    finished = torch.rand(batch, generator=generator) < 0.3
    return State(tokens=torch.randint(0, vocab, (batch,), generator=generator),
                 lengths=torch.randint(1, 50, (batch,), generator=generator).int(), finished=finished,
                 done_at=torch.where(finished, 2, 9), step=torch.full((batch,), 3),
                 out=torch.randint(0, vocab, (batch, 9), generator=generator),
                 seen=torch.rand(batch, vocab, generator=generator) < 0.2 if penalty != 1.0 else None,
                 eos=torch.tensor(eos, dtype=torch.long), pad=5)


def to_device(state):
    return State(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in vars(state).values()))


@pytest.mark.parametrize("mode", ["greedy", "greedy+penalty", "chosen", "chosen+penalty"])
@pytest.mark.parametrize("vocab", [300, 5000])                    # 5000 > 4096: the argmax loops over chunks
def test_update_state_matches_reference(mode, vocab):
    g = torch.Generator().manual_seed(vocab)
    batch, penalty = 6, 1.3 if "penalty" in mode else 1.0
    logits = torch.randn(batch, vocab, generator=g) * 3
    logits[0, [7, vocab - 3]] = 50.0                                # a tie: the first index wins, like torch
    logits[1] = float("-inf")                                       # nothing allowed: index 0, like torch
    logits[2, vocab - 1] = 60.0                                     # the maximum in the last, partial chunk
    chosen = torch.randint(0, vocab, (batch,), generator=g)
    eos = [11, int(logits[3].argmax()), int(logits[4].argmax()), int(chosen[3]), int(chosen[4])]
    state = random_state(batch, vocab, eos, penalty=penalty, generator=g)
    state.finished[3:5] = False                                     # rows 3 and 4 emit an EOS now
    if state.seen is not None:
        state.seen[:5] = False
        state.seen[5, logits[5].argmax()] = True                    # the penalty changes row 5's greedy choice
    results = []
    for ops in (triton_step, step_reference):
        mine = to_device(copy.deepcopy(state))
        if mode.startswith("greedy"):
            ops.update_state(mine, logits.to(DEVICE), penalty=penalty, grow=True)
        else:
            ops.update_state(mine, chosen=chosen.to(DEVICE), penalty=penalty)
        results.append(mine)
    got, expected = results
    for name, value in vars(expected).items():
        torch.testing.assert_close(getattr(got, name), value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert bool(expected.finished[3]) and bool(expected.finished[4])
    if mode.startswith("greedy"):
        assert int(expected.tokens[0]) in (7, state.pad) and int(expected.tokens[2]) in (vocab - 1, state.pad)
        torch.testing.assert_close(expected.lengths.cpu(), state.lengths + (~state.finished).int(), rtol=0, atol=0)


def test_update_state_without_eos():
    g = torch.Generator().manual_seed(0)
    state = random_state(4, 64, eos=[], penalty=1.0, generator=g)
    logits, results = torch.randn(4, 64, generator=g).to(DEVICE), []
    for ops in (triton_step, step_reference):
        mine = to_device(copy.deepcopy(state))
        ops.update_state(mine, logits, grow=True)
        results.append(mine)
    for name, value in vars(results[1]).items():
        torch.testing.assert_close(getattr(results[0], name), value, rtol=0, atol=0)
    torch.testing.assert_close(results[0].finished.cpu(), state.finished, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The launch budget of one decode step.

class _StepCounted(Exception):
    pass


def count_decode_step(monkeypatch, model, ids, mask=None, *, dry=False, max_new_tokens=2, **kwargs):
    """Runs kvkernels.generate up to its first decode step; returns that step's KernelCounter. The pool and
    block tables are sized for max_new_tokens, as in a run that goes on."""
    counter = KernelCounter(monkeypatch, dry=dry)
    step = generation._Runner.decode_step

    def counted_step(runner, state):
        with counter:
            step(runner, state)
        raise _StepCounted
    monkeypatch.setattr(generation._Runner, "decode_step", counted_step)
    with pytest.raises(_StepCounted):
        kvkernels.generate(model, ids, mask, max_new_tokens=max_new_tokens, cuda_graph=False, **kwargs)
    return counter


def test_counter_counts_real_kernels(monkeypatch):
    """The reference step (module by module, ~14 aten ops per layer) is far over budget and the fused one far
    under, in a real (executed) run of a 12-layer model; a dry run (launches counted, not executed) agrees."""
    model = make_gpt2(n_layer=12, device=DEVICE)
    ids, mask = padded_batch(prompt_lens=(5, 3), device=DEVICE)
    reference = count_decode_step(monkeypatch, model, ids, mask, backend="torch")
    monkeypatch.undo()
    fused = count_decode_step(monkeypatch, model, ids, mask, backend="triton")
    monkeypatch.undo()
    dry = count_decode_step(monkeypatch, model, ids, mask, backend="triton", dry=True)
    assert reference.ops["addmm"] == 2 * 4 * 12 and reference.ops["native_layer_norm"] == 2 * 12 + 1
    assert reference.total > 150 and not reference.launches
    assert fused.launches["_qkv_write_kernel"] == 12 and fused.launches["_linear_kernel"] == 3 * 12 + 1
    assert fused.total <= 70 and not fused.syncs
    assert dry.total == fused.total


def gpt2_124m(dtype=torch.float32):
    """GPT-2 124M's architecture with uninitialised weights (the count does not depend on their values)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
    return model.to_empty(device=DEVICE).to(dtype).eval()


@pytest.fixture(scope="module")
def gpt2_small():
    return gpt2_124m()


KERNEL_BUDGET = 100


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_decode_step_of_gpt2_124m_fits_the_kernel_budget(monkeypatch, gpt2_small, batch, sampling):
    """One decode step of GPT-2 124M in at most 100 kernels at every batch size (dry run: counted, not executed).
    A long context, whose attention splits, launches no more: the merge runs inside the attention kernel."""
    ids = torch.randint(0, 50257, (batch, 12), device=DEVICE)
    kwargs = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.7) if sampling else {}
    counter = count_decode_step(monkeypatch, gpt2_small, ids, dry=True, repetition_penalty=1.1, **kwargs)
    print(f"batch {batch} {'sampling' if sampling else 'greedy'}: {counter.total} kernels "
          f"{dict(counter.launches)} {dict(counter.ops)}")
    assert not counter.syncs, f"host syncs in the decode step: {counter.syncs}"
    assert counter.total <= KERNEL_BUDGET
    assert not counter.unfused, "Triton 3.10's default is unfused: every launch pins kvkernels.split.FP_FUSION"
    if batch == 1 and not sampling:
        monkeypatch.undo()
        split = count_decode_step(monkeypatch, gpt2_small, ids, dry=True, repetition_penalty=1.1,
                                  max_new_tokens=1000)
        print(f"batch 1 greedy, 1012-token context: {split.total} kernels {dict(split.launches)}")
        assert split.grids["_paged_decode_kernel"][2] > 1, "a 1012-token context at batch 1 splits"
        assert split.launches == counter.launches and split.total == counter.total


# ---------------------------------------------------------------------------------------------------------------
# sm_90 compile.

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_sm90_compile("compile_step_sm90.py", str(tmp_path_factory.mktemp("cubin")))


def test_step_kernels_compile_for_sm90_without_spills(compiled):
    from compile_step_sm90 import CASES
    assert sorted(compiled) == sorted(CASES)
    for case, usage in compiled.items():
        assert usage["spilled_bytes"] == 0, f"{case} spills {usage['spilled_bytes']} bytes on sm_90: {usage}"
        assert usage["registers"] <= 255, f"{case}: {usage}"
        # a split GEMM's last program reads the others' partials: barrier, GPU fence, atomic add, L1 invalidation
        split_k = CASES[case][2].get("SPLIT_K", False)
        assert usage["split_counter_ordered"] is (True if split_k else None), f"{case}: {usage}"
    assert sum(CASES[case][2].get("SPLIT_K", False) for case in CASES) >= 6, "the GPT-2 GEMM cases split K"
