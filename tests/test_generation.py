"""kvkernels.generate (own prefill + decode loop over the paged cache) and its sampling, against HF generate."""
import functools

import pytest
import torch
from transformers import GPT2Model
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import helpers
import kvkernels
from conftest import DEVICE, kernel_backends
from helpers import make_gpt2
from kvkernels.sampling import SamplingParams, process_logits, select_tokens

BACKENDS = kernel_backends()

make_model = functools.partial(make_gpt2, device=DEVICE)
padded_batch = functools.partial(helpers.padded_batch, device=DEVICE)


class RecordingStreamer:
    """HF's streamer protocol (put, end), recording every call."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        assert self.ends == 0, "put after end"
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


def test_greedy_ignores_sampling_settings_and_takes_tensor_token_ids_as_hf_does():
    """HF's greedy generate ignores temperature=0 or top_p=0 (it warns) and takes EOS / pad ids as tensors; both
    raised."""
    model = make_model()
    ids, mask = padded_batch()
    eos = int(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[0, -2])  # stops row 0
    settings = dict(max_new_tokens=6, do_sample=False, temperature=0.0, top_p=0.0)
    expected = model.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **settings)
    got = kvkernels.generate(model, ids, mask, eos_token_id=torch.tensor(eos), pad_token_id=torch.tensor(0),
                             backend="torch", **settings)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Some configs pad with -1; HF takes it (and feeds it to the embedding only after an EOS).
    expected = model.generate(ids, attention_mask=mask, eos_token_id=None, pad_token_id=-1, **settings)
    got = kvkernels.generate(model, ids, mask, eos_token_id=[], pad_token_id=-1, backend="torch", **settings)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert SamplingParams(do_sample=False, temperature=0.7, top_p=0.5) == SamplingParams()   # one greedy session
    for pad in (-1, 256):                           # an ended sequence feeds its pad back: out of the vocabulary
        with pytest.raises(ValueError, match=rf"pad_token_id={pad} must be a token id in \[0, 256\)"):
            kvkernels.generate(model, ids, mask, eos_token_id=eos, pad_token_id=pad, backend="triton", **settings)


def test_prompt_plus_new_tokens_may_pass_the_position_table_by_the_one_token_never_fed():
    """HF generates n_positions + 1 tokens: the last one is sampled, never fed back, so it needs no position."""
    model = make_model(n_positions=32)
    ids, mask = padded_batch()                                      # the longest prompt has 9 tokens
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert expected.shape[1] == 33
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, max_new_tokens=24, backend="torch"), expected,
                               rtol=0, atol=0)
    with kvkernels.patched(model, backend="torch"):
        torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False),
                                   expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="n_positions=32"):
            model.generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    with pytest.raises(ValueError, match="n_positions=32"):
        kvkernels.generate(model, ids, mask, max_new_tokens=25, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["batch1", "left_padded_batch3"])
def test_greedy_matches_hf_generate(backend, case):
    model = make_model()
    ids, mask = padded_batch(prompt_lens=(7,)) if case == "batch1" else padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    assert len(set(expected[0, -64:].tolist())) > 8, "the reference should not be degenerate"
    got = kvkernels.generate(model, ids, mask if case != "batch1" else None, max_new_tokens=64, backend=backend,
                             block_size=8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not available here")
def test_greedy_with_split_attention_matches_hf(monkeypatch):
    """Attention forced to split (16-token tiles, up to 3 partitions of >= 16 tokens): generate's step merges
    them inside the decode kernel through its split counters, step after step on the same counters."""
    from kvkernels import generation, triton_decode

    monkeypatch.setattr(triton_decode, "decode_config",
                        lambda shape, dtype, cache_dtype=None: triton_decode.DecodeConfig(16, 4, 2))
    monkeypatch.setattr(triton_decode, "paged_decode_attention",
                        functools.partial(triton_decode.paged_decode_attention, num_splits=3, min_split_tokens=16))
    runners = []
    real_step = generation._Runner.decode_step
    monkeypatch.setattr(generation._Runner, "decode_step",
                        lambda runner, state: (runners.append(runner), real_step(runner, state))[1])
    model = make_model()
    ids, mask = padded_batch()                                   # contexts grow from 5-9 to 28-32 tokens
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    got = kvkernels.generate(model, ids, mask, max_new_tokens=24, backend="triton", block_size=8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not runners[-1].split_counters.any(), "the counters are left at zero for the next step"


@pytest.mark.parametrize("overrides", [dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
                                       dict(scale_attn_weights=False, initializer_range=0.05)])
def test_greedy_matches_hf_with_attention_scaling_configs(overrides):
    model = make_model(**overrides)
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24)
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, max_new_tokens=24, backend="torch"), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overrides", [dict(activation_function="relu"), dict(layer_norm_epsilon=1e-2)])
def test_greedy_with_penalty_and_other_configs_matches_hf(backend, overrides):
    """The fused step applies the repetition penalty in its argmax, and runs activations other than tanh GELU
    (which its c_fc kernel fuses) as the model's own module, with the model's LayerNorm epsilon."""
    model = make_model(**overrides)
    ids, mask = padded_batch(prompt_lens=(7, 7))     # unpadded: HF versions differ on penalising padding
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, repetition_penalty=1.3)
    got = kvkernels.generate(model, ids, mask, max_new_tokens=20, repetition_penalty=1.3, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# As tests/test_hf_patch.py: the default initializer range keeps half-precision logits small enough for these.
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_step_logits_match_hf(backend, dtype):
    """The last decode step's logits (the fused step's float32 buffer) against HF's forward over the same tokens."""
    from kvkernels import generation

    model = make_model(dtype=dtype, initializer_range=0.02 if dtype != torch.float32 else 0.3)
    ids, mask = padded_batch()
    got = kvkernels.generate(model, ids, mask, max_new_tokens=8, backend=backend)
    logits = model.__dict__[generation._SESSION].runner.logits                    # [B, V], from got[:, -2]
    full_mask = torch.cat([mask, torch.ones_like(got[:, ids.shape[1]:])], dim=1)[:, :-1]
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)                            # as HF generate's position_ids
    with torch.no_grad():
        expected = model(got[:, :-1], attention_mask=full_mask, position_ids=positions).logits[:, -1].float()
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, expected, rtol=LOGITS_TOLERANCE[dtype], atol=LOGITS_TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_stops_each_sequence_like_hf(backend):
    model = make_model()
    ids, mask = padded_batch()
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=30)[:, ids.shape[1]:]
    # An EOS the first sequence emits early: it finishes while the others go on (a ragged batch).
    eos = int(free_run[0, 4])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    got = kvkernels.generate(model, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got[0, ids.shape[1] + 5:] == 0).all()
    # EOS ids each sequence emits early: everything stops, and the output is as short as HF's.
    stops = [int(row[2]) for row in free_run]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=stops, pad_token_id=0)
    got = kvkernels.generate(model, ids, mask, max_new_tokens=30, eos_token_id=stops, pad_token_id=0, backend=backend)
    assert got.shape[1] < ids.shape[1] + 30
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_streamer_receives_what_hf_sends():
    model = make_model()
    ids, _ = padded_batch(prompt_lens=(6,))
    eos = int(model.generate(ids, max_new_tokens=12)[0, ids.shape[1] + 7])
    hf_streamer, streamer = RecordingStreamer(), RecordingStreamer()
    expected = model.generate(ids, max_new_tokens=12, eos_token_id=eos, streamer=hf_streamer)
    got = kvkernels.generate(model, ids, max_new_tokens=12, eos_token_id=eos, streamer=streamer, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert streamer.ends == 1 and len(streamer.puts) == len(hf_streamer.puts) == 1 + got.shape[1] - ids.shape[1]
    torch.testing.assert_close(streamer.puts[0], ids.cpu(), rtol=0, atol=0)            # the prompt first
    for mine, theirs in zip(streamer.puts, hf_streamer.puts):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(streamer.puts[1:], 1), got[:, ids.shape[1]:].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_reproducible_with_a_seed(backend):
    model = make_model()
    ids, mask = padded_batch()
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2,
                  backend=backend)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(kvkernels.generate(model, ids, mask, **kwargs))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])
    torch.testing.assert_close(runs[0][:, :ids.shape[1]], ids, rtol=0, atol=0)
    assert runs[0].min() >= 0 and runs[0].max() < 256


