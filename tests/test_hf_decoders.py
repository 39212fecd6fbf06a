"""kvkernels.patch on every decoder family through one mechanism: Llama, Mistral, Qwen2, Qwen3, Phi3 and GPT-2,
exact against unpatched HF eager (tiny random fp32 models, see helpers.DECODERS)."""
import functools
import inspect

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import helpers
import kvkernels
from conftest import DEVICE, kernel_backends
from kvkernels.hf import PagedCache

FAMILIES = list(helpers.DECODERS)
make_decoder = functools.partial(helpers.make_decoder, device=DEVICE)
# Ragged, left-padded; the longest prompt is longer than the 6-column windows of Mistral and Qwen2.
padded_batch = functools.partial(helpers.padded_batch, prompt_lens=(11, 4, 8), device=DEVICE)


class Recorder:
    """Records what the paged cache served: the layers' calls and the windows they asked for."""

    def __init__(self, monkeypatch):
        self.windows = []
        original = PagedCache.attend

        def recording(cache, *args, **kwargs):
            self.windows.append(kwargs.get("window"))
            return original(cache, *args, **kwargs)
        monkeypatch.setattr(PagedCache, "attend", recording)


class TokenStreamer(BaseStreamer):
    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens.append(value.clone())

    def end(self):
        pass


def expected_windows(family):
    """The window each layer asks for, per forward: None for full attention."""
    spec = helpers.DECODERS[family]
    if family == "mistral":
        return [spec["sliding_window"]] * 2
    if family == "qwen2":
        return [None, spec["sliding_window"]]   # max_window_layers=1: layer 0 full, layer 1 windowed
    return [None, None]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_64_tokens_matches_hf_eager(family, monkeypatch):
    model = make_decoder(family)
    ids, mask = padded_batch()
    streamed = TokenStreamer()
    kwargs = dict(attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    expected = model.generate(ids, **kwargs)
    recorder = Recorder(monkeypatch)
    with kvkernels.patched(model, backend="torch", block_size=4):
        got = model.generate(ids, streamer=streamed, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(set(expected[:, ids.shape[1]:].flatten().tolist())) > 4, "the tiny model should not just repeat"
    assert recorder.windows == expected_windows(family) * 64          # every step served from the pool
    # HF hands streamers CPU tensors
    torch.testing.assert_close(torch.stack(streamed.tokens[1:], dim=-1), got[:, ids.shape[1]:].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_and_beams_match_hf(family):
    """Seeded sampling from an unsharpened head (broad distributions: many tokens possible at each step), then beams."""
    ids, mask = padded_batch()
    modes = [(make_decoder(family, sharpen=1.0), dict(do_sample=True, top_k=40, temperature=0.8,
                                                        num_return_sequences=2)),
             (make_decoder(family), dict(num_beams=3, num_return_sequences=2, do_sample=False))]
    for model, mode in modes:
        torch.manual_seed(7)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, **mode)
        with kvkernels.patched(model, backend="torch"):
            torch.manual_seed(7)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=12, **mode)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{family} {mode}")


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_logits_match_hf_eager(family, backend, monkeypatch):
    """Prompt, then single-token decode steps past the window, then a 3-token step over the paged past."""
    model = make_decoder(family)
    ids, mask = padded_batch()
    generator = torch.Generator().manual_seed(2)
    steps = [torch.randint(2, 256, (3, n), generator=generator).to(DEVICE) for n in (1, 1, 1, 3)]

    def run(cache):
        logits, attention_mask = [], mask
        with torch.no_grad():
            out = model(ids, attention_mask=attention_mask, past_key_values=cache)
            logits.append(out.logits)
            for chunk in steps:
                attention_mask = torch.cat([attention_mask, torch.ones_like(chunk)], dim=1)
                out = model(chunk, attention_mask=attention_mask, past_key_values=out.past_key_values)
                logits.append(out.logits)
        return logits, out.past_key_values

    expected, _ = run(DynamicCache())
    recorder = Recorder(monkeypatch)
    with kvkernels.patched(model, backend=backend, block_size=8 if backend == "cuda" else 4):  # CUDA: pages >= 8
        got, cache = run(None)
    assert isinstance(cache, PagedCache) and len(recorder.windows) == 2 * (1 + len(steps))
    assert [cache.pool.seq_len(s) for s in range(3)] == [n + 6 for n in (11, 4, 8)]    # padding never stored
    real = mask.bool()
    torch.testing.assert_close(got[0][real], expected[0][real], atol=1e-4, rtol=1e-4)
    for have, want in zip(got[1:], expected[1:]):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_second_generate_continues_from_returned_cache():
    model = make_decoder("mistral")
    ids, mask = padded_batch()

    def two_calls():
        first = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               return_dict_in_generate=True)
        follow = torch.full((3, 2), 9, device=DEVICE)
        ids2 = torch.cat([first.sequences, follow], dim=1)
        mask2 = torch.cat([mask, torch.ones(3, ids2.shape[1] - mask.shape[1], dtype=mask.dtype, device=DEVICE)], 1)
        second = model.generate(ids2, attention_mask=mask2, past_key_values=first.past_key_values, max_new_tokens=8,
                                do_sample=False)
        return first.past_key_values, second

    _, expected = two_calls()
    with kvkernels.patched(model, backend="torch"):
        cache, got = two_calls()
    assert isinstance(cache, PagedCache)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rotary_model_generates_past_max_position_embeddings():
    """Rotary positions have no table: HF runs past max_position_embeddings, and so must the paged cache."""
    model = make_decoder("llama", max_position_embeddings=16)
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    with kvkernels.patched(model, backend="torch", block_size=4):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_patched_forward_keeps_the_signature():
    model = make_decoder("qwen3")
    before = inspect.signature(model.model.forward)
    with kvkernels.patched(model):
        assert model.model.forward.__func__ is not type(model.model).forward
        assert inspect.signature(model.model.forward) == before
        assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))


