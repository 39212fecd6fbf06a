"""GPT-2 and Llama-family models with random weights, and the generation modes that bench.generate and bench.seeds
compare.

A mode is a context manager: entering it prepares the model (patching, a persistent batching manager),
the value it yields generates `new_tokens` tokens for a prompt batch, and leaving it restores the model.
    with MODES["hf_dynamic"](model) as generate:
        new_tokens = generate(prompt, 500)          # LongTensor [B, 500] on the CPU
"""
import contextlib
import functools
import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.streamers import BaseStreamer

from .common import synchronize

# GPT2Config equivalents of the Hub checkpoints (vocab 50257, 1024 positions); "tiny" is for --quick.
GPT2_SHAPES = {
    "distilgpt2": {"n_layer": 6, "n_head": 12, "n_embd": 768},
    "124M": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "355M": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "n_positions": 256, "bos_token_id": 1,
             "eos_token_id": 1},
}
HUB_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "distilgpt2": "distilgpt2"}
# Rotary grouped-query decoders, (model_type, config) after the Hub checkpoints' shapes; "llama-tiny" is for --quick.
DECODER_SHAPES = {
    "llama-1B": ("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=4096,
                               tie_word_embeddings=True)),                     # Llama 3.2 1B: 4 query heads per KV
    "qwen2.5-0.5B": ("qwen2", dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=4096, tie_word_embeddings=True)),   # 7 per KV head
    "llama-tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, bos_token_id=1,
                                 eos_token_id=1)),
}


def model_title(name: str) -> str:
    """How tables and plots name a model: its shape name, after "GPT-2" for the GPT-2 shapes and checkpoints."""
    return name if name in DECODER_SHAPES else f"GPT-2 {name}"


def build_model(name: str, dtype, device, *, seed: int = 0):
    """A GPT-2 or a DECODER_SHAPES decoder of a named shape with random weights, or a local GPT-2 checkpoint."""
    if os.path.isdir(name):
        model = GPT2LMHeadModel.from_pretrained(name, dtype=dtype).to(device)
    elif name in DECODER_SHAPES:
        model_type, shape = DECODER_SHAPES[name]
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape))
        model = model.to(dtype)
    else:
        shape = GPT2_SHAPES[HUB_NAMES.get(name, name)]
        torch.manual_seed(seed)
        with torch.device(device):
            model = GPT2LMHeadModel(GPT2Config(**shape))
        model = model.to(dtype)
    # Random weights may emit the EOS id at any step: never stop early, so every mode and every
    # repeat generates exactly the requested number of tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class Prompt:
    ids: torch.Tensor           # int64 [B, P] random token ids (never all one id)
    attention_mask: torch.Tensor


def random_prompt(batch: int, length: int, vocab_size: int, device, *, seed: int = 0) -> Prompt:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (batch, length), generator=generator).to(device)
    return Prompt(ids, torch.ones_like(ids))


class TokenClock(BaseStreamer):
    """An HF streamer that timestamps every token it receives, after draining the device.

    The synchronisation it adds per token is the cost of measuring: HF's own loop already syncs
    once per step (its stopping check), kvkernels.generate's CUDA-graph loop otherwise would not.
    """

    SYNCED = "streamer, device synchronised at every token"

    def __init__(self, device):
        self.device = device
        self.stamps = []
        self.source = self.SYNCED      # a mode that fills `stamps` another way says how

    def put(self, value):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


# Puts closer together than this arrived in one burst: kvkernels.generate hands the streamer its tokens
# every EOS_CHECK_EVERY (16) steps on CUDA, where a decode step alone takes far longer than this.
BURST_GAP_S = 100e-6


def token_gaps_ms(stamps, new_tokens: int) -> list:
    """[new_tokens - 1] ms from each generated token to the next, None where the stream cannot tell.

    The last `new_tokens` stamps are the tokens (HF streamers also receive the prompt first). A burst of
    tokens shares its time evenly; the first burst also holds the prefill, so its gaps are unknown (None).
    """
    if len(stamps) < new_tokens:
        raise RuntimeError(f"the streamer saw {len(stamps)} puts for {new_tokens} new tokens")
    stamps = list(stamps[-new_tokens:])
    starts = [0] + [i for i in range(1, new_tokens) if stamps[i] - stamps[i - 1] >= BURST_GAP_S] + [new_tokens]
    gaps = [None] * (starts[1] - 1)
    for first, end in zip(starts[1:], starts[2:]):
        share = (stamps[end - 1] - stamps[first - 1]) * 1e3 / (end - first)
        gaps += [share] * (end - first)
    return gaps