def test_top_k_one_sampling_is_greedy():
    model = make_model()
    ids, mask = padded_batch()
    greedy = kvkernels.generate(model, ids, mask, max_new_tokens=16, backend="torch")
    sampled = kvkernels.generate(model, ids, mask, max_new_tokens=16, do_sample=True, top_k=1, backend="torch")
    torch.testing.assert_close(sampled, greedy, rtol=0, atol=0)


@pytest.mark.parametrize("params", [dict(do_sample=False, repetition_penalty=1.3),
                                    dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2),
                                    dict(do_sample=True, top_p=0.5), dict(do_sample=True, top_k=300, temperature=2.0)])
def test_logits_processing_matches_hf_processors(params):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 256, generator=generator) * 3
    input_ids = torch.randint(0, 256, (4, 12), generator=generator)
    p = SamplingParams(**params)
    hf = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        hf.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.do_sample:
        if p.temperature != 1.0:
            hf.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            hf.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            hf.append(TopPLogitsWarper(p.top_p))
    seen = torch.zeros(4, 256, dtype=torch.bool).scatter_(1, input_ids, True)
    torch.testing.assert_close(process_logits(logits, p, seen), hf(input_ids, logits.clone()), rtol=0, atol=0)


def test_exponential_race_samples_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    scores = probs.log().expand(40_000, -1)
    torch.manual_seed(0)
    drawn = select_tokens(scores, SamplingParams(do_sample=True))
    frequency = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    torch.testing.assert_close(frequency, probs, atol=0.01, rtol=0)       # ~5 standard errors
    assert frequency[4] == 0


