"""What the benchmark numbers point at: the decode kernels under Nsight Compute, and one decode step of
kvkernels.generate under the torch profiler (kernels per step, busy time, gaps). GPU only.

    ncu --kernel-name regex:decode --csv --page details python -m bench.profile kernels   # launches for ncu
    python -m bench.profile step --out DIR          # writes DIR/profile_step.{json,md}

`kernels` launches the Triton and CUDA decode kernels twice at each target point of the kernel grid (GPT-2
heads, fp16, block 16): the first launch compiles, ncu reads the second (`--launch-skip` is not needed when
the report keeps both). `step` generates twice with the same prompt, N and 3N new tokens, and takes the
difference of the two runs, so prefill, capture and compilation cancel out and what is left is 2N decode steps.
"""
import argparse
import statistics
import time

import torch

import kvkernels

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("kernels", "step"))
    parser.add_argument("--out", default=None, help="output folder for `step` (default bench/results)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile needs a CUDA device")
    device = torch.device("cuda")
    if args.what == "kernels":
        launch_kernels(device)
    else:
        profile_step(device, output_dir(args.out, False), batch=args.batch)


if __name__ == "__main__":
    main()
