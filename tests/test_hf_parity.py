"""One case list, run on an unpatched and a kvkernels-patched GPT-2: tokens identical, floats within 1e-4 (fp32).

Each case is a function of (model, assistant) returning a dict of tensors (or nested lists/tuples of them). The
patched run must also have used the paged cache where the case says it should (counted layer calls).
"""
import functools
import inspect

import pytest
import torch
from transformers import DynamicCache

import helpers
import kvkernels
from conftest import DEVICE
from kvkernels.hf import PagedCache

padded_batch = functools.partial(helpers.padded_batch, device=DEVICE)


def make_model(seed=0, **overrides):
    """Tiny GPT-2 with an untied lm_head scaled 3x: greedy choices far from ties."""
    model = helpers.make_gpt2(seed=seed, device=DEVICE, n_head=2, tie_word_embeddings=False, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


def _generate_dict(model, **kwargs):
    ids, mask = padded_batch(prompt_lens=kwargs.pop("prompt_lens", (9, 5, 7)))
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    fields = {"sequences": out.sequences}
    for name in ("scores", "logits", "hidden_states", "sequences_scores", "beam_indices"):
        if getattr(out, name, None) is not None:
            fields[name] = getattr(out, name)
    return fields


def greedy(model, assistant):
    return _generate_dict(model, max_new_tokens=24, output_scores=True, output_logits=True)


def greedy_hidden_states(model, assistant):
    return _generate_dict(model, max_new_tokens=6, output_hidden_states=True)


def sample_default_processors(model, assistant):
    # do_sample with the generation_config defaults: top_k=50 included.
    torch.manual_seed(3)
    return _generate_dict(model, max_new_tokens=16, do_sample=True, output_scores=True)


def sample_every_processor(model, assistant):
    torch.manual_seed(4)
    return _generate_dict(model, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                          repetition_penalty=1.3, num_return_sequences=2, output_scores=True)


def beams(model, assistant):
    return _generate_dict(model, max_new_tokens=8, num_beams=3, num_return_sequences=2, output_scores=True)


def streamer(model, assistant):
    ids, _ = padded_batch(prompt_lens=(6,))
    recorder = RecordingStreamer()
    sequences = model.generate(ids, max_new_tokens=10, streamer=recorder)
    assert recorder.ends == 1
    return {"sequences": sequences, "puts": recorder.puts}


def continuation(model, assistant):
    ids, mask = padded_batch()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True)
    extra = torch.randint(2, 256, (3, 3), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ids2 = torch.cat([first.sequences, extra], dim=1)
    mask2 = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype, device=DEVICE)], dim=1)
    return {"sequences": model.generate(ids2, attention_mask=mask2, past_key_values=first.past_key_values,
                                        max_new_tokens=6)}


def assisted(model, assistant):
    return _generate_dict(model, prompt_lens=(9,), max_new_tokens=20, assistant_model=assistant)


def assisted_sample(model, assistant):
    torch.manual_seed(5)
    return _generate_dict(model, prompt_lens=(9,), max_new_tokens=12, assistant_model=assistant, do_sample=True)


def prompt_lookup(model, assistant):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6]], device=DEVICE)
    return {"sequences": model.generate(ids, max_new_tokens=16, prompt_lookup_num_tokens=3)}


def manual_loop_changing_masks(model, assistant):
    """A hand-written decode loop that hides an earlier token, then a new padding column, then a 2-token step."""
    ids, mask = padded_batch()
    cache = None if kvkernels.hf.is_patched(model) else DynamicCache()
    logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[mask.bool()])
        for step, (width, hide) in enumerate([(1, (0, 2)), (1, None), (2, (1, 6)), (1, None)]):
            tokens = torch.randint(2, 256, (3, width), generator=torch.Generator().manual_seed(step)).to(DEVICE)
            new = torch.ones_like(tokens)
            if step == 1:
                new[2, 0] = 0                       # a padding column in the middle of sequence 2
            mask = torch.cat([mask, new], dim=1)
            if hide is not None:
                mask[hide] = 0                      # hide a token that is already cached
            out = model(tokens, attention_mask=mask, past_key_values=out.past_key_values)
            logits.append(out.logits[new.bool()])
    return {"logits": logits}


