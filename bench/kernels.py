"""Decode attention over a grid of batch x context x dtype x block size, four implementations side by side.

Columns, all timed on the same device, in the same run, on the same random inputs:
    triton  kvkernels.paged_decode_attention(backend="triton"), a split merged in its last program (split_counters,
            as kvkernels.generate runs it)
    triton fp8 / triton int8   the same kernel over the same K / V quantized to float8_e4m3fn / int8 pages with
            per-token scales (checked against the reference over the same quantized pages; GB/s counts the
            1-byte pages and the 4-byte scales read)
    cuda    kvkernels.paged_decode_attention(backend="cuda")   ("unavailable: <why>" when it cannot load)
    cuda fp8 / cuda int8   the CUDA kernel over the same quantized pages
    torch   kvkernels.reference.paged_decode_attention         (plain PyTorch over the pages)
    sdpa    torch SDPA over a contiguous [B, H_kv, L, D] copy  (the no-paging baseline)
Time: median of triton.testing.do_bench with the L2 flushed (CUDA); a wall-clock median on CPU.
GB/s: K + V bytes actually read (sum of seq lens x H_kv x D x 2 x element size) per second, and
that as a percentage of the device copy bandwidth measured at the start of the same run.

    python -m bench.kernels                 # the full grid (GPU)
    python -m bench.kernels --quick         # tiny shapes, runs on CPU in seconds
    python -m bench.kernels --static        # the static sm_90 model's table (CPU, no GPU needed)
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import kvkernels
from kvkernels import reference, triton_decode
from kvkernels._validate import check_decode_inputs
from kvkernels.ops import resolve_backend

from . import plots
from .common import (DTYPES, Stopwatch, add_run_args, bench_us, default_device, environment, environment_markdown,
                     error_string, fmt, free_device_memory, markdown_table, output_dir, smoke_run_notice,
                     write_json)

COLUMNS = ("triton", "triton_fp8", "triton_int8", "cuda", "cuda_fp8", "cuda_int8", "torch", "sdpa")
COLUMN_TITLES = {"triton": "kvkernels triton", "triton_fp8": "kvkernels triton fp8 pages",
                 "triton_int8": "kvkernels triton int8 pages", "cuda": "kvkernels cuda",
                 "cuda_fp8": "kvkernels cuda fp8 pages", "cuda_int8": "kvkernels cuda int8 pages",
                 "torch": "torch reference", "sdpa": "torch SDPA (contiguous)"}
# column -> (backend, page dtype); each is compared with its backend's own fp16-page column
QUANT_COLUMNS = {"triton_fp8": ("triton", torch.float8_e4m3fn), "triton_int8": ("triton", torch.int8),
                 "cuda_fp8": ("cuda", torch.float8_e4m3fn), "cuda_int8": ("cuda", torch.int8)}
# Agreement with the reference, which accumulates in fp32 and rounds once to the output dtype.
TOLERANCES = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class HeadShape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


SHAPES = {"gpt2": HeadShape("gpt2", 12, 12, 64), "gqa": HeadShape("gqa", 32, 8, 128)}


@dataclass
class KernelGrid:
    batches: tuple = (1, 4, 16, 64)
    contexts: tuple = (256, 1024, 4096, 16384, 32768)
    dtypes: tuple = ("fp16", "bf16")
    block_sizes: tuple = (16, 32)
    shapes: tuple = ("gpt2", "gqa")
    copy_mib: int = 1024          # size of the device-to-device copy that sets the bandwidth ceiling
    cpu_reps: int = 3             # CPU timing only; CUDA uses do_bench's own repetition count
    seed: int = 0


# Contexts that are not multiples of the block size exercise partly filled last pages.
QUICK_GRID = KernelGrid(batches=(1, 2), contexts=(40, 100), dtypes=("fp16",), block_sizes=(16,),
                        copy_mib=64, cpu_reps=2)

# Issue-2 targets (GPT-2 heads): (label, batch, context, test on the triton/cuda cell and the sdpa cell).
TARGETS = (
    ("B=64 x L=16k: >= 90% of copy bandwidth", 64, 16384, lambda cell, sdpa: cell["pct_copy"] >= 90),
    ("B=64 x L=16k: within 5% of SDPA", 64, 16384,
     lambda cell, sdpa: sdpa.get("us") is not None and cell["us"] <= 1.05 * sdpa["us"]),
    ("B=1 x L=16k: >= 2.0 TB/s", 1, 16384, lambda cell, sdpa: cell["gbps"] >= 2000),
    ("B=1 x L=1k: < 8 us", 1, 1024, lambda cell, sdpa: cell["us"] < 8),
)
# Issue-14 targets, both head shapes: (label, batch, context, least speed-up over the same backend's fp16 pages).
QUANT_TARGETS = (
    ("B=1 x L=16k: >= 1.8x the fp16 pages", 1, 16384, 1.8),
    ("B=64 x L=16k: >= 1.8x the fp16 pages", 64, 16384, 1.8),
    ("B=1 x L=1k: no slower than fp16 pages", 1, 1024, 1.0),
)


def copy_bandwidth(device, mib: int) -> dict:
    """Device-to-device copy of `mib` MiB timed like the kernels; bytes moved = read + write."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), device)
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes_moved": nbytes, "us": us, "gbps": nbytes / us / 1e3}


