"""python -m kvkernels: GPT-2 generation four ways (no cache, HF's dynamic cache, kvkernels.patch + HF generate,
kvkernels.generate), a check that their greedy tokens agree, and a table of tokens/s and per-token latency.

With no arguments it builds a randomly initialised GPT-2 (the 124M shape on a GPU, a small one on the CPU)
and prompts it with fixed token ids; --model / --tokenizer load local weights and a tokenizer instead.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# "The quick brown fox jumps over the lazy dog" in GPT-2's BPE: the prompt when there is no tokenizer.
PROMPT_IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Small enough that a CPU run of every method takes seconds; GPT-2's vocabulary so the prompt ids mean the same.
CPU_SHAPE = dict(n_layer=4, n_head=4, n_embd=128, n_positions=256)
GPU_SHAPE = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)      # GPT-2 124M
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kvkernels",
        description="Generate with a GPT-2 four ways -- HF generate without a cache, HF generate with its dynamic "
                    "cache, HF generate after kvkernels.patch(model), and kvkernels.generate (CUDA-graph decode "
                    "loop on a GPU) -- check that the greedy tokens agree and print tokens/s and per-token latency.")
    parser.add_argument("--model", metavar="PATH",
                        help="local directory of a GPT-2 checkpoint (save_pretrained format). Default: random "
                             "weights with the GPT-2 124M shape on a GPU, a 4-layer 128-wide GPT-2 on the CPU")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="local tokenizer directory; default: --model's directory if it holds one. Without a "
                             "tokenizer the prompt is fixed token ids and the output is printed as ids")
    parser.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog",
                        help="prompt text, used when a tokenizer is available (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="tokens to generate per sequence (default: 200 on a GPU, 24 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="number of copies of the prompt generated together (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="model and cache dtype (default: %(default)s, where the four methods agree exactly; "
                             "float16 is faster on a GPU but near-ties may then pick different tokens)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="where to run; auto picks the GPU when there is one (default: %(default)s)")
    parser.add_argument("--backend", choices=["auto", "triton", "cuda", "torch"], default="auto",
                        help="kvkernels kernel backend; auto is Triton on a GPU, PyTorch on the CPU "
                             "(default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=16, metavar="N",
                        help="tokens per page of the paged KV cache (default: %(default)s)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="run kvkernels.generate's decode steps eagerly instead of replaying a CUDA graph")
    parser.add_argument("--skip-no-cache", action="store_true",
                        help="skip HF generate without a cache (it recomputes the whole sequence for every token)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


@dataclass
class Result:
    name: str
    seconds: float
    tokens: torch.Tensor        # int64 [B, new tokens] on the CPU


def load_model(args, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.model:
        model = GPT2LMHeadModel.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    else:
        torch.manual_seed(args.seed)
        model = GPT2LMHeadModel(GPT2Config(**(GPU_SHAPE if device.type == "cuda" else CPU_SHAPE))).to(dtype)
    return model.to(device).eval()


def load_tokenizer(args):
    path = args.tokenizer or args.model
    if path is None or (args.tokenizer is None and not any((Path(path) / name).exists() for name in TOKENIZER_FILES)):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot load a tokenizer from {path}: {err}")
    if len(tokenizer) < 2:                    # HF builds an empty one from a directory without a vocabulary
        raise SystemExit(f"{path} holds no tokenizer vocabulary")
    return tokenizer


def methods(model, args, device):
    """name -> fn(input_ids, max_new_tokens) -> LongTensor [B, P + n], in the order they are run."""
    import kvkernels
    from transformers import GenerationConfig

    def hf(use_cache):
        def run(ids, new_tokens):
            # No eos_token_id: every method makes exactly new_tokens tokens, so the timings compare.
            config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0)
            return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return run

    def patched(ids, new_tokens):
        with kvkernels.patched(model, backend=args.backend, block_size=args.block_size):
            return hf(True)(ids, new_tokens)

    graph = device.type == "cuda" and not args.no_cuda_graph

    def fast(ids, new_tokens):
        return kvkernels.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], cuda_graph=graph,
                                  backend=args.backend, block_size=args.block_size)

    table = {} if args.skip_no_cache else {"HF generate, no cache": hf(False)}
    table["HF generate, dynamic cache"] = hf(True)
    table["kvkernels.patch + HF generate"] = patched
    table["kvkernels.generate" + (" (CUDA graph)" if graph else "")] = fast
    return table


def timed(fn, ids, new_tokens, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn(ids, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].cpu()


def report(results, batch, reference, tokenizer):
    header = f"{'method':<36} {'tokens/s':>10} {'ms/token':>9} {'new tokens':>10}  same tokens as {reference.name}"
    lines = [header, "-" * len(header)]
    for r in results:
        steps = r.tokens.shape[1]
        same = "yes" if torch.equal(r.tokens, reference.tokens) else f"NO (first difference at new token " \
            f"{first_difference(r.tokens, reference.tokens)})"
        lines.append(f"{r.name:<36} {batch * steps / r.seconds:>10.1f} {1e3 * r.seconds / steps:>9.2f} "
                     f"{steps:>10}  {'(reference)' if r is reference else same}")
    first = reference.tokens[0].tolist()
    shown = repr(tokenizer.decode(first)) if tokenizer is not None else f"token ids {first[:32]}" + \
        (" ..." if len(first) > 32 else "")
    lines.append(f"\nfirst sequence, new tokens: {shown}")
    return "\n".join(lines)


def first_difference(a, b):
    if a.shape != b.shape:
        return min(a.shape[1], b.shape[1])
    return int((a != b).any(0).nonzero()[0])


def main(argv=None):
    from tqdm import tqdm

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = DTYPES[args.dtype]
    new_tokens = args.max_new_tokens or (200 if device.type == "cuda" else 24)
    model = load_model(args, device, dtype)
    tokenizer = load_tokenizer(args)
    prompt = tokenizer(args.prompt)["input_ids"] if tokenizer is not None else \
        [i % model.config.vocab_size for i in PROMPT_IDS]
    if not prompt or max(prompt) >= model.config.vocab_size:
        raise SystemExit(f"the prompt must be 1 or more token ids below the vocabulary size {model.config.vocab_size}, "
                         f"got {prompt}")
    if len(prompt) + new_tokens > model.config.n_positions:
        raise SystemExit(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({new_tokens}) exceeds the model's "
                         f"n_positions={model.config.n_positions}")
    ids = torch.tensor([prompt] * args.batch_size, device=device)
    table = methods(model, args, device)
    print(f"{'GPU ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {args.dtype}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch {args.batch_size}, "
          f"prompt {len(prompt)} tokens, {new_tokens} new tokens (greedy, EOS ignored)", flush=True)
    results, first_calls = [], []
    with tqdm(total=2 * len(table), desc="generating", unit="run", file=sys.stderr) as bar:
        for name, fn in table.items():
            bar.set_postfix_str(f"{name}: warm-up")
            # kvkernels.generate keeps its pool and CUDA graph for calls of the same shape: warm it up at the
            # timed length so the timed call replays; the others only need their kernels compiled.
            keeps_session = name.startswith("kvkernels.generate")
            seconds, _ = timed(fn, ids, new_tokens if keeps_session else min(4, new_tokens), device)
            if keeps_session:
                first_calls.append(f"note: the first {name} call took {seconds:.2f} s "
                                   "(pool setup, kernel compile and, on a GPU, graph capture)")
            bar.update()
            bar.set_postfix_str(name)
            seconds, tokens = timed(fn, ids, new_tokens, device)
            results.append(Result(name, seconds, tokens))
            bar.update()
    print(report(results, args.batch_size, results[0], tokenizer))
    print("\n".join(first_calls))
    agree = all(torch.equal(r.tokens, results[0].tokens) for r in results)
    if not agree and dtype == torch.float32:
        print("ERROR: greedy tokens differ in float32", file=sys.stderr)
        return 1
    if not agree:
        print(f"note: in {args.dtype} the methods round differently, so near-ties can pick different tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