def _new_tokens(out, prompt: Prompt, new_tokens: int) -> torch.Tensor:
    """[B, new_tokens] on the CPU from a generate() result holding the prompt (or only the new tokens)."""
    out = out.sequences if hasattr(out, "sequences") else out
    batch, prompt_len = prompt.ids.shape
    if out.shape == (batch, prompt_len + new_tokens):
        return out[:, prompt_len:].cpu()
    if out.shape == (batch, new_tokens):
        return out.cpu()
    raise RuntimeError(f"expected {new_tokens} new tokens for a [{batch}, {prompt_len}] prompt, got output shape "
                       f"{tuple(out.shape)}")


def _sampling_kwargs(sampling):
    return {"do_sample": False} if not sampling else {"do_sample": True, **sampling}


# -- modes -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hf_generate(model, prompt=None, new_tokens=None, *, use_cache=True, cache_implementation=None):
    """model.generate: no cache, HF's DynamicCache, or its StaticCache (auto torch.compile on CUDA)."""
    if cache_implementation == "static" and model.device.type == "cuda":
        # Every model of a run shares GPT-2's forward code object: without a reset, dynamo's recompile
        # limit would silently leave later configurations uncompiled.
        torch._dynamo.reset()
    def run(prompt: Prompt, new_tokens: int, clock=None, sampling=None):
        extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
        out = model.generate(prompt.ids, attention_mask=prompt.attention_mask, max_new_tokens=new_tokens,
                             use_cache=use_cache, streamer=clock, **_sampling_kwargs(sampling), **extra)
        return _new_tokens(out, prompt, new_tokens)
    yield run