def make_inputs(shape: HeadShape, batch: int, context: int, dtype, block_size: int, device):
    """Random pages behind shuffled block tables; spare blocks and unused tail slots hold NaN.

    Returns q [B, H, D], k_pool / v_pool [num_blocks, block_size, H_kv, D], block_tables int32 [B, M],
    seq_lens int32 [B] and the same K / V as contiguous [B, H_kv, L, D] for SDPA.
    """
    blocks_per_seq = math.ceil(context / block_size)
    used = batch * blocks_per_seq
    num_blocks = used + max(1, used // 16)  # spare NaN blocks: reading one poisons the output
    pool_shape = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    k_pool = torch.randn(pool_shape, dtype=dtype, device=device)
    v_pool = torch.randn(pool_shape, dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, device=device)
    block_tables = perm[:used].view(batch, blocks_per_seq).to(torch.int32)
    k_pool[perm[used:]] = float("nan")
    v_pool[perm[used:]] = float("nan")
    tail = context % block_size
    if tail:
        last_blocks = block_tables[:, -1].long()
        k_pool[last_blocks, tail:] = float("nan")
        v_pool[last_blocks, tail:] = float("nan")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, shape.num_heads, shape.head_dim, dtype=dtype, device=device)
    contiguous = []
    for pool in (k_pool, v_pool):
        dense = torch.empty(batch, shape.num_kv_heads, context, shape.head_dim, dtype=dtype, device=device)
        for b in range(batch):  # one sequence at a time keeps the temporaries small
            dense[b] = pool[block_tables[b].long()].flatten(0, 1)[:context].transpose(0, 1)
        contiguous.append(dense)
    return q, k_pool, v_pool, block_tables, seq_lens, contiguous[0], contiguous[1]


def reference_bytes(shape: HeadShape, batch: int, context: int, element_size: int) -> int:
    """Rough peak of the reference's temporaries: gathered pages, fp32 copies expanded to H heads, scores."""
    per_token = 2 * shape.num_kv_heads * shape.head_dim * element_size * 2 + 2 * shape.num_heads * shape.head_dim * 4 * 2
    return batch * context * per_token