def test_bad_inputs_give_clear_errors():
    model = make_model()
    ids, mask = padded_batch()
    with pytest.raises(TypeError, match="GPT-2"):
        kvkernels.generate(torch.nn.Linear(2, 2), ids, max_new_tokens=2)
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="language-modelling head"):
        kvkernels.generate(GPT2Model(model.config).to(DEVICE).eval(), ids, max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        kvkernels.generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvkernels.generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="n_positions=128"):
        kvkernels.generate(model, torch.randint(2, 256, (1, 129), device=DEVICE), max_new_tokens=1)
    with pytest.raises(ValueError, match="n_positions=128"):
        kvkernels.generate(model, ids, mask, max_new_tokens=121)     # 9 + 121 - 1 positions fed
    with pytest.raises(ValueError, match="left-padded"):
        kvkernels.generate(model, ids, mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        kvkernels.generate(model, ids, mask, max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        kvkernels.generate(model, ids, mask, max_new_tokens=2, do_sample=True, temperature=0)
    with pytest.raises(TypeError, match="temperature must be a number"):
        kvkernels.generate(model, ids, mask, max_new_tokens=2, do_sample=True, temperature="hot")
    with pytest.raises(ValueError, match="backend"):
        kvkernels.generate(model, ids, mask, max_new_tokens=2, backend="tpu")
    model.train()
    with pytest.raises(ValueError, match="eval"):
        kvkernels.generate(model, ids, mask, max_new_tokens=2)
    model.eval()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5)
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, max_new_tokens=5), expected, rtol=0, atol=0)


@pytest.fixture
def graph_branch_on_cpu(monkeypatch):
    """The CUDA-graph branch on the CPU: capture replaced by its real warm-up plus the eager step."""
    from kvkernels import generation

    def eager_capture(runner, state, warm_up_steps):
        generation._warm_up(runner, state, warm_up_steps)
        return lambda: runner.decode_step(state)
    monkeypatch.setattr(generation, "_graphs_supported", lambda device, backend: True)
    monkeypatch.setattr(generation, "_capture", eager_capture)


