"""kvkernels.patch(model): HF GPT-2 generate and forward on the paged cache, exact against unpatched HF eager."""
import functools
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache, GPT2LMHeadModel, GPT2Model

import helpers
import kvkernels
from conftest import DEVICE, kernel_backends
from helpers import KernelCounter, make_gpt2
from kvkernels.hf import PagedCache, is_patched

BACKENDS = kernel_backends()
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}

make_model = functools.partial(make_gpt2, device=DEVICE, n_head=4)
padded_batch = functools.partial(helpers.padded_batch, device=DEVICE)


class AttendCounter:
    """Counts the layer calls served from the paged cache (to prove the paged path ran, or did not)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = PagedCache.attend

        def counting(cache, *args, **kwargs):
            self.calls += 1
            return original(cache, *args, **kwargs)
        monkeypatch.setattr(PagedCache, "attend", counting)


@pytest.mark.parametrize("prompt_len", [8, 1000], ids=["short", "split"])
def test_a_patched_decode_step_launches_one_write_and_one_decode_per_layer(monkeypatch, prompt_len):
    """HF's generate loop is host-bound on a GPU, so every launch and tensor op kvkernels adds per layer is host time
    it adds per token. A decode step's layer writes the new K/V and attends in one Triton launch each, with no tensor
    op or host sync of its own; at a context long enough to split, the partitions merge inside the decode launch
    (dry run: launches counted, not executed)."""
    if "triton" not in BACKENDS:
        pytest.skip("needs Triton")
    model = make_model(n_layer=3, n_positions=1024)
    counter = KernelCounter(monkeypatch, dry=True)
    attend = PagedCache.attend

    def counted(cache, *args, **kwargs):
        if not cache.step.decode:
            return attend(cache, *args, **kwargs)
        with counter:
            return attend(cache, *args, **kwargs)
    monkeypatch.setattr(PagedCache, "attend", counted)
    ids = torch.randint(2, 256, (1, prompt_len), device=DEVICE)
    with kvkernels.patched(model, backend="triton"), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert counter.launches == {"_write_kv_kernel": 2 * 3, "_paged_decode_kernel": 2 * 3}   # 2 steps x 3 layers
    assert not counter.ops and not counter.syncs
    assert (counter.grids["_paged_decode_kernel"][2] > 1) == (prompt_len == 1000)


def teacher_forced_logits(model, ids, mask, steps):
    """Runs prompt, then `steps` (token chunks, [B, n] each) through model with a cache; returns the logits list."""
    cache = None if is_patched(model) else DynamicCache()
    outputs = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        outputs.append(out.logits)
        for chunk in steps:
            mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
            out = model(chunk, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            outputs.append(out.logits)
    return outputs, out.past_key_values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_teacher_forced_logits_match_hf_eager(backend, dtype, monkeypatch):
    # The default initializer range keeps half-precision logits small enough for an absolute tolerance.
    cuda = backend == "cuda"   # the CUDA kernel takes head dims from 32 and pages of 8 tokens or more
    model = make_model(dtype=dtype, initializer_range=0.02 if dtype != torch.float32 else 0.3,
                       **({"n_embd": 128} if cuda else {}))
    ids, mask = padded_batch()
    generator = torch.Generator().manual_seed(2)
    # Eight single-token decode steps, then a 3-token step over the paged past (a continuation).
    steps = [torch.randint(2, 256, (3, n), generator=generator).to(DEVICE) for n in [1] * 8 + [3]]
    expected, _ = teacher_forced_logits(model, ids, mask, steps)
    counter = AttendCounter(monkeypatch)
    with kvkernels.patched(model, backend=backend, block_size=8 if cuda else 4):  # CUDA: pages of >= 8
        got, cache = teacher_forced_logits(model, ids, mask, steps)
    assert isinstance(cache, PagedCache) and counter.calls == 2 * (1 + len(steps))
    block_size = 8 if cuda else 4
    prompt_blocks = 3 * -(-ids.shape[1] // block_size)            # 3 rows x the blocks of the padded prompt width
    assert cache.pool.num_blocks > prompt_blocks, "the pool should have grown past the blocks of the prompt step"
    assert [cache.pool.seq_len(s) for s in range(3)] == [n + 11 for n in (9, 5, 7)]  # padding never stored
    real = mask.bool()
    for step, (want, have) in enumerate(zip(expected, got)):
        if step == 0:                       # HF's logits at padding positions are meaningless: compare real ones
            want, have = want[real], have[real]
        assert torch.isfinite(have).all()
        torch.testing.assert_close(have.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype],
                                   msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["batch1", "left_padded_batch3"])
def test_greedy_generate_matches_hf(backend, case, monkeypatch):
    model = make_model(n_head=2)            # Triton's CPU interpreter runs one program per sequence and head
    if case == "batch1":
        ids, mask = padded_batch(prompt_lens=(7,))
    else:
        ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    assert len(set(expected[0, -64:].tolist())) > 8, "the reference should not be degenerate"
    counter = AttendCounter(monkeypatch)
    with kvkernels.patched(model, backend=backend):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    assert counter.calls == 2 * 64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_sampling_num_return_sequences_matches_hf_with_same_seed():
    # Equal logits and the same generator give HF's multinomial the same draws: sampling is exact too.
    model = make_model()
    ids, mask = padded_batch(prompt_lens=(6, 4))
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=50, top_p=0.9,
                  repetition_penalty=1.2, num_return_sequences=3)
    torch.manual_seed(5)
    expected = model.generate(ids, **kwargs)
    with kvkernels.patched(model, backend="torch"):
        torch.manual_seed(5)
        got = model.generate(ids, **kwargs)
        torch.manual_seed(5)
        again = model.generate(ids, **kwargs)
    assert got.shape == (6, 26)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_beam_search_matches_hf(monkeypatch):
    model = make_model()
    ids, mask = padded_batch(prompt_lens=(6, 4))
    kwargs = dict(attention_mask=mask, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False)
    expected = model.generate(ids, **kwargs)
    counter = AttendCounter(monkeypatch)
    reorders = []
    original = PagedCache.reorder_cache
    monkeypatch.setattr(PagedCache, "reorder_cache",
                        lambda cache, beam_idx: reorders.append(beam_idx) or original(cache, beam_idx))
    with kvkernels.patched(model, backend="torch"):
        got = model.generate(ids, **kwargs)
    assert counter.calls == 2 * 10 and len(reorders) >= 8
    assert any(not torch.equal(idx.cpu(), torch.arange(6)) for idx in reorders), "beams never moved"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_use_cache_false_is_honoured(monkeypatch):
    model = make_model()
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False)
    counter = AttendCounter(monkeypatch)
    with kvkernels.patched(model):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False)
    assert counter.calls == 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_second_generate_continues_from_returned_cache():
    model = make_model()
    ids, mask = padded_batch()
    extra = torch.randint(2, 256, (3, 3), generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def two_calls():
        first = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True)
        ids2 = torch.cat([first.sequences, extra], dim=1)
        mask2 = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype, device=DEVICE)], dim=1)
        second = model.generate(ids2, attention_mask=mask2, past_key_values=first.past_key_values, max_new_tokens=6)
        return first.past_key_values, second

    expected_cache, expected = two_calls()
    assert isinstance(expected_cache, DynamicCache)
    with kvkernels.patched(model, backend="torch"):
        cache, got = two_calls()
    assert isinstance(cache, PagedCache)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unpatch_restores_exactly_and_patch_is_idempotent():
    model = make_model()
    modules = [model, model.transformer] + [block.attn for block in model.transformer.h]
    before = [dict(m.__dict__) for m in modules]
    kvkernels.patch(model)
    assert model.transformer.forward.__func__ is not type(model.transformer).forward
    once = [dict(m.__dict__) for m in modules]
    assert kvkernels.patch(model, backend="torch") is model
    assert [set(d) for d in once] == [set(m.__dict__) for m in modules]
    assert model.transformer.forward.__func__ is once[1]["forward"].__func__  # not wrapped twice
    assert kvkernels.unpatch(model) is model
    for module, saved in zip(modules, before):
        assert set(module.__dict__) == set(saved)
        assert module.forward.__func__ is type(module).forward
    assert model._prepare_cache_for_generation.__func__ is type(model)._prepare_cache_for_generation
    kvkernels.unpatch(model)                                       # unpatching twice is harmless


def test_a_deep_copy_of_a_patched_model_unpatches_like_the_original():
    import copy

    model = make_model()
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    kvkernels.patch(model)
    twin = copy.deepcopy(model)
    assert torch.equal(twin.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)
    kvkernels.unpatch(twin)
    assert not kvkernels.is_patched(twin) and kvkernels.is_patched(model)
    assert "forward" not in twin.transformer.__dict__ and "_prepare_cache_for_generation" not in twin.__dict__
    assert torch.equal(twin.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_patched_context_manager_keeps_an_existing_patch():
    model = make_model()
    with kvkernels.patched(model) as same:
        assert same is model and is_patched(model)
    assert not is_patched(model)
    kvkernels.patch(model, backend="torch", block_size=8)
    with kvkernels.patched(model, block_size=4):
        assert model.transformer._kvkernels_patch.options.block_size == 4
    assert is_patched(model)
    assert model.transformer._kvkernels_patch.options.block_size == 8


def test_from_pretrained_then_patch(tmp_path):
    model = make_model()
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    model.save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").to(DEVICE).eval()
    kvkernels.patch(loaded, backend="torch")
    torch.testing.assert_close(loaded.generate(ids, attention_mask=mask, max_new_tokens=12), expected, rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [dict(scale_attn_by_inverse_layer_idx=True), dict(reorder_and_upcast_attn=True),
                                       dict(scale_attn_weights=False, initializer_range=0.05)])
def test_attention_scaling_configs(overrides):
    model = make_model(**overrides)
    ids, mask = padded_batch()
    steps = [torch.full((3, 1), t, device=DEVICE) for t in (5, 77, 200)]
    expected, _ = teacher_forced_logits(model, ids, mask, steps)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=16)
    with kvkernels.patched(model, backend="torch"):
        got, _ = teacher_forced_logits(model, ids, mask, steps)
        torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=16), greedy, rtol=0, atol=0)
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], atol=1e-4, rtol=1e-4)
    for have, want in zip(got[1:], expected[1:]):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_cache_dtype_and_pool_freed_after_generate(monkeypatch):
    model = make_model(initializer_range=0.02)
    ids, mask = padded_batch()
    steps = [torch.full((3, 1), t, device=DEVICE) for t in (5, 77, 200)]
    expected, _ = teacher_forced_logits(model, ids, mask, steps)
    caches = []
    original = PagedCache.begin_step

    def recording(cache, *args, **kwargs):
        caches.append(weakref.ref(cache))
        return original(cache, *args, **kwargs)
    monkeypatch.setattr(PagedCache, "begin_step", recording)
    gc.disable()                                    # the pools must be freed by reference counting alone
    try:
        with kvkernels.patched(model, backend="torch", cache_dtype=torch.bfloat16):
            got, cache = teacher_forced_logits(model, ids, mask, steps)
            assert cache.pool.k_pools[0].dtype == torch.bfloat16
            del cache
            model.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert len(caches) == 4 + 4 and all(ref() is None for ref in caches)
    finally:
        gc.enable()
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], atol=2e-2, rtol=2e-2)
    for have, want in zip(got[1:], expected[1:]):
        torch.testing.assert_close(have, want, atol=2e-2, rtol=2e-2)


def test_gpt2_model_without_head():
    model = make_model(model_class=GPT2Model)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        with kvkernels.patched(model, backend="torch"):
            out = model(ids, attention_mask=mask)
    assert isinstance(out.past_key_values, PagedCache)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], expected[real], atol=1e-5, rtol=1e-5)


def test_output_attentions_and_training_fall_back(monkeypatch):
    model = make_model(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, output_attentions=True)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=5, output_attentions=True,
                               return_dict_in_generate=True)
    counter = AttendCounter(monkeypatch)
    with kvkernels.patched(model):
        with torch.no_grad():
            got = model(ids, attention_mask=mask, output_attentions=True)
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, output_attentions=True,
                                   return_dict_in_generate=True)
        model.train()
        trained = model(ids, attention_mask=mask, labels=ids)               # gradients on, training mode
        trained.loss.backward()
        model.eval()
        assert counter.calls == 0
        with pytest.raises(ValueError, match="output_attentions"), torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=PagedCache(model.config), output_attentions=True)
    assert isinstance(got.past_key_values, DynamicCache) and len(got.attentions) == 2
    for have, want in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(have, want, rtol=0, atol=0)
    torch.testing.assert_close(generated.sequences, reference.sequences, rtol=0, atol=0)
    assert model.transformer.wte.weight.grad is not None


def test_bad_inputs_give_clear_errors_and_the_model_stays_usable():
    model = make_model()
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    with pytest.raises(TypeError, match="GPT-2"):
        kvkernels.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        kvkernels.patch(model, backend="tpu")
    with pytest.raises(ValueError, match="block_size"):
        kvkernels.patch(model, block_size=0)
    with pytest.raises(ValueError, match="max_tokens"):
        kvkernels.patch(model, max_tokens=-5)
    with pytest.raises(TypeError, match="cache_dtype"):
        kvkernels.patch(model, cache_dtype=torch.int16)
    with pytest.raises(ValueError, match="cache_dtype"):
        kvkernels.patch(model, cache_dtype="int4")
    assert not is_patched(model)

    kvkernels.patch(model, backend="torch")
    long_prompt = torch.randint(2, 256, (1, 130), device=DEVICE)
    with pytest.raises(ValueError, match="n_positions=128"):
        model.generate(long_prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match="n_positions=128"):
        model.generate(ids, attention_mask=mask, max_new_tokens=125)
    with torch.no_grad(), pytest.raises(ValueError, match="n_positions"):
        model(long_prompt)
    torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=8), expected, rtol=0, atol=0)

    kvkernels.patch(model, backend="torch", max_tokens=32)           # 3 prompts need 9 + 5 + 7 tokens first
    with pytest.raises(kvkernels.CacheFullError, match="max_tokens=32"):
        model.generate(ids, attention_mask=mask, max_new_tokens=8)
    kvkernels.patch(model, backend="torch", max_tokens=3 * 17)
    torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=8), expected, rtol=0, atol=0)
    kvkernels.unpatch(model)
    torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=8), expected, rtol=0, atol=0)


def test_failed_step_is_rolled_back(monkeypatch):
    model = make_model()
    ids, mask = padded_batch()
    steps = [torch.full((3, 1), t, device=DEVICE) for t in (9, 42)]
    expected, _ = teacher_forced_logits(model, ids, mask, steps)
    with kvkernels.patched(model, backend="torch"), torch.no_grad():
        cache = model(ids, attention_mask=mask).past_key_values
        lengths = [cache.pool.seq_len(s) for s in range(3)]

        def failing_mlp(hidden_states):              # layer 0 has already written this step's K/V
            raise RuntimeError("injected failure")
        monkeypatch.setattr(model.transformer.h[1].mlp, "forward", failing_mlp)
        with pytest.raises(RuntimeError, match="injected failure"):
            model(steps[0], attention_mask=torch.cat([mask, torch.ones_like(steps[0])], 1), past_key_values=cache)
        monkeypatch.undo()
        assert [cache.pool.seq_len(s) for s in range(3)] == lengths and cache.get_seq_length() == 9
        for step, chunk in enumerate(steps):
            mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
            out = model(chunk, attention_mask=mask, past_key_values=cache)
            torch.testing.assert_close(out.logits, expected[step + 1], atol=1e-4, rtol=1e-4)


def test_crop_returns_whole_blocks_and_continues_like_hf():
    """HF's crop (assisted decoding): n > 0 keeps n columns, n <= 0 drops -n; left padding is never stored, so
    each sequence drops only its real tokens among the cropped columns."""
    model = make_model()
    ids, mask = padded_batch()                                       # 9 columns; 9, 5, 7 real tokens
    steps = [torch.full((3, 1), t, device=DEVICE) for t in (9, 42, 17, 80, 3, 5)]
    extra = torch.full((3, 2), 33, device=DEVICE)

    def run(cache):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, past_key_values=cache)
            full = mask
            for chunk in steps:
                full = torch.cat([full, torch.ones_like(chunk)], dim=1)
                out = model(chunk, attention_mask=full, past_key_values=out.past_key_values)
            cache = out.past_key_values
            cache.crop(0)                                            # a no-op in every transformers version
            cache.crop(-4)                                           # 15 -> 11 columns
            kept = cache.get_seq_length()
            full = torch.cat([full[:, :kept], torch.ones_like(extra)], dim=1)
            return model(extra, attention_mask=full, past_key_values=cache).logits, cache, kept

    expected, _, kept = run(DynamicCache())
    assert kept == 11
    with kvkernels.patched(model, backend="torch", block_size=4):
        got, cache, _ = run(None)
        pool = cache.pool
        assert [pool.seq_len(s) for s in range(3)] == [9 + 2 + 2, 5 + 2 + 2, 7 + 2 + 2]
        assert pool.allocator.num_in_use == sum(-(-pool.seq_len(s) // 4) for s in range(3))
        cache.crop(9)                                                # keep the prompt columns only
        assert cache.get_seq_length() == 9 and [pool.seq_len(s) for s in range(3)] == [9, 5, 7]
        assert pool.allocator.num_in_use == 3 + 2 + 2                # whole trailing blocks went back
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unmasking_a_column_that_was_padding_is_a_clear_error():
    model = make_model()
    ids, mask = padded_batch()
    with kvkernels.patched(model, backend="torch"), torch.no_grad():
        cache = model(ids, attention_mask=mask).past_key_values
        full = torch.cat([torch.ones_like(mask), torch.ones(3, 1, dtype=mask.dtype, device=DEVICE)], dim=1)
        with pytest.raises(ValueError, match="never stored"):
            model(ids[:, -1:], attention_mask=full, past_key_values=cache)
        assert cache.get_seq_length() == 9                           # the failed call left the cache as it was


def test_every_fallback_is_reported_once(recwarn):
    model = make_model()
    ids, mask = padded_batch()
    kvkernels.patch(model, backend="torch")
    for _ in range(2):
        model(ids, attention_mask=mask)                             # gradients on: HF's path
    messages = [str(w.message) for w in recwarn if "kvkernels" in str(w.message)]
    assert len(messages) == 1 and "gradient" in messages[0]
    kvkernels.unpatch(model)
    recwarn.clear()
    kvkernels.patch(model.transformer, backend="torch")               # only the base: generate makes a DynamicCache
    expected = None
    for _ in range(2):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4)
        expected = got if expected is None else expected
    messages = [str(w.message) for w in recwarn if "kvkernels" in str(w.message)]
    assert len(messages) == 1 and "only model.transformer is patched" in messages[0]
    kvkernels.unpatch(model.transformer)
    torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=4), expected, rtol=0, atol=0)


def test_dropout_in_a_training_block_runs_on_hf_path(monkeypatch):
    model = make_model(attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    model.transformer.h[1].train()                                  # GPT2Model itself stays in eval mode
    ids, mask = padded_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    counter = AttendCounter(monkeypatch)
    with kvkernels.patched(model, backend="torch"), torch.no_grad(), pytest.warns(UserWarning, match="training"):
        torch.manual_seed(0)
        got = model(ids, attention_mask=mask).logits
    assert counter.calls == 0
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_left_padding_positions_match_the_attention_implementation(implementation):
    """A labels= loss over a left-padded batch reads the padding positions: they must be what HF computes."""
    model = make_model(attn_implementation=implementation)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=ids)
        with kvkernels.patched(model, backend="torch"):
            got = model(ids, attention_mask=mask, labels=ids)
    assert isinstance(got.past_key_values, PagedCache)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_cache_layers_show_hf_keys_and_survive_unpatch():
    model = make_model()
    ids, mask = padded_batch()
    chunks = [torch.full((3, n), 7 + n, device=DEVICE) for n in (1, 2, 1)]

    def run(cache, unpatch_after_prompt=False):
        outputs = []
        with torch.no_grad():
            out = model(ids, attention_mask=mask, past_key_values=cache)
            if unpatch_after_prompt:
                keys = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
                kvkernels.unpatch(model)
            full = mask
            for chunk in chunks:
                full = torch.cat([full, torch.ones_like(chunk)], dim=1)
                out = model(chunk, attention_mask=full, past_key_values=out.past_key_values)
                outputs.append(out.logits)
        return outputs, out.past_key_values, keys if unpatch_after_prompt else None

    with torch.no_grad():
        prompt_cache = model(ids, attention_mask=mask, past_key_values=DynamicCache()).past_key_values
    expected, hf_cache, _ = run(DynamicCache())
    kvkernels.patch(model, backend="torch")
    got, cache, keys = run(None, unpatch_after_prompt=True)
    assert isinstance(cache, PagedCache) and cache.get_seq_length() == hf_cache.get_seq_length()
    real = mask.bool()
    for (k, v), layer in zip(keys, prompt_cache.layers):
        assert k.shape == layer.keys.shape                           # [B, H, seen, D], HF's padded layout
        torch.testing.assert_close(k.transpose(1, 2)[real], layer.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v.transpose(1, 2)[real], layer.values.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        assert (k.transpose(1, 2)[~real] == 0).all()                  # padding is never stored
    for have, want in zip(got, expected):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_compiled_forward_generates_on_hf_cache_and_says_so(cache_implementation, recwarn):
    """HF's test_generate_compile_model_forward_fullgraph: a fullgraph-compiled forward must trace (HF's own cache,
    reported once), not fail inside dynamo on the paged cache."""
    model = make_model()
    ids, _ = padded_batch(prompt_lens=(6,))
    expected = model.generate(ids, max_new_tokens=8, cache_implementation=cache_implementation)
    with kvkernels.patched(model, backend="torch"):
        model.forward = torch.compile(model.forward, fullgraph=True, backend="eager")
        try:
            got = model.generate(ids, max_new_tokens=8, cache_implementation=cache_implementation)
        finally:
            del model.forward
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    messages = [str(w.message) for w in recwarn if "kvkernels" in str(w.message)]
    assert len(messages) == 1 and ("compiled" in messages[0] or "cache_implementation" in messages[0])