def reference_output(q, k_pool, v_pool, block_tables, seq_lens, shape, budget: int, k_scale=None, v_scale=None):
    """The oracle, a few sequences at a time so the largest points fit in memory."""
    per_seq = reference_bytes(shape, 1, int(k_pool.shape[1] * block_tables.shape[1]), 4)
    chunk = max(1, budget // per_seq)
    return torch.cat([reference.paged_decode_attention(q[i:i + chunk], k_pool, v_pool, block_tables[i:i + chunk],
                                                       seq_lens[i:i + chunk], k_scale=k_scale, v_scale=v_scale,
                                                       validate=False)
                      for i in range(0, q.shape[0], chunk)])


def quantize_pool(pool, cache_dtype):
    """[num_blocks, block_size, H_kv, D] pool -> (pages, fp32 per-token scales [num_blocks, block_size, H_kv]);
    the scales of NaN (free) slots are NaN, so a kernel that reads one still shows it."""
    pages, scales = reference.quantize(pool.flatten(0, 1), cache_dtype)
    scales = torch.where(pool.flatten(0, 1).isnan().any(-1), float("nan"), scales)
    return pages.view(pool.shape), scales.view(pool.shape[:3])


def memory_budget(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return 4 * 2**30


def cuda_backend_status(device) -> str | None:
    """None when backend="cuda" can run here, else the reason it cannot."""
    try:
        resolve_backend("cuda", device)
        return None
    except Exception as err:  # ImportError / RuntimeError from the loader: its message is the answer
        return error_string(err)


def run_point(shape, batch, context, dtype_name, block_size, grid, device, copy_gbps, cuda_unavailable):
    dtype = DTYPES[dtype_name]
    q, k_pool, v_pool, tables, lens, k_dense, v_dense = make_inputs(shape, batch, context, dtype, block_size, device)
    kv_bytes = int(lens.sum()) * shape.num_kv_heads * shape.head_dim * 2 * k_pool.element_size()
    gqa = shape.num_heads != shape.num_kv_heads
    q4 = q.unsqueeze(2)                                                        # [B, H, 1, D]
    sdpa_kwargs = {"enable_gqa": True} if gqa else {}
    out = torch.empty_like(q)  # preallocated: the timed call only launches kernels
    # Triton merges split partitions in its last program, as kvkernels.generate runs it (the kernel leaves them 0)
    counters = torch.zeros(batch, shape.num_kv_heads, dtype=torch.int32, device=device)
    quant = {cache_dtype: (*quantize_pool(k_pool, cache_dtype), *quantize_pool(v_pool, cache_dtype))
             for cache_dtype in {dtype for _, dtype in QUANT_COLUMNS.values()}}  # (k pages, k scales, v pages, v scales)

    def quantized_call(name):
        backend, cache_dtype = QUANT_COLUMNS[name]
        k_pages, k_scale, v_pages, v_scale = quant[cache_dtype]
        return lambda: kvkernels.paged_decode_attention(q, k_pages, v_pages, tables, lens, k_scale=k_scale,
                                                        v_scale=v_scale, backend=backend, validate=False, out=out,
                                                        split_counters=counters if backend == "triton" else None)
    calls = {
        "triton": lambda: kvkernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, backend="triton",
                                                           validate=False, out=out, split_counters=counters),
        "cuda": lambda: kvkernels.paged_decode_attention(q, k_pool, v_pool, tables, lens, backend="cuda",
                                                         validate=False, out=out),
        "torch": lambda: reference.paged_decode_attention(q, k_pool, v_pool, tables, lens, validate=False),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, k_dense, v_dense, **sdpa_kwargs).squeeze(2),
        **{name: quantized_call(name) for name in QUANT_COLUMNS},
    }
    budget = memory_budget(device)
    by_page_dtype = {cache_dtype: reference_output(q, k_pages, v_pages, tables, lens, shape, budget, k_scale, v_scale)
                     for cache_dtype, (k_pages, k_scale, v_pages, v_scale) in quant.items()}
    expected = {name: by_page_dtype[cache_dtype] for name, (_, cache_dtype) in QUANT_COLUMNS.items()}
    expected["fp16"] = reference_output(q, k_pool, v_pool, tables, lens, shape, budget)
    quant_bytes = int(lens.sum()) * shape.num_kv_heads * (shape.head_dim + 4) * 2   # 1-byte pages + fp32 scales
    tol = TOLERANCES[dtype]
    cells = {}
    for name in COLUMNS:
        if name.startswith("cuda") and cuda_unavailable:
            cells[name] = {"status": "unavailable", "error": cuda_unavailable}
            continue
        needed = reference_bytes(shape, batch, context, k_pool.element_size())
        if name == "torch" and needed > budget:
            cells[name] = {"status": "skipped", "error": f"needs ~{needed / 2**30:.1f} GiB of temporaries, "
                                                         f"over the {budget / 2**30:.1f} GiB budget"}
            continue
        try:
            out.fill_(float("nan"))  # poisoned: every element must be written
            with Stopwatch(device) as first_call:  # includes any Triton JIT compile for a new specialisation
                result = calls[name]()
            written = bool(torch.isfinite(result).all())
            want = expected.get(name, expected["fp16"])
            err = (result.float() - want.float()).abs().max().item() if written else float("nan")
            us = bench_us(calls[name], device, cpu_reps=grid.cpu_reps)
        except Exception as exc:  # a failing implementation is a result, shown with its error
            cells[name] = {"status": "failed", "error": error_string(exc)}
            free_device_memory(device)
            continue
        gbps = (quant_bytes if name in QUANT_COLUMNS else kv_bytes) / us / 1e3
        cells[name] = {"status": "ok", "us": us, "first_call_ms": first_call.seconds * 1e3, "gbps": gbps,
                       "pct_copy": 100 * gbps / copy_gbps,
                       "max_abs_err": err, "check": bool(written and err <= tol), "tolerance": tol}
    num_splits = triton_decode.default_num_splits(check_decode_inputs(q, k_pool, v_pool, tables, lens), dtype, device)
    del q, k_pool, v_pool, k_dense, v_dense, expected, by_page_dtype, out, quant
    free_device_memory(device)
    return {"shape": shape.name, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim, "batch": batch, "context": context, "dtype": dtype_name,
            "block_size": block_size, "kv_bytes": kv_bytes, "quantized_kv_bytes": quant_bytes,
            "num_splits": num_splits,
            "columns": cells}