@pytest.mark.parametrize("max_new_tokens", [2, 3, 20])
def test_graph_path_warm_up_leaves_no_trace(graph_branch_on_cpu, max_new_tokens):
    """Warm-up steps advance every state tensor and write K/V ahead; generation must not notice, down to
    the shortest run that captures (2 tokens: one column left for the warm-up)."""
    model = make_model()
    ids, mask = padded_batch(prompt_lens=(7, 7))     # unpadded: HF versions differ on penalising padding
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, repetition_penalty=1.3)
    got = kvkernels.generate(model, ids, mask, max_new_tokens=max_new_tokens, repetition_penalty=1.3,
                             backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_graph_path_warm_up_leaves_the_random_stream_alone(graph_branch_on_cpu):
    """With one seed, the call that captures (warm-up included) samples the same tokens as an eager call."""
    model = make_model()
    ids, mask = padded_batch(prompt_lens=(5, 5))
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=30, backend="torch")
    torch.manual_seed(11)
    captured = kvkernels.generate(model, ids, mask, **kwargs)
    torch.manual_seed(11)
    eager = kvkernels.generate(model, ids, mask, cuda_graph=False, **kwargs)
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


def test_kept_session_is_refilled_for_each_call():
    """Calls with the same shapes reuse one pool (and graph); new prompts, penalties and EOS state are reset."""
    from kvkernels import generation

    model = make_model()
    kwargs = dict(max_new_tokens=12, repetition_penalty=1.4, backend="torch")
    first_ids, mask = padded_batch(prompt_lens=(6, 6), seed=1)
    second_ids, _ = padded_batch(prompt_lens=(6, 6), seed=2)
    sessions = []
    for ids in (first_ids, second_ids, first_ids):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, repetition_penalty=1.4)
        torch.testing.assert_close(kvkernels.generate(model, ids, mask, **kwargs), expected, rtol=0, atol=0)
        sessions.append(model.__dict__[generation._SESSION])
    assert sessions[0] is sessions[1] is sessions[2], "same shapes and settings must reuse the kept session"
    kvkernels.generate(model, first_ids, mask, max_new_tokens=13, backend="torch")
    assert model.__dict__[generation._SESSION] is not sessions[0], "a new configuration replaces the session"
    generation.release(model)
    assert generation._SESSION not in model.__dict__


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_matches_eager_and_hf(backend):
    model = make_model()
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64)
    for graph in (False, True):
        got = kvkernels.generate(model, ids, mask, max_new_tokens=64, cuda_graph=graph, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    kwargs = dict(max_new_tokens=40, do_sample=True, top_k=20, top_p=0.9, repetition_penalty=1.1, cuda_graph=True,
                  backend=backend)
    torch.manual_seed(3)
    first = kvkernels.generate(model, ids, mask, **kwargs)
    torch.manual_seed(3)
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, **kwargs), first, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_large_batch_with_eos_and_streamer():
    model = make_model(n_layer=4, n_head=8, n_embd=256, vocab_size=1000, n_positions=512)
    ids, mask = padded_batch(prompt_lens=[5 + (7 * i) % 40 for i in range(48)], vocab=1000)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64)
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, max_new_tokens=64), expected, rtol=0, atol=0)
    # 300 tokens: the graph replays the eager step's kernels, so the two agree bit for bit, EOS and all.
    free_run = kvkernels.generate(model, ids, mask, max_new_tokens=300, cuda_graph=False)[:, ids.shape[1]:]
    eos = [int(free_run[0, 50]), int(free_run[1, 120])]
    kwargs = dict(max_new_tokens=300, eos_token_id=eos, pad_token_id=0)
    eager = kvkernels.generate(model, ids, mask, cuda_graph=False, **kwargs)
    streamer = RecordingStreamer()
    for graph in (kvkernels.generate(model, ids, mask, streamer=streamer, **kwargs),
                  kvkernels.generate(model, ids, mask, **kwargs)):
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)
    assert (eager[0, ids.shape[1] + 51:] == 0).all()
    torch.testing.assert_close(torch.stack(streamer.puts[1:], 1), eager[:, ids.shape[1]:].cpu(), rtol=0, atol=0)


