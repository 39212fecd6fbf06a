"""What the benchmark numbers point at: the decode kernels under Nsight Compute, one decode step of
kvkernels.generate under the torch profiler (kernels per step, busy time, gaps), and the host time `kvkernels.patch`
adds to HF's generate loop. GPU only.

    ncu --kernel-name regex:decode --csv --page details python -m bench.profile kernels   # launches for ncu
    python -m bench.profile step --out DIR          # writes DIR/profile_step.{json,md}
    python -m bench.profile patch --out DIR         # writes DIR/profile_patch.{json,md}

`kernels` launches the Triton and CUDA decode kernels twice at each target point of the kernel grid (GPT-2
heads, fp16, block 16): the first launch compiles, ncu reads the second (`--launch-skip` is not needed when
the report keeps both). `step` generates twice with the same prompt, N and 3N new tokens, and takes the
difference of the two runs, so prefill, capture and compilation cancel out and what is left is 2N decode steps.
"""
import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

import kvkernels
from kvkernels import cuda_ext

from .common import environment, environment_markdown, markdown_table, output_dir, write_json
from .kernels import SHAPES, make_inputs
from .models import build_model, random_prompt

KERNEL_POINTS = ((1, 16384), (64, 16384), (1, 1024), (16, 4096))   # (batch, context): the targets, and B=16 x 4k


def launch_kernels(device) -> None:
    shape = SHAPES["gpt2"]
    for batch, context in KERNEL_POINTS:
        q, k_pool, v_pool, tables, lens, _, _ = make_inputs(shape, batch, context, torch.float16, 16, device)
        counters = torch.zeros(batch, shape.num_kv_heads, dtype=torch.int32, device=device)
        for backend in ("triton", "cuda"):
            for _ in range(2):
                kvkernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, backend=backend, validate=False,
                                                 split_counters=counters if backend == "triton" else None)
        torch.cuda.synchronize(device)
        print(f"launched B={batch} L={context}", flush=True)


def _profiled_generate(model, prompt, new_tokens: int, cuda_graph: bool):
    """(kernel launches, summed kernel microseconds, {kernel name: count}) of one kvkernels.generate call."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        kvkernels.generate(model, prompt.ids, prompt.attention_mask, max_new_tokens=new_tokens,
                           cuda_graph=cuda_graph, eos_token_id=[])
        torch.cuda.synchronize()
    counts, busy_us = {}, 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            counts[event.name] = counts.get(event.name, 0) + 1
            busy_us += event.time_range.elapsed_us()
    return sum(counts.values()), busy_us, counts


def _wall_s(model, prompt, new_tokens: int, cuda_graph: bool, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        kvkernels.generate(model, prompt.ids, prompt.attention_mask, max_new_tokens=new_tokens,
                           cuda_graph=cuda_graph, eos_token_id=[])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_step(device, out_dir, model_name: str = "124M", batch: int = 1, steps: int = 64) -> dict:
    model = build_model(model_name, torch.float16, device)
    prompt = random_prompt(batch, 9, model.config.vocab_size, device)
    rows = []
    for cuda_graph in (False, True):
        _wall_s(model, prompt, 3 * steps, cuda_graph, repeats=1)                  # compile, capture, warm
        short, long_ = (_profiled_generate(model, prompt, n, cuda_graph) for n in (steps, 3 * steps))
        wall = _wall_s(model, prompt, 3 * steps, cuda_graph) - _wall_s(model, prompt, steps, cuda_graph)
        decode_steps = 2 * steps
        per_step = {name: (long_[2].get(name, 0) - short[2].get(name, 0)) / decode_steps for name in long_[2]}
        step_us = wall / decode_steps * 1e6
        busy_us = (long_[1] - short[1]) / decode_steps
        rows.append({"cuda_graph": cuda_graph, "kernels_per_step": (long_[0] - short[0]) / decode_steps,
                     "step_us": step_us, "kernel_busy_us": busy_us, "gap_us": step_us - busy_us,
                     "tokens_per_s": batch / (step_us * 1e-6),
                     "kernels": dict(sorted(((k, v) for k, v in per_step.items() if v > 0),
                                            key=lambda kv: -kv[1]))})
    result = {"benchmark": "profile_step", "environment": environment(device), "model": model_name,
              "dtype": "fp16", "batch": batch, "decode_steps_measured": 2 * steps, "rows": rows}
    write_json(out_dir / "profile_step.json", result)
    lines = ["# One decode step of kvkernels.generate under the torch profiler", "",
             environment_markdown(result["environment"]), "",
             f"GPT-2 {model_name} fp16, batch {batch}; per step = (run of {3 * steps} new tokens - run of {steps}) / "
             f"{2 * steps}; wall time median of 5 runs without the profiler.", "",
             markdown_table(["CUDA graph", "kernels / step", "step µs", "kernel busy µs", "gaps µs", "tokens/s"],
                            [[r["cuda_graph"], f"{r['kernels_per_step']:.1f}", f"{r['step_us']:.1f}",
                              f"{r['kernel_busy_us']:.1f}", f"{r['gap_us']:.1f}", f"{r['tokens_per_s']:.0f}"]
                             for r in rows]), ""]
    for r in rows:
        lines += [f"Kernels per step, CUDA graph {r['cuda_graph']}:", "",
                  markdown_table(["kernel", "per step"], [[name[:90], f"{n:.2f}"] for name, n in r["kernels"].items()]),
                  ""]
    (out_dir / "profile_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    return result


def _hf_generate(model, prompt, new_tokens: int):
    model.generate(prompt.ids, attention_mask=prompt.attention_mask, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False)


def _hf_ms_per_token(model, prompt, steps: int, repeats: int = 3) -> float:
    """Decode ms per token of HF's generate: (median run of 3N new tokens - median run of N) / 2N."""
    def wall(n):
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            _hf_generate(model, prompt, n)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    return (wall(3 * steps) - wall(steps)) / (2 * steps) * 1e3