def evaluate_targets(points) -> list:
    """Each issue-2 target for each kvkernels backend, dtype and block size (GPT-2 heads)."""
    rows = []
    combos = sorted({(p["dtype"], p["block_size"]) for p in points if p["shape"] == "gpt2"})
    for label, batch, context, test in TARGETS:
        for dtype, block_size in combos or [("fp16", 16)]:
            match = [p for p in points if (p["shape"], p["dtype"], p["block_size"], p["batch"], p["context"])
                     == ("gpt2", dtype, block_size, batch, context)]
            for backend in ("triton", "cuda"):
                cell = match[0]["columns"][backend] if match else None
                if cell is None:
                    verdict = "not in this run"
                elif cell["status"] != "ok":
                    verdict = f"{cell['status']}"
                else:
                    verdict = "met" if test(cell, match[0]["columns"]["sdpa"]) else "missed"
                rows.append({"target": label, "dtype": dtype, "block_size": block_size, "backend": backend,
                             "verdict": verdict})
    return rows


def evaluate_quant_targets(points) -> list:
    """Each issue-14 target: the fp8 / int8 page cells' speed-up over the same backend's fp16-page cell of the same
    point."""
    rows = []
    combos = sorted({(p["shape"], p["dtype"], p["block_size"]) for p in points})
    for label, batch, context, least in QUANT_TARGETS:
        for shape, dtype, block_size in combos:
            match = [p for p in points if (p["shape"], p["dtype"], p["block_size"], p["batch"], p["context"])
                     == (shape, dtype, block_size, batch, context)]
            for name in QUANT_COLUMNS:
                if not match:
                    verdict, speedup = "not in this run", None
                else:
                    base, cell = match[0]["columns"][QUANT_COLUMNS[name][0]], match[0]["columns"][name]
                    if base["status"] != "ok" or cell["status"] != "ok":
                        verdict, speedup = f"{cell['status']} / fp16 {base['status']}", None
                    else:
                        speedup = base["us"] / cell["us"]
                        verdict = "met" if speedup >= least and cell["check"] else "missed"
                rows.append({"target": label, "shape": shape, "dtype": dtype, "block_size": block_size,
                             "column": name, "speedup": speedup, "verdict": verdict})
    return rows