def forward_all_positions(model, assistant):
    """Every position of a left-padded batch, padding included: logits, hidden states and a labels= loss."""
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    return {"loss": out.loss, "logits": out.logits, "hidden_states": out.hidden_states}


def _input_gradient(model, backend):
    """Saliency with frozen weights: the gradient of one logit with respect to the input embeddings."""
    ids, _ = padded_batch(prompt_lens=(7,))
    if kvkernels.hf.is_patched(model):
        kvkernels.patch(model, backend=backend)       # options only; the test unpatches afterwards
    model.requires_grad_(False)
    try:
        embeds = model.transformer.wte(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits[0, -1, 7].backward()
    finally:
        model.requires_grad_(True)
    return {"grad": embeds.grad}


def gradient_frozen_weights_torch(model, assistant):
    return _input_gradient(model, "torch")


def gradient_frozen_weights_triton(model, assistant):
    return _input_gradient(model, "triton")


def signature(model, assistant):
    modules = [model, model.transformer, model.transformer.h[0], model.transformer.h[0].attn]
    return {"signatures": [str(inspect.signature(m.forward)) for m in modules],
            "prepare": str(inspect.signature(model._prepare_cache_for_generation))}


# name -> (case, which models are patched in the patched run, whether the paged cache must serve some layer call)
CASES = {
    "greedy": (greedy, "main", True),
    "greedy_hidden_states": (greedy_hidden_states, "main", True),
    "sample_default_processors": (sample_default_processors, "main", True),
    "sample_every_processor": (sample_every_processor, "main", True),
    "beams": (beams, "main", True),
    "streamer": (streamer, "main", True),
    "continuation": (continuation, "main", True),
    "assisted_main_patched": (assisted, "main", True),
    "assisted_assistant_patched": (assisted, "assistant", True),
    "assisted_both_patched": (assisted, "both", True),
    "assisted_sample_both_patched": (assisted_sample, "both", True),
    "prompt_lookup": (prompt_lookup, "main", True),
    "manual_loop_changing_masks": (manual_loop_changing_masks, "main", True),
    "forward_all_positions": (forward_all_positions, "main", True),
    "gradient_frozen_weights_torch": (gradient_frozen_weights_torch, "main", False),
    "gradient_frozen_weights_triton": (gradient_frozen_weights_triton, "main", False),
    "signature": (signature, "main", False),
}


def assert_same(have, want, path="out"):
    if isinstance(want, dict):
        assert set(have) == set(want), f"{path}: fields {sorted(have)} != {sorted(want)}"
        for key in want:
            assert_same(have[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(have) == len(want), f"{path}: {len(have)} items != {len(want)}"
        for i, (h, w) in enumerate(zip(have, want)):
            assert_same(h, w, f"{path}[{i}]")
    elif isinstance(want, torch.Tensor) and want.is_floating_point():
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{path}: {m}")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(have, want, atol=0, rtol=0, msg=lambda m: f"{path}: {m}")
    else:
        assert have == want, f"{path}: {have!r} != {want!r}"


@pytest.fixture(scope="module")
def models():
    return make_model(seed=0, n_layer=3), make_model(seed=1)


@pytest.mark.parametrize("name", list(CASES))
def test_patched_model_is_hf(name, models, monkeypatch):
    case, patched_which, uses_paged = CASES[name]
    model, assistant = models
    expected = case(model, assistant)
    calls = []
    original = PagedCache.attend
    monkeypatch.setattr(PagedCache, "attend", lambda cache, *a, **k: calls.append(1) or original(cache, *a, **k))
    targets = {"main": [model], "assistant": [assistant], "both": [model, assistant]}[patched_which]
    for target in targets:
        kvkernels.patch(target, backend="torch")
    try:
        got = case(model, assistant)
    finally:
        for target in targets:
            kvkernels.unpatch(target)
    assert (len(calls) > 0) == uses_paged, f"paged attention served {len(calls)} layer calls"
    assert_same(got, expected)