def test_models_it_cannot_serve_say_what_is_missing():
    from transformers import BloomConfig, BloomForCausalLM, Gemma2Config, Gemma2ForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="_supports_attention_backend"):
        kvkernels.patch(bloom)
    with pytest.raises(TypeError, match="GPT-2, Llama"):
        kvkernels.patch(torch.nn.Linear(2, 2))
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           attn_logit_softcapping=50.0)).eval()
    ids = torch.randint(2, 64, (1, 5))
    with kvkernels.patched(gemma, backend="torch"), torch.no_grad():
        with pytest.raises(NotImplementedError, match="soft-capping"):
            gemma(ids)


def test_a_head_that_calls_the_decoder_stack_past_its_base_model_is_served(monkeypatch):
    """OPTForCausalLM calls OPTModel.decoder directly, past OPTModel.forward, where patch hooked: generate got a
    PagedCache, but no forward was served and every layer ran HF's attention on the cache's fallback, silently."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                                     pad_token_id=0)).to(DEVICE).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)         # tied to the embeddings: sharpened logits, greedy far from ties
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    recorder = Recorder(monkeypatch)
    with kvkernels.patched(model, backend="torch"):
        assert kvkernels.is_patched(model) and kvkernels.is_patched(model.model)
        torch.testing.assert_close(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False),
                                   expected, rtol=0, atol=0)
    assert len(recorder.windows) == 2 * 8                             # 2 layers x (prefill + 7 decode steps)
    assert not kvkernels.is_patched(model) and "forward" not in model.model.decoder.__dict__
    got = kvkernels.generate(model, ids, mask, max_new_tokens=8, do_sample=False, backend="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_attention_called_twice_per_layer_is_refused():
    """DiffLlama's differential attention calls the attention function twice per layer (the same keys, each half of
    the values): both calls wrote their values into the same slots, the pages kept the second half, and patch and
    generate gave other tokens than HF, silently."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("diffllama", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(2, 64, (1, 5))
    with kvkernels.patched(model, backend="torch"):
        with pytest.raises(NotImplementedError, match="more than once per forward"):
            model.generate(ids, max_new_tokens=4, do_sample=False)
    with pytest.raises(NotImplementedError, match="more than once per forward"):
        kvkernels.generate(model, ids, max_new_tokens=4, backend="torch")
    assert not kvkernels.is_patched(model)
    model.generate(ids, max_new_tokens=4, do_sample=False)          # HF's own attention after the refusals