def _batching_config(prompt: Prompt, new_tokens: int):
    """A continuous-batching cache sized for this workload, as kvkernels sizes its pool.

    HF's default sizes the cache from free memory (most of the GPU; ~7 GB of RAM on a CPU), which would
    make its peak-memory column meaningless and costs seconds of allocation per manager.
    """
    from transformers.generation import ContinuousBatchingConfig
    batch, prompt_len = prompt.ids.shape
    default = ContinuousBatchingConfig()
    page = getattr(default, "page_size", None) or default.block_size   # renamed after transformers 5.17
    return ContinuousBatchingConfig(num_blocks=batch * -(-(prompt_len + new_tokens) // page) + batch,
                                    max_batch_tokens=max(256, batch * prompt_len))


# Far past a healthy run: HF's dynamic cache makes 32 x 500 tokens of GPT-2 124M in ~4 s on the H100.
GENERATE_BATCH_DEADLINE_S = 120.0
GENERATE_BATCH_STOP_GRACE_S = 10.0


def _drop_psutil_notice(record) -> bool:
    """HF sizes its CPU cache from psutil's memory figures and logs an ERROR without psutil; the bench gives
    the cache its size explicitly (_batching_config), so the figures are unused and the notice is noise."""
    return not record.getMessage().startswith("Cannot get memory breakdown on CPU without psutil")


def _generate_batch_with_deadline(model, **kwargs) -> dict:
    """model.generate_batch(**kwargs), given up after GENERATE_BATCH_DEADLINE_S.

    generate_batch waits on its worker thread without a deadline, and on the H100 (transformers 5.17, GPT-2
    124M, 500 new tokens) it never returned. It runs here in a daemon thread; at the deadline the managers
    it started are hard-stopped (pending requests fail, the worker exits at its next step) and the call
    raises, whether or not the thread comes back.
    """
    managers, outcome = [], {}
    init = model.init_continuous_batching

    def init_recorded(*args, **init_kwargs):
        manager = init(*args, **init_kwargs)
        managers.append(manager)
        return manager

    def call():
        try:
            outcome["results"] = model.generate_batch(**kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err
    model.init_continuous_batching = init_recorded         # an instance attribute over the class's method
    try:
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(GENERATE_BATCH_DEADLINE_S)
        if worker.is_alive():
            for manager in managers:
                manager.stop(block=False, hard_stop=True)
            worker.join(GENERATE_BATCH_STOP_GRACE_S)
            raise RuntimeError(f"generate_batch stalled: no result after {GENERATE_BATCH_DEADLINE_S:.0f} s; "
                               f"{len(managers)} manager(s) hard-stopped, the call "
                               f"{'returned' if not worker.is_alive() else 'still hangs in a daemon thread'}")
    finally:
        del model.init_continuous_batching
    if "error" in outcome:
        raise outcome["error"]
    return outcome["results"]


@contextlib.contextmanager
def hf_generate_batch(model, prompt: Prompt, new_tokens: int):
    """model.generate_batch: HF's paged continuous batching, one manager kept across calls (as a server would)."""
    logger = logging.getLogger("ContinuousBatchingLogger")
    logger.setLevel(logging.ERROR)
    if _drop_psutil_notice not in logger.filters:
        logger.addFilter(_drop_psutil_notice)
    params = inspect.signature(model.generate_batch).parameters
    options = {"persistent_manager": True, "continuous_batching_config": _batching_config(prompt, new_tokens),
               "progress_bar": False}
    if "warmup" in params:  # pre-captures CUDA graphs: worth it on a GPU, nothing to capture on a CPU
        options["warmup"] = model.device.type == "cuda"
    options = {k: v for k, v in options.items() if k in params}

    def run(prompt: Prompt, new_tokens: int, clock=None, sampling=None):
        config = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=0, **_sampling_kwargs(sampling))
        timed = clock is not None and "record_timestamps" in params
        results = _generate_batch_with_deadline(model, inputs=prompt.ids.tolist(), generation_config=config,
                                                **({"record_timestamps": True} if timed else {}), **options)
        outputs = list(results.values())  # generate_batch returns them in input order
        errors = [o.error for o in outputs if getattr(o, "error", None)]
        if len(outputs) != prompt.ids.shape[0] or errors:
            raise RuntimeError(f"generate_batch returned {len(outputs)} of {prompt.ids.shape[0]} requests; "
                               f"errors: {errors[:2]}")
        if timed:
            # The batch's token i exists once every request has produced it.
            clock.stamps = [max(stamps) for stamps in zip(*(o.timestamps for o in outputs))]
            clock.source = "generate_batch's record_timestamps: host clock, no device sync, tokens in bursts"
        elif clock is not None:
            raise RuntimeError("this transformers version's generate_batch cannot record per-token timestamps")
        return _new_tokens(torch.tensor([o.generated_tokens for o in outputs]), prompt, new_tokens)

    try:
        yield run
    finally:
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()


@contextlib.contextmanager
def kvkernels_patch(model, prompt=None, new_tokens=None, *, backend):
    """kvkernels.patch(model, backend=...) then plain model.generate; unpatched on the way out."""
    import kvkernels
    kvkernels.patch(model, backend=backend)
    try:
        with hf_generate(model) as run:
            yield run
    finally:
        kvkernels.unpatch(model)


@contextlib.contextmanager
def kvkernels_generate(model, prompt=None, new_tokens=None, *, backend):
    """kvkernels.generate: its own prefill + CUDA-graph decode loop over the paged cache."""
    import kvkernels
    params = inspect.signature(kvkernels.generate).parameters
    # The backend is a generate() argument if it takes one, else the one the model was patched with.
    patch_first = "backend" not in params
    if patch_first:
        kvkernels.patch(model, backend=backend)
    try:
        def run(prompt: Prompt, new_tokens: int, clock=None, sampling=None):
            kwargs = dict(max_new_tokens=new_tokens, **_sampling_kwargs(sampling))
            if not patch_first:
                kwargs["backend"] = backend
            if "cuda_graph" in params:
                kwargs["cuda_graph"] = model.device.type == "cuda"
            if clock is not None:
                kwargs["streamer"] = clock
            out = kvkernels.generate(model, prompt.ids, prompt.attention_mask, **kwargs)
            return _new_tokens(out, prompt, new_tokens)
        yield run
    finally:
        if patch_first:
            kvkernels.unpatch(model)


def mode_table(backends) -> dict:
    """Mode name -> (context-manager factory(model, prompt, new_tokens), whether it keeps a KV cache)."""
    modes = {
        "hf_no_cache": (functools.partial(hf_generate, use_cache=False), False),
        "hf_dynamic": (hf_generate, True),
        "hf_static": (functools.partial(hf_generate, cache_implementation="static"), True),
        "hf_generate_batch": (hf_generate_batch, True),
    }
    for backend in backends:
        modes[f"kvk_patch[{backend}]"] = (functools.partial(kvkernels_patch, backend=backend), True)
    for backend in backends:
        modes[f"kvk_generate[{backend}]"] = (functools.partial(kvkernels_generate, backend=backend), True)
    return modes