def test_unset_sampling_arguments_mean_what_they_mean_in_hf_generate():
    """do_sample=True alone samples with the generation_config defaults (top_k=50), as model.generate does."""
    model = make_model()
    ids, mask = padded_batch(prompt_lens=(7,))
    draws = 600
    many, many_mask = ids.expand(draws, -1), mask.expand(draws, -1)
    torch.manual_seed(0)
    ours = kvkernels.generate(model, many, many_mask, max_new_tokens=1, do_sample=True, backend="torch")[:, -1]
    torch.manual_seed(0)
    theirs = model.generate(many, attention_mask=many_mask, max_new_tokens=1, do_sample=True)[:, -1]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[0, -1]
    top50 = set(logits.topk(50).indices.tolist())
    assert set(ours.tolist()) <= top50 and set(theirs.tolist()) <= top50
    assert len(set(ours.tolist())) > 25                             # the whole top 50 is in play, not only a few
    # Same distribution: frequencies of the likeliest tokens agree within ~4 standard errors.
    probs = logits.topk(50).values.softmax(-1)
    for token, p in zip(logits.topk(5).indices.tolist(), probs[:5].tolist()):
        bound = 4 * (p * (1 - p) / draws) ** 0.5 + 1e-3
        assert abs((ours == token).float().mean().item() - p) < bound
        assert abs((theirs == token).float().mean().item() - p) < bound
    # A generation_config setting is read the same way: top_k=3 there, do_sample left unset.
    model.generation_config.do_sample, model.generation_config.top_k = True, 3
    ours = kvkernels.generate(model, many, many_mask, max_new_tokens=1, backend="torch")[:, -1]
    assert set(ours.tolist()) <= set(logits.topk(3).indices.tolist()) and len(set(ours.tolist())) > 1


def test_unset_max_new_tokens_and_greedy_follow_hf():
    model = make_model()
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask)                # HF: 20 new tokens, greedy
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, backend="torch"), expected, rtol=0, atol=0)
    model.generation_config.max_new_tokens, model.generation_config.repetition_penalty = 7, 1.4
    expected = model.generate(ids, attention_mask=mask)
    assert expected.shape[1] == ids.shape[1] + 7
    torch.testing.assert_close(kvkernels.generate(model, ids, mask, backend="torch"), expected, rtol=0, atol=0)
    model.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(NotImplementedError, match="no_repeat_ngram_size"):
        kvkernels.generate(model, ids, mask, backend="torch")


def test_repetition_penalty_counts_padding_like_the_installed_transformers():
    """transformers 5.17 penalises the prompt's left-padding ids, later versions skip them. Pad with a token the
    model wants to emit: whether HF's output depends on the pad id tells which semantics is installed, and
    kvkernels.generate must match it either way."""
    from kvkernels.sampling import hf_penalises_left_padding

    model = make_model()
    ids, mask = padded_batch()
    kwargs = dict(max_new_tokens=12, repetition_penalty=2.0)
    free_run = model.generate(ids, attention_mask=mask, max_new_tokens=1)
    wanted = int(free_run[1, -1])                                      # row 1 is padded (5 real of 9)
    outputs = {}
    for pad in (wanted, 0 if wanted != 0 else 2):
        padded = ids.masked_fill(mask == 0, pad)
        expected = model.generate(padded, attention_mask=mask, pad_token_id=pad, **kwargs)
        got = kvkernels.generate(model, padded, mask, pad_token_id=pad, backend="torch", **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        outputs[pad] = expected[:, ids.shape[1]:]
    first, second = outputs.values()
    assert (not torch.equal(first, second)) == hf_penalises_left_padding()