def _cell_text(cell) -> str:
    if cell["status"] != "ok":
        return cell["status"]
    mark = "" if cell["check"] else " ✗wrong"
    small = cell["gbps"] < 10  # CPU smoke runs: keep a few significant digits
    return (f"{fmt(cell['us'], 1)} µs · {fmt(cell['gbps'], 2 if small else 0)} GB/s "
            f"({fmt(cell['pct_copy'], 1 if small else 0)}%){mark}")


def markdown(result) -> str:
    points, env = result["points"], result["environment"]
    copy = result["copy_bandwidth"]
    full_mib = KernelGrid().copy_mib
    size_note = "" if copy["bytes_moved"] == 2 * full_mib * 2**20 else \
        f" (a full run copies {full_mib:,} MiB; a small copy can sit in cache and run faster or slower)"
    lines = ["# Decode attention kernels", "", environment_markdown(env), "",
             *([smoke_run_notice(env), ""] if result.get("quick") else []),
             *([f"**Partial run: {result['interrupted']}.**", ""] if result.get("interrupted") else []),
             f"Copy bandwidth (device-to-device copy of {copy['bytes_moved'] / 2 / 2**20:,.0f} MiB, read + write "
             f"counted, measured at the start of this run){size_note}: **{fmt(copy['gbps'], 0)} GB/s**. "
             "The % columns are of this copy.", "",
             "Cells: median time · GB/s of K+V read (% of copy bandwidth). `✗wrong` marks an output that "
             "disagreed with the reference (checked once per point, before timing). kvkernels columns are "
             "timed through the public API with `validate=False` (host-side shape checks included). First-call "
             "times (Triton JIT compiles) are in the JSON, outside the medians.", ""]
    for name in COLUMNS:
        reasons = {(c["columns"][name]["status"], c["columns"][name]["error"]) for c in points
                   if c["columns"][name]["status"] != "ok"}
        for status, reason in sorted(reasons):
            lines.append(f"- {COLUMN_TITLES[name]} {status}: {reason}")
    lines += ["", "## Issue-2 targets (GPT-2 heads 12 x 64)", "",
              markdown_table(["target", "dtype", "block", "backend", "verdict"],
                             [[t["target"], t["dtype"], t["block_size"], t["backend"], t["verdict"]]
                              for t in result["targets"]]), "",
              "## Issue-14 targets (fp8 / int8 pages against the same backend's fp16 pages)", "",
              markdown_table(["target", "shape", "dtype", "block", "pages", "speed-up", "verdict"],
                             [[t["target"], t["shape"], t["dtype"], t["block_size"], COLUMN_TITLES[t["column"]],
                               "" if t["speedup"] is None else f"{t['speedup']:.2f}x", t["verdict"]]
                              for t in result["quant_targets"]]), ""]
    groups = sorted({(p["shape"], p["dtype"], p["block_size"]) for p in points})
    for shape_name, dtype, block_size in groups:
        shape = SHAPES[shape_name]
        lines += [f"## {shape_name}: {shape.num_heads} q heads, {shape.num_kv_heads} kv heads, dim "
                  f"{shape.head_dim} · {dtype} · block size {block_size}", ""]
        rows = [[p["batch"], f"{p['context']:,}", p["num_splits"]] + [_cell_text(p["columns"][c]) for c in COLUMNS]
                for p in points if (p["shape"], p["dtype"], p["block_size"]) == (shape_name, dtype, block_size)]
        lines += [markdown_table(["B", "context", "splits"] + [COLUMN_TITLES[c] for c in COLUMNS], rows), ""]
    return "\n".join(lines)


