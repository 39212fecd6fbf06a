"""End-to-end generation (GPT-2 and Llama-family shapes): HF's caches against kvkernels, tokens/s, latency,
memory, greedy agreement.

Modes (each in its own row; one that fails or is unsupported shows its error):
    hf_no_cache          model.generate(use_cache=False): the whole sequence recomputed per token
    hf_dynamic           model.generate (DynamicCache, HF's default)
    hf_static            model.generate(cache_implementation="static") (HF auto-compiles it on CUDA)
    hf_generate_batch    model.generate_batch (HF's paged continuous batching)
    kvk_patch[B]         kvkernels.patch(model, backend=B) + model.generate
    kvk_generate[B]      kvkernels.generate (CUDA-graph decode loop) with backend B
Protocol per (model, dtype, batch, mode): one warm-up run (reported apart: compile, graph capture,
autotuning land there), `--repeats` timed runs (tokens/s median and spread; peak GPU memory), then one
instrumented run whose streamer syncs and timestamps every token (time to first token, per-token
latency over position). All modes see the same random prompt; greedy throughout. In fp32 every cached
mode's tokens are compared with HF's dynamic cache.

    python -m bench.generate                  # GPT-2 124M, 355M, llama-1B, qwen2.5-0.5B; fp32 + fp16; B 1, 8, 32
    python -m bench.generate --quick          # a tiny GPT-2 and a tiny Llama on CPU in seconds
"""
import argparse
import dataclasses
import hashlib
import os
import statistics
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from . import plots
from .common import (DTYPES, Stopwatch, add_run_args, default_device, environment, environment_markdown, error_string,
                     fmt, free_device_memory, load_for_append, markdown_table, merge_rows, output_dir,
                     smoke_run_notice, spread, write_json)
from .models import (TokenClock, build_model, mode_table, model_title, random_prompt, token_gaps_ms,
                     weight_bytes)

REFERENCE_MODE = "hf_dynamic"
# Candidates closer than this (fp32 logits) are a near-tie: any change of summation order may flip them.
NEAR_TIE_LOGIT_MARGIN = 1e-3


@dataclass
class GenerateConfig:
    models: tuple = ("124M", "355M", "llama-1B", "qwen2.5-0.5B")
    dtypes: tuple = ("fp32", "fp16")
    batches: tuple = (1, 8, 32)
    prompt_len: int = 9
    new_tokens: int = 500
    repeats: int = 3
    modes: tuple = ()             # empty: every mode
    backends: tuple = ("triton", "cuda")
    seed: int = 0


QUICK_CONFIG = GenerateConfig(models=("tiny", "llama-tiny"), dtypes=("fp32",), batches=(1, 2), prompt_len=5,
                              new_tokens=6, repeats=2)