# Decoders whose attention goes through the registry but whose cache holds more than softmax attention's K/V, or
# whose attention the paged kernels do not mask: generate ran them on the paged cache and silently diverged from HF
# (MiniMax, GraniteMoeHybrid), or failed deep inside transformers (LFM2), or on a shape check (DeepSeek's MLA: keys
# 24 wide, values 16); Llama4's chunked attention, which the paged kernels do not mask, was patched (and fell back to
# HF with a misleading warning) and refused by generate for a wrong reason.
CANNOT_SERVE = {
    "minimax": (dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1), "cache of its own"),
    # transformers 5.25 lists their recurrent layers as linear_attention in config.layer_types
    "recurrent_gemma": (dict(head_dim=16, block_types=["recurrent", "attention"], attention_window_size=8),
                        "recurrent state|linear_attention layers"),
    "granitemoehybrid": (dict(head_dim=16, layer_types=["attention", "mamba"], mamba_d_state=8, mamba_n_heads=4,
                              mamba_d_head=32), "recurrent state|linear_attention layers"),
    "lfm2": (dict(head_dim=16, layer_types=["full_attention", "conv"]), "conv layers"),
    "llama4_text": (dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=64,
                         attention_chunk_size=8, no_rope_layers=[1, 0]), "chunked_attention layers"),
    "deepseek_v3": (dict(n_routed_experts=2, num_experts_per_tok=1, qk_nope_head_dim=16, qk_rope_head_dim=8,
                         v_head_dim=16, kv_lora_rank=16, q_lora_rank=None), "latent attention"),
    # equal key and value widths (16), but not the config's head_dim (its rotary part, 8), which sizes the pages
    "glm4_moe_lite": (dict(n_routed_experts=2, num_experts_per_tok=1, qk_nope_head_dim=8, qk_rope_head_dim=8,
                           v_head_dim=16, kv_lora_rank=16, q_lora_rank=None), "latent attention"),
}


@pytest.mark.parametrize("family", sorted(CANNOT_SERVE))
def test_decoders_with_other_caches_are_refused_by_patch_and_generate(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, message = CANNOT_SERVE[family]
    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(TypeError, match=message):
        kvkernels.patch(model)
    with pytest.raises(TypeError, match=message):
        kvkernels.patch(model.base_model)
    with pytest.raises(TypeError, match=message):
        kvkernels.generate(model, torch.randint(2, 64, (1, 5)), max_new_tokens=4)
    assert not kvkernels.is_patched(model)


@pytest.mark.parametrize("backend", kernel_backends())
def test_sliding_window_decode_reads_only_the_window(backend):
    """Mistral (every layer windowed): after the prompt, every stored token that the next queries' windows leave out
    is overwritten with NaN; the decode steps' logits still match HF, so the kernel never read them."""
    model = make_decoder("mistral")
    window = helpers.DECODERS["mistral"]["sliding_window"]
    ids, mask = padded_batch()
    steps = [torch.tensor([[5], [6], [7]], device=DEVICE), torch.tensor([[8], [9], [10]], device=DEVICE)]

    def run(cache, poison=False):
        attention_mask, logits = mask, []
        with torch.no_grad():
            out = model(ids, attention_mask=attention_mask, past_key_values=cache)
            if poison:
                pool = out.past_key_values.pool
                for seq in range(3):
                    slots = out.past_key_values._slots_of(pool, [seq], [max(pool.seq_len(seq) - window + 1, 0)])
                    for pages in pool.k_pools + pool.v_pools:
                        pages.view(-1, *pages.shape[2:])[slots] = float("nan")
            for token in steps:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
                out = model(token, attention_mask=attention_mask, past_key_values=out.past_key_values)
                logits.append(out.logits)
        return torch.cat(logits, dim=1)

    expected = run(DynamicCache())
    with kvkernels.patched(model, backend=backend, block_size=2):
        got = run(None, poison=True)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])   # GPT-2's fused step: test_generation