def _short_path(path: str) -> str:
    """A source path from its package (site-packages/...) or from this checkout's root."""
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    return path.split("site-packages/")[-1].removeprefix(root)


def _syncs_per_step(model, prompt, steps: int) -> dict:
    """{where: count per decode step} of the device syncs torch reports (set_sync_debug_mode) in a generate run of
    `steps` new tokens (prefill included, over `steps`), each placed at its innermost kvkernels frame, else the
    innermost frame outside torch."""
    places = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        callers = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")
                   and "/torch/" not in f.filename]
        frame = next((f for f in reversed(callers) if "/kvkernels/" in f.filename), callers[-1])
        place = f"{_short_path(frame.filename)}:{frame.lineno} {frame.name}"
        places[place] = places.get(place, 0) + 1 / steps
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _hf_generate(model, prompt, steps)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(sorted(places.items(), key=lambda kv: -kv[1]))


def profile_patch(device, out_dir, model_name: str = "124M", batch: int = 1, steps: int = 64) -> dict:
    """Where `kvkernels.patch` + HF generate spends its host time against HF's dynamic cache: decode ms per token
    of each, the device syncs per step, and a cProfile of a patched run (functions by own time; the profiler
    inflates Python-heavy paths, so read it for ranking, not for absolute times)."""
    model = build_model(model_name, torch.float16, device)
    prompt = random_prompt(batch, 9, model.config.vocab_size, device)
    rows, profiles = [], {}
    backends = ["triton"] + (["cuda"] if cuda_ext.load() is not None else [])
    for mode in ["hf_dynamic"] + [f"patch[{b}]" for b in backends]:
        backend = mode[len("patch["):-1] if mode.startswith("patch") else None
        context = kvkernels.patched(model, backend=backend) if backend else contextlib.nullcontext()
        with context, torch.no_grad():
            _hf_generate(model, prompt, 3 * steps)                                      # compile, warm
            ms = _hf_ms_per_token(model, prompt, steps)
            syncs = _syncs_per_step(model, prompt, steps)
            row = {"mode": mode, "decode_ms_per_token": ms, "syncs_per_step": syncs}
            if backend:
                profiler = cProfile.Profile()
                profiler.enable()
                _hf_generate(model, prompt, steps)
                torch.cuda.synchronize()
                profiler.disable()
                entries = [{"function": f"{_short_path(path)}:{line} {name}", "calls": calls,
                            "own_ms_per_token": own / steps * 1e3, "total_ms_per_token": total / steps * 1e3}
                           for (path, line, name), (_, calls, own, total, _) in pstats.Stats(profiler).stats.items()]
                profiles[mode] = {
                    "by_own_time": sorted(entries, key=lambda e: -e["own_ms_per_token"])[:30],
                    "kvkernels_by_total_time": sorted((e for e in entries if e["function"].startswith("kvkernels/")),
                                                      key=lambda e: -e["total_ms_per_token"])[:25]}
            rows.append(row)
        print(f"{mode}: {ms:.2f} ms/token, syncs per step {sum(syncs.values()):.1f}", flush=True)
    result = {"benchmark": "profile_patch", "environment": environment(device), "model": model_name, "dtype": "fp16",
              "batch": batch, "steps": steps, "rows": rows, "profiles": profiles}
    write_json(out_dir / "profile_patch.json", result)
    lines = ["# Host time of kvkernels.patch + HF generate against HF's dynamic cache", "",
             environment_markdown(result["environment"]), "",
             f"GPT-2 {model_name} fp16, batch {batch}, prompt 9, greedy; decode ms/token = (median of 3 runs of "
             f"{3 * steps} new tokens - median of 3 runs of {steps}) / {2 * steps}.", "",
             markdown_table(["mode", "decode ms/token", f"device syncs / step (a run of {steps}, prefill included)"],
                            [[r["mode"], f"{r['decode_ms_per_token']:.2f}", f"{sum(r['syncs_per_step'].values()):.1f}"]
                             for r in rows]), ""]
    for r in rows:
        lines += [f"Syncs per step, {r['mode']}:", "",
                  markdown_table(["where", "per step"], [[k, f"{v:.2f}"] for k, v in r["syncs_per_step"].items()]), ""]
    for mode, tables in profiles.items():
        for key, title in (("kvkernels_by_total_time", "kvkernels' functions by total time"),
                           ("by_own_time", "every function by own time")):
            lines += [f"cProfile of {mode}, {title}:", "",
                      markdown_table(["function", "calls", "own ms/token", "total ms/token"],
                                     [[t["function"][:100], t["calls"], f"{t['own_ms_per_token']:.3f}",
                                       f"{t['total_ms_per_token']:.3f}"] for t in tables[key]]), ""]
    (out_dir / "profile_patch.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("kernels", "step", "patch"))
    parser.add_argument("--out", default=None, help="output folder for `step` and `patch` (default bench/results)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile needs a CUDA device")
    device = torch.device("cuda")
    if args.what == "kernels":
        launch_kernels(device)
    elif args.what == "patch":
        profile_patch(device, output_dir(args.out, False), batch=args.batch)
    else:
        profile_step(device, output_dir(args.out, False), batch=args.batch)


if __name__ == "__main__":
    main()