def run(grid: KernelGrid, device, out_dir, *, progress=True, quick=False) -> dict:
    torch.manual_seed(grid.seed)
    env = environment(device)
    copy = copy_bandwidth(device, grid.copy_mib)
    with Stopwatch(device) as cuda_load:  # may JIT-build the extension on first use: reported, not timed in
        cuda_unavailable = cuda_backend_status(device)
    todo = [(SHAPES[s], b, c, d, bs) for s in grid.shapes for d in grid.dtypes for bs in grid.block_sizes
            for b in grid.batches for c in grid.contexts]
    points, interrupted = [], None
    bar = tqdm(todo, desc="kernels", unit="point", disable=not progress)
    try:
        for shape, batch, context, dtype, block_size in bar:
            bar.set_postfix_str(f"{shape.name} {dtype} bs{block_size} B={batch} L={context}")
            points.append(run_point(shape, batch, context, dtype, block_size, grid, device, copy["gbps"],
                                    cuda_unavailable))
    except KeyboardInterrupt:   # a time-limited run (SIGINT) keeps what it measured and says where it stopped
        interrupted = f"interrupted after {len(points)} of {len(todo)} points"
    result = {"benchmark": "kernels", "environment": env, "quick": quick, "config": asdict(grid),
              "copy_bandwidth": copy,
              "cuda_backend": cuda_unavailable or "available", "cuda_backend_load_s": cuda_load.seconds,
              "interrupted": interrupted, "points": points}
    result["targets"] = evaluate_targets(points)
    result["quant_targets"] = evaluate_quant_targets(points)
    write_json(out_dir / "kernels.json", result)
    (out_dir / "kernels.md").write_text(markdown(result) + "\n")
    result["plots"] = [str(p) for p in plots.kernel_bandwidth(result, out_dir)]
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, "tiny grid that runs on CPU in seconds (CI smoke run)")
    parser.add_argument("--batches", type=int, nargs="+", help="override the batch sizes")
    parser.add_argument("--contexts", type=int, nargs="+", help="override the context lengths (tokens)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="override the dtypes")
    parser.add_argument("--block-sizes", type=int, nargs="+", help="override the block (page) sizes")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="head shapes: gpt2 (12 x 64), "
                                                                          "gqa (32 q / 8 kv heads x 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the inputs")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--static", action="store_true", help="print the static sm_90 performance model's table "
                                                              "(kvkernels.static_model) instead of timing")
    return parser.parse_args(argv)


def static_table() -> list:
    """Prints and returns the static model's rows. It compiles real kernels, so it runs in a child process
    without TRITON_INTERPRET (which this process may have set to run Triton on the CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kvkernels.static_model", "--json"], env=env, capture_output=True,
                         text=True, check=True)
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    from kvkernels import static_model
    print(static_model.header())
    print(static_model.markdown(rows))
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.static:
        return {"static": static_table()}
    overrides = {"batches": args.batches, "contexts": args.contexts, "dtypes": args.dtypes,
                 "block_sizes": args.block_sizes, "shapes": args.shapes}
    grid = dataclasses.replace(QUICK_GRID if args.quick else KernelGrid(), seed=args.seed,
                               **{key: tuple(value) for key, value in overrides.items() if value})
    out_dir = output_dir(args.out, args.quick)
    result = run(grid, default_device(), out_dir, progress=not args.no_progress, quick=args.quick)
    print(f"wrote {out_dir / 'kernels.json'}, {out_dir / 'kernels.md'} and {len(result['plots'])} plot(s)")
    return result


if __name__ == "__main__":
    main()