def test_kvkernels_generate_matches_hf(family):
    """kvkernels.generate's own loop, identical to model.generate (prompts longer than the Mistral / Qwen2 windows):
    greedy on the Triton kernels, and greedy with a repetition penalty over 24 tokens on the reference. (Its sampler
    draws differently from HF's by design; see the README.)"""
    model = make_decoder(family)
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    got = kvkernels.generate(model, ids, mask, max_new_tokens=8, do_sample=False, backend="triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    penalised = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.3)
    expected = model.generate(ids, attention_mask=mask, **penalised)
    got = kvkernels.generate(model, ids, mask, backend="torch", **penalised)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_kvkernels_generate_on_masks_with_masked_columns_inside_a_prompt(family):
    """A 0 after a prompt's first real column: HF's sliding window counts columns, masked ones too, where the decode
    step counted stored tokens, so Mistral's and Qwen2's windows (6 columns) took other tokens than HF's: refused
    where the window binds. Without a window (Llama), or one the columns never fill, masked columns are exact."""
    model = make_decoder(family)
    ids, mask = padded_batch()
    mask[0, 2:5] = 0                                                # three masked columns inside an 11-token prompt
    if family == "llama":
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = kvkernels.generate(model, ids, mask, max_new_tokens=12, do_sample=False, backend="torch")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="sliding window"):
            kvkernels.generate(model, ids, mask, max_new_tokens=12, do_sample=False, backend="torch")
        # A window the 11 prompt columns and 5 new tokens never fill does not bind: exact.
        model = make_decoder(family, sliding_window=16)
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = kvkernels.generate(model, ids, mask, max_new_tokens=6, do_sample=False, backend="torch")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_attn_implementation_kvkernels_at_load_time(family, monkeypatch):
    """from_config(..., attn_implementation="kvkernels") without patch: a plain forward is HF's SDPA (exact, and the
    model stays unpatched); generate then patches it and runs every step on the paged pool, identical to eager."""
    eager = make_decoder(family)
    model = make_decoder(family, attn_implementation="kvkernels")
    sdpa = make_decoder(family, attn_implementation="sdpa")
    ids, mask = padded_batch()
    with torch.no_grad():
        forward = model(ids, attention_mask=mask).logits
        expected_forward = sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(forward[real], expected_forward[real], atol=1e-5, rtol=1e-5)
    assert not kvkernels.is_patched(model)

    kwargs = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    expected = eager.generate(ids, **kwargs)
    recorder = Recorder(monkeypatch)
    got = model.generate(ids, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert kvkernels.is_patched(model) and recorder.windows == expected_windows(family) * 20
    assert model.config._attn_implementation == "kvkernels"                  # restored after every patched forward
    kvkernels.unpatch(model)
    model.set_attn_implementation("sdpa")                                    # the way out: generate stays HF's
    torch.testing.assert_close(model.generate(ids, **kwargs), expected, rtol=0, atol=0)
    assert not kvkernels.is_patched(model) and recorder.windows == expected_windows(family) * 20


def test_models_loaded_otherwise_are_untouched_by_the_load_time_hook():
    model = make_decoder("qwen3")
    ids, mask = padded_batch()
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert not kvkernels.is_patched(model)


@pytest.mark.parametrize("block_size", [2, 4])
def test_windowed_generate_keeps_only_the_window_pages(block_size):
    """Mistral windows every layer (6 tokens): kvkernels.generate keeps a ring of the pages the window spans per
    sequence, reused as the context grows past it, and stays identical to HF over 64 tokens."""
    model = make_decoder("mistral")
    ids, mask = padded_batch()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    for backend in kernel_backends():
        got = kvkernels.generate(model, ids, mask, max_new_tokens=64, do_sample=False, backend=backend,
                                 block_size=block_size)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        pool = model.__dict__["_kvkernels_generate_session"].pool
        ring = -(-(helpers.DECODERS["mistral"]["sliding_window"] + 2) // block_size)   # + graph warm-up's 2
        assert pool.num_blocks == 3 * ring < 3 * -(-(11 + 64) // block_size)
        assert pool.block_tables[0, ring].item() == pool.block_tables[0, 0].item()


def test_shared_window_reads_the_config_as_transformers_does():
    from kvkernels.hf.cache import shared_window
    assert shared_window(make_decoder("mistral").config) == 6
    assert shared_window(make_decoder("qwen2").config) is None                       # layer 0 is full attention
    assert shared_window(make_decoder("qwen2", max_window_layers=0).config) == 6
    assert shared_window(make_decoder("phi3", sliding_window=5).config) == 5
    assert shared_window(make_decoder("llama").config) is None
    generated = kvkernels.generate(make_decoder("qwen2"), *padded_batch(), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 11 + 4


def test_a_layer_asking_beyond_the_ring_fails_instead_of_reading_overwritten_pages(monkeypatch):
    import kvkernels.generation
    monkeypatch.setattr(kvkernels.generation, "shared_window", lambda config: 2)    # the model's layers ask for 6
    with pytest.raises(RuntimeError, match="attends 6 tokens but the pool keeps rings for a window of 2"):
        kvkernels.generate(make_decoder("mistral"), *padded_batch(), max_new_tokens=4, do_sample=False,
                           block_size=2)


def test_load_time_attention_refuses_what_the_kernels_do_not_implement():
    """A model loaded with attn_implementation="kvkernels" whose attention soft-caps its logits (Gemma2) is refused
    on a plain forward too, as patched forwards are (5.17's SDPA would drop the soft-capping silently)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0)
    gemma = Gemma2ForCausalLM._from_config(config, attn_implementation="kvkernels").eval()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="kvkernels' attention does not implement attention "
                                                                    "logit soft-capping"):
        gemma(torch.randint(2, 64, (1, 5)))