def measure(factory, model, prompt, new_tokens: int, repeats: int, device) -> dict:
    """Warm-up, timed full runs, timed one-token runs (TTFT), one instrumented run; token counts checked.

    Returns the row for the results table; its "tokens" ([B, new_tokens] of the first timed run) is
    for the greedy check and is dropped before the JSON is written.
    """
    batch = prompt.ids.shape[0]
    record = {}
    with factory(model, prompt, new_tokens) as generate:
        with Stopwatch(device) as watch:
            generate(prompt, new_tokens)
        record["warmup_s"] = watch.seconds
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, outputs = [], []
        for _ in range(repeats):
            with Stopwatch(device) as watch:
                outputs.append(generate(prompt, new_tokens))
            seconds.append(watch.seconds)
        if device.type == "cuda":
            record["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        # Time to first token: prefill + one sampled token, its own warm-up first (other shapes).
        generate(prompt, 1)
        first_token = []
        for _ in range(repeats):
            with Stopwatch(device) as watch:
                generate(prompt, 1)
            first_token.append(watch.seconds * 1e3)
        clock = TokenClock(device)
        generate(prompt, new_tokens, clock)
        gaps = token_gaps_ms(clock.stamps, new_tokens)
    known = [g for g in gaps if g is not None]
    decode_s = statistics.median(seconds) - statistics.median(first_token) / 1e3
    record.update({
        "status": "ok",
        "seconds": spread(seconds),
        "tokens_per_s": spread(batch * new_tokens / s for s in seconds),
        "ttft_ms": spread(first_token),
        "per_token_ms": gaps,
        # The same for every mode, from the timed runs: what a full run takes beyond its first token, per
        # further token. (Streamer gaps are not comparable: generate_batch's tokens arrive in bursts.)
        "decode_ms_per_token": decode_s * 1e3 / (new_tokens - 1) if new_tokens > 1 else None,
        "streamer_ms_per_token": sum(known) / len(known) if known else None,
        "per_token_source": clock.source,
        "per_token_comparable": clock.source == TokenClock.SYNCED,
        "repeats_identical": all(torch.equal(outputs[0], o) for o in outputs[1:]),
        "tokens_sha1": hashlib.sha1(outputs[0].numpy().tobytes()).hexdigest(),
        "tokens": outputs[0],
    })
    return record


@torch.no_grad()
def greedy_check(group, model, prompt) -> list:
    """fp32: each mode's greedy tokens against HF's dynamic cache, for one (model, batch).

    At the first differing token the reference forward (no cache) gives the logit margin between the two
    candidates: random weights have near-ties that fp32 rounding in any attention kernel can flip.
    """
    by_mode = {r["mode"]: r for r in group}
    base = by_mode.get(REFERENCE_MODE)
    rows = []
    for mode, run in by_mode.items():
        if mode == REFERENCE_MODE:
            continue
        row = {"model": run["model"], "batch": run["batch"], "mode": mode, "cached": run["cached"], "near_tie": None}
        if base is None or base["status"] != "ok":
            row.update(identical=None, verdict=f"not checked: {REFERENCE_MODE} did not run")
        elif run["status"] != "ok":
            row.update(identical=None, verdict=f"not checked: mode {run['status']}")
        elif torch.equal(run["tokens"], base["tokens"]):
            row.update(identical=True, verdict="identical")
        else:
            seq, step = (run["tokens"] != base["tokens"]).nonzero()[0].tolist()
            ours, ref = run["tokens"][seq, step].item(), base["tokens"][seq, step].item()
            context = torch.cat([prompt.ids[seq].cpu(), base["tokens"][seq, :step]]).to(prompt.ids.device)
            logits = model(context[None], use_cache=False).logits[0, -1].float()
            margin = (logits[ref] - logits[ours]).abs().item()
            near_tie = margin < NEAR_TIE_LOGIT_MARGIN
            row.update(identical=False, near_tie=near_tie, first_difference={"sequence": seq, "token": step},
                       verdict=f"differs from sequence {seq}, token {step}: {ours} vs {ref}, logit margin "
                               f"{margin:.1e} ({'a near-tie' if near_tie else 'not a near-tie'})")
        rows.append(row)
    return rows


def check_summary(rows) -> dict:
    checked = [r for r in rows if r["cached"] and r["identical"] is not None]
    return {"performed": bool(checked), "passed": bool(checked) and all(r["identical"] for r in checked),
            "only_near_ties": bool(checked) and all(r["identical"] or r["near_tie"] for r in checked),
            "modes_checked": len(checked), "modes_not_checked": sum(r["identical"] is None for r in rows if r["cached"])}


def markdown(result) -> str:
    cfg, env = result["settings"], result["environment"]
    appended = f" Rows from {len(env['earlier_runs']) + 1} invocations (--append)." if env.get("earlier_runs") else ""
    lines = ["# End-to-end generation", "", environment_markdown(env) + appended, "",
             f"Prompt {cfg['prompt_len']} random tokens, {cfg['new_tokens']} new tokens, greedy, "
             f"{cfg['repeats']} timed repeats after one warm-up run. tokens/s = batch x new tokens / wall time "
             "(prefill included), median (min-max). TTFT: a one-token generate (prefill + first token), "
             "median. Decode ms/token, the same for every mode: (median full run - median TTFT) / (new tokens - 1). "
             "The per-token latency plot comes from a separate run whose streamer synchronises the "
             "device at every token (kvkernels.generate streams every 16 tokens on CUDA: each burst's time is "
             "spread over its tokens); `hf_generate_batch` has no streamer and is left out of it. Peak memory: "
             "`torch.cuda.max_memory_allocated` over the timed repeats (weights included).", ""]
    if result.get("quick"):
        lines[4:4] = [smoke_run_notice(env), ""]
    summary = result["greedy_check_summary"]
    if summary["performed"]:
        verdict = "PASSED" if summary["passed"] else (
            "FAILED, near-ties only" if summary["only_near_ties"] else "FAILED")
        lines.append(f"**Greedy check (fp32, every cached mode vs `{REFERENCE_MODE}`): {verdict}** "
                     f"({summary['modes_checked']} mode runs compared, {summary['modes_not_checked']} not run). "
                     "At a first difference the reference forward gives the logit margin between the two tokens; "
                     f"below {NEAR_TIE_LOGIT_MARGIN:g} it is a near-tie of the random weights, which any change of "
                     "fp32 summation order can flip.")
    else:
        lines.append("**Greedy check: not performed** (needs fp32 runs of `hf_dynamic` and another cached mode).")
    lines.append("")
    for model, dtype in sorted({(r["model"], r["dtype"]) for r in result["runs"]}):
        lines += [f"## {model_title(model)} · {dtype}", ""]
        rows = []
        for r in (r for r in result["runs"] if (r["model"], r["dtype"]) == (model, dtype)):
            if r["status"] == "ok":
                tps = r["tokens_per_s"]
                rows.append([r["batch"], r["mode"], f"**{fmt(tps['median'], 1)}** ({fmt(tps['min'], 1)}-{fmt(tps['max'], 1)})",
                             fmt(r["ttft_ms"]["median"], 2), fmt(r["decode_ms_per_token"], 2), fmt(r.get("peak_mem_mib"), 0),
                             fmt(r["warmup_s"], 2), ""])
            else:
                status = f"skipped: {r['error']}" if r["status"] == "skipped" else r["status"]
                rows.append([r["batch"], r["mode"], status, "—", "—", "—", "—",
                             "" if r["status"] == "skipped" else r["error"]])
        lines += [markdown_table(["B", "mode", "tokens/s", "TTFT ms", "decode ms/token", "peak MiB", "warm-up s",
                                  "error"], rows), ""]
    lines += ["Notes:", ""] + [f"- {mode}: {note}" for mode, note in result["notes"].items()] + [""]
    if result["greedy_check"]:
        lines += ["## Greedy check details (fp32)", "",
                  markdown_table(["model", "B", "mode", "verdict"],
                                 [[r["model"], r["batch"], r["mode"] + ("" if r["cached"] else " (no cache, info)"),
                                   r["verdict"]] for r in result["greedy_check"]]), ""]
    return "\n".join(lines)


def run(config: GenerateConfig, device, out_dir, *, name="generate", append=False, progress=True,
        quick=False) -> dict:
    env = environment(device)
    settings = {k: getattr(config, k) for k in ("prompt_len", "new_tokens", "repeats", "seed")}
    previous = load_for_append(out_dir / f"{name}.json", env, settings) if append else None
    modes = mode_table(config.backends)
    selected = [m for m in modes if not config.modes or m in config.modes]
    todo = [(m, d, b) for m in config.models for d in config.dtypes for b in config.batches]
    bar = tqdm(total=len(todo) * len(selected), desc="generate", unit="mode", disable=not progress)
    runs, checks = [], []
    for model_name, dtype, batch in todo:
        model = build_model(model_name, DTYPES[dtype], device, seed=config.seed)
        label = os.path.basename(model_name.rstrip("/"))
        if model.config.max_position_embeddings < config.prompt_len + config.new_tokens:
            raise SystemExit(f"prompt {config.prompt_len} + {config.new_tokens} new tokens exceed the model's "
                             f"{model.config.max_position_embeddings} positions")
        prompt = random_prompt(batch, config.prompt_len, model.config.vocab_size, device, seed=config.seed)
        for mode in selected:
            bar.set_postfix_str(f"{label} {dtype} B={batch} {mode}")
            factory, cached = modes[mode]
            row = {"model": label, "dtype": dtype, "batch": batch, "mode": mode, "cached": cached,
                   "weights_mib": weight_bytes(model) / 2**20}
            if mode.endswith("[cuda]") and device.type != "cuda":   # not a failure: nothing to run it on
                row.update(status="skipped", error="no CUDA device")
                bar.update()
                runs.append(row)
                continue
            try:
                row.update(measure(factory, model, prompt, config.new_tokens, config.repeats, device))
            except Exception as err:  # a mode that cannot run is a result: its row carries the error
                row.update(status="failed", error=error_string(err))
            free_device_memory(device)
            runs.append(row)
            bar.update()
        if dtype == "fp32":
            checks += greedy_check(runs[-len(selected):], model, prompt)
        for row in runs[-len(selected):]:
            row.pop("tokens", None)   # kept only for the check: the JSON holds their sha1
        del model
        free_device_memory(device)
    bar.close()
    if previous:
        runs = sorted(merge_rows(previous["runs"], runs, lambda r: (r["model"], r["dtype"], r["batch"], r["mode"])),
                      key=lambda r: (r["model"], r["dtype"], r["batch"]))   # stable: modes keep their order
        checks = merge_rows(previous["greedy_check"], checks, lambda r: (r["model"], r["batch"], r["mode"]))
        env["earlier_runs"] = previous["environment"].get("earlier_runs", []) + [
            {k: previous["environment"][k] for k in ("date_utc", "git_commit", "argv")}]
    result = {"benchmark": "generate", "environment": env, "settings": settings, "quick": quick,
              "config": asdict(config),
              "runs": runs, "greedy_check": checks, "greedy_check_summary": check_summary(checks),
              "notes": {"hf_static": "HF auto-compiles the decode step (torch.compile) when the device is CUDA; the "
                                     "compile lands in the warm-up run.",
                        "hf_generate_batch": "one persistent manager across calls, its cache sized for the workload (HF's "
                                             "default takes most of the free memory); CUDA-graph warm-up on CUDA only.",
                        "ttft": "time to first token: generate() of one new token (prefill + one sampled token), "
                                "median over the repeats after its own warm-up.",
                        "latency": "per_token_ms[i]: ms from new token i to token i+1, from a streamer that syncs "
                                   "the device at every put; tokens delivered in one burst share its time, the first "
                                   "burst (which holds the prefill) is null. hf_generate_batch takes no streamer: its "
                                   "per_token_ms come from HF's own host timestamps (per_token_source), not "
                                   "comparable, and stay out of the latency plot.",
                        "decode_ms_per_token": "(median full run - median TTFT) / (new tokens - 1), for every mode."}}
    write_json(out_dir / f"{name}.json", result)
    (out_dir / f"{name}.md").write_text(markdown(result) + "\n")
    result["plots"] = [str(p) for p in plots.generate_tokens_per_s(result, out_dir, name)
                       + plots.generate_latency(result, out_dir, name)]
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, "tiny GPT-2 and Llama, few tokens: a CPU smoke run in seconds")
    parser.add_argument("--name", default="generate", help="stem of the output files, to keep several runs apart")
    parser.add_argument("--append", action="store_true",
                        help="add this run's rows to an existing <name>.json (same device, versions and settings), "
                             "to split a long benchmark into several invocations")
    parser.add_argument("--models", nargs="+", help="shapes with random weights: GPT-2 (124M, 355M, distilgpt2, tiny) "
                                                    "or Llama-family (llama-1B, qwen2.5-0.5B, llama-tiny)")
    parser.add_argument("--model", help="a local GPT-2 checkpoint directory (instead of --models)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="model dtypes (default fp32 fp16)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8 32)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (default 9)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per sequence (default 500)")
    parser.add_argument("--repeats", type=int, help="timed repeats after the warm-up run (default 3)")
    parser.add_argument("--modes", nargs="+", help="run only these modes (default: all; names as in the table)")
    parser.add_argument("--backends", nargs="+", choices=("triton", "cuda", "torch"),
                        help="kvkernels backends for the kvk_* modes (default triton cuda)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights and prompt")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = {"models": [args.model] if args.model else args.models, "dtypes": args.dtypes,
                 "batches": args.batches, "modes": args.modes, "backends": args.backends}
    overrides = {k: tuple(v) for k, v in overrides.items() if v}
    overrides.update({k: v for k, v in (("prompt_len", args.prompt_len), ("new_tokens", args.new_tokens),
                                        ("repeats", args.repeats)) if v is not None})
    config = dataclasses.replace(QUICK_CONFIG if args.quick else GenerateConfig(), seed=args.seed, **overrides)
    unknown = set(config.modes) - set(mode_table(config.backends))
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {list(mode_table(config.backends))}")
    out_dir = output_dir(args.out, args.quick)
    result = run(config, default_device(), out_dir, name=args.name, append=args.append,
                 progress=not args.no_progress, quick=args.quick)
    print(f"wrote {out_dir / (args.name + '.json')}, {out_dir / (args.name + '.md')} and {len(result['plots'])} plot(s)")
    return result


if __name__ == "__main__":
    main()
