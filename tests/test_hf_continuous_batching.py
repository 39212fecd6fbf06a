"""HF's continuous batching (generate_batch and its manager) on a model loaded with attn_implementation="kvkernels":
decode batches run kvkernels' decode kernel over HF's own pages, and every request's tokens are identical to HF's own
paged path (the same model with sdpa). transformers 5.23 and later accept no registered function for continuous
batching; there these tests check that HF says so and that a patched model still batches as HF does."""
import functools

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import helpers
import kvkernels
from conftest import DEVICE
from kvkernels.hf import continuous_batching

make_decoder = functools.partial(helpers.make_decoder, device=DEVICE)
PROMPTS = [list(range(5, 22)), [3, 4, 5], list(range(30, 70))]   # longer than the 6-token windows
CONFIG = dict(do_sample=False, eos_token_id=-1, pad_token_id=0)


def small_pool():
    """On a CPU, HF sizes its page pool to 80% of the machine's RAM and touches it all: one such pool per test worker
    crashed CI's workers. 16-token pages also give the long prompt block tables of several pages."""
    return ContinuousBatchingConfig(block_size=16, num_blocks=32, max_batch_tokens=128)


def accepts_kvkernels(model):
    """Whether this transformers runs continuous batching on a registered attention function (<= 5.22)."""
    try:
        model.generate_batch([[3, 4]], generation_config=GenerationConfig(max_new_tokens=1, **CONFIG),
                            continuous_batching_config=small_pool())
    except ValueError as err:
        assert "not supported for continuous batching" in str(err)
        return False
    return True


class KernelCalls:
    def __init__(self, monkeypatch):
        self.batches, self.pages_per_sequence = [], []
        original = continuous_batching.paged_decode_attention

        def counting(query, k_pages, v_pages, block_tables, *args, **kwargs):
            self.batches.append(query.shape[0])
            self.pages_per_sequence.append(block_tables.shape[1])
            return original(query, k_pages, v_pages, block_tables, *args, **kwargs)
        monkeypatch.setattr(continuous_batching, "paged_decode_attention", counting)


def batched(model, max_new_tokens=12):
    out = model.generate_batch(PROMPTS, generation_config=GenerationConfig(max_new_tokens=max_new_tokens, **CONFIG),
                               continuous_batching_config=small_pool())
    return [out[key].generated_tokens for key in sorted(out, key=lambda k: int(k.split("_")[-1]))]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])   # GQA 8/1; full + sliding layers; MHA
def test_generate_batch_runs_the_decode_kernel_on_hfs_pages(family, monkeypatch):
    model = make_decoder(family, attn_implementation="kvkernels")
    if not accepts_kvkernels(model):
        pytest.skip("this transformers runs continuous batching on paged|eager, sdpa and flash only")
    expected = batched(make_decoder(family, attn_implementation="sdpa"))
    calls = KernelCalls(monkeypatch)
    got = batched(model)
    assert got == expected
    assert len({tuple(tokens) for tokens in got}) == 3 and all(len(tokens) == 12 for tokens in got)
    full_layers = 1 if family == "qwen2" else 2
    assert calls.batches and max(calls.batches) == 3 and len(calls.batches) % full_layers == 0
    assert max(calls.pages_per_sequence) >= 3                                  # 40 + 12 tokens in 16-token pages
    assert model.config._attn_implementation == "kvkernels"                  # HF switched it back after the batch


def test_requests_joining_and_leaving_mid_flight(monkeypatch):
    """A long request starts alone; two more join once it has streamed tokens and leave before it ends."""
    def serve(model):
        manager = model.init_continuous_batching(generation_config=GenerationConfig(max_new_tokens=24, **CONFIG),
                                                 continuous_batching_config=small_pool())
        manager.start()
        try:
            manager.add_request(PROMPTS[2], request_id="long", max_new_tokens=24, streaming=True)
            first = manager.get_result(request_id="long", timeout=60)
            assert first is not None and 0 < len(first.generated_tokens) < 24
            manager.add_request(PROMPTS[0], request_id="short", max_new_tokens=4)
            manager.add_request(PROMPTS[1], request_id="middle", max_new_tokens=9)
            results = {}
            while len(results) < 3:
                result = manager.get_result(timeout=60)
                assert result is not None, "the manager stopped producing results"
                if result.is_finished():
                    results[result.request_id] = result.generated_tokens
            return results
        finally:
            manager.stop(block=True, timeout=30)

    model = make_decoder("llama", attn_implementation="kvkernels")
    if not accepts_kvkernels(model):
        pytest.skip("this transformers runs continuous batching on paged|eager, sdpa and flash only")
    expected = serve(make_decoder("llama", attn_implementation="sdpa"))
    calls = KernelCalls(monkeypatch)
    got = serve(model)
    assert got == expected and {k: len(v) for k, v in got.items()} == {"long": 24, "short": 4, "middle": 9}
    assert 1 in calls.batches and max(calls.batches) > 1                     # alone, then joined


def test_patched_model_batches_as_hf_does():
    """generate_batch hands HF's own paged cache through the patched forward untouched (on 5.17 it arrives as a
    `cache` keyword, which patch once took for the newer name of past_key_values and broke the batch)."""
    expected = batched(make_decoder("llama", attn_implementation="sdpa"), max_new_tokens=6)
    model = kvkernels.patch(make_decoder("llama", attn_implementation="sdpa"))
    assert batched(model, max_new_tokens=6) == expected


def test_load_time_model_on_a_transformers_without_registered_cb_functions_says_so():
    model = make_decoder("llama", attn_implementation="kvkernels")
    if accepts_kvkernels(model):
        pytest.skip("this transformers runs continuous batching on kvkernels (the tests above)")
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        batched(model, max_new_tokens=2)


def test_the_cb_function_outside_continuous_batching_names_the_right_implementation():
    model = make_decoder("llama")
    query = torch.randn(1, 8, 1, 64)
    with pytest.raises(ValueError, match="attn_implementation='kvkernels'"):
        continuous_batching.continuous_batching_attention(model.model.layers[0].self_attn, query, query[:, :1],
                                                          query[:, :1], None)
