"""Static performance model of the decode kernels on an H100 (sm_90), built on the CPU.

Compiles each launch exactly as `JITFunction.run` would specialise it (triton's own binder on the real
arguments: 16-byte aligned pointers and ints divisible by 16 carry `tt.divisibility`, ints equal to 1
become constants), then reads the cubin: registers, spills, shared memory, the global loads of the main
loop and their widths. From those it models CTAs per SM, waves, and the bytes one CTA keeps in flight.

Bytes in flight: the loop body is walked as a cycle; a *load group* is a run of global loads issued
before any instruction reads a register one of them writes. Loads in one group overlap in DRAM, groups
follow each other by a full DRAM latency, so a tile costs `serial_load_groups` latencies and one CTA
keeps on average its tile's bytes divided by that count in flight. By Little's law an H100 needs about
HBM_BYTES_PER_S * DRAM_LATENCY_S / SMS (about 15.5 KB) in flight per SM to stream at full bandwidth;
the modelled TB/s streams each wave at min(peak, its bytes in flight / latency).

Instruction issue: a loop that spends many instructions per byte cannot stream however many bytes it keeps in
flight. The H100 run (bench/results/kernels, triton 3.6, 2026-11-24) measured the quantized kernels at 1.5-2.0
TB/s where the bandwidth model said 3.0: their loops issued 1.6-3.8x fp16 pages' warp instructions per page
byte and sustained 2.5-3.0 (one head) and 3.3-3.7 (grouped heads) warp instructions per SM per ns
(`--issue-rates`, bench/results/issue_rates_h100_2026-11-24.md), so the decode kernel's modelled TB/s is also
capped at ISSUE_RATE / (its loop's warp instructions per K/V byte, scales included), ISSUE_RATE the highest
rate a Triton loop sustained (about 47% of the 4 warp instructions per clock an SM can issue, at 1.98 GHz).
An upper bound: the one-head loops ran 20-30% under it.
The CUDA kernel (csrc/) is modelled from its sm_90 register table (kvkernels/cuda_ext.py) and, at the modelled
points, its main loop's instruction count (CUDA_SM90_LOOP_INSTRUCTIONS).

Needs a triton with the NVIDIA backend and TRITON_INTERPRET unset: run it in its own process
(`python -m kvkernels.static_model`, `python -m kvkernels.static_model --quant` for fp8 / int8 pages
against fp16, `python -m kvkernels.static_model --issue-rates bench/results/kernels/*/kernels.json`,
`python -m bench.kernels --static`, tests/compile_sm90.py).
"""
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import cuda_ext, split, triton_decode
from ._validate import check_decode_inputs

SMS = 132  # H100 SXM
HBM_BYTES_PER_S = 3.0e12
DRAM_LATENCY_S = 700e-9
TARGET_BYTES_IN_FLIGHT_PER_SM = HBM_BYTES_PER_S * DRAM_LATENCY_S / SMS
ISSUE_RATE = 3.7e9  # warp instructions per SM per second the decode loops sustained on the H100 (see above)


@dataclasses.dataclass(frozen=True)
class DecodePoint:
    name: str
    dtype: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    batch: int
    context: int
    cache_dtype: str = None  # "float8_e4m3fn" / "int8" pages with per-token scales; None: dtype's pages


GPT2 = dict(dtype="float16", num_heads=12, num_kv_heads=12, head_dim=64, block_size=16)
GQA = dict(dtype="float16", num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
POINTS = [
    DecodePoint("gpt2 B=1 x 1k", batch=1, context=1024, **GPT2),
    DecodePoint("gpt2 B=1 x 16k", batch=1, context=16384, **GPT2),
    DecodePoint("gpt2 B=16 x 4k", batch=16, context=4096, **GPT2),
    DecodePoint("gpt2 B=64 x 16k", batch=64, context=16384, **GPT2),
    DecodePoint("gqa32/8 d128 B=1 x 16k", batch=1, context=16384, **GQA),
    DecodePoint("gqa32/8 d128 B=16 x 4k", batch=16, context=4096, **GQA),
]


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@functools.lru_cache(maxsize=None)
def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    target = GPUTarget("cuda", 90, 32)
    return target, make_backend(target)


def compile_launch(fn, args, kwargs):
    """The sm_90 CompiledKernel a launch `fn[grid](*args, **kwargs)` would build, via triton's own binder."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature
    target, backend = _backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_GLOBAL_LOAD = re.compile(r"^(LDG|LDGSTS)\b")


def _cuobjdump_run(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def _load_bytes_per_thread(opcode: str) -> int:
    width = re.search(r"\.(128|64|U16|S16|U8|S8)\b", opcode)
    return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[width.group(1)] if width else 4


def _registers(text: str) -> set:
    regs = set()
    for base, pair in re.findall(r"\bR(\d+)(\.64)?", text):
        regs.update(range(int(base), int(base) + (2 if pair else 1)))
    return regs


def _dests_and_sources(opcode: str, operands: str):
    """Registers an instruction writes and reads (its first operand is the destination unless it stores)."""
    first, _, rest = operands.partition(",")
    if opcode.startswith(("ST", "RED", "ATOM", "BAR", "BRA", "EXIT", "LDGSTS", "DEPBAR")) or \
            not re.fullmatch(r"R\d+", first.strip()):
        return set(), _registers(operands)
    base = int(first.strip()[1:])
    count = max(1, _load_bytes_per_thread(opcode) // 4) if opcode.startswith("LD") else 1
    return set(range(base, base + count)), _registers(rest)


def _main_loop(instructions):
    """The backward branch's body holding the most global-load bytes: the kernel's per-tile loop."""
    address = {a: i for i, (a, _, _) in enumerate(instructions)}
    best = None
    for i, (addr, opcode, operands) in enumerate(instructions):
        target = re.match(r"\s*(0x[0-9a-f]+)", operands) if opcode == "BRA" else None
        if not target or int(target.group(1), 16) >= addr or int(target.group(1), 16) not in address:
            continue
        body = instructions[address[int(target.group(1), 16)]:i + 1]
        load_bytes = sum(_load_bytes_per_thread(o) for _, o, _ in body if _GLOBAL_LOAD.match(o))
        if best is None or load_bytes > best[0]:
            best = (load_bytes, body)
    return best[1] if best else []


def _load_groups(body):
    """Global-load groups of the loop body walked as a cycle: [(bytes per thread, loads)], in issue order."""
    groups, n, i = [], len(body), 0
    while i < n:
        if not _GLOBAL_LOAD.match(body[i][1]):
            i += 1
            continue
        pending, group_bytes, loads, j = set(), 0, 0, i
        while j < i + n:  # a group can run on into the next tile's loads (prefetch)
            _, opcode, operands = body[j % n]
            dests, sources = _dests_and_sources(opcode, operands)
            if sources & pending or opcode.startswith("DEPBAR"):
                break  # the first consumer of a load in flight: the group's latency is paid here
            if _GLOBAL_LOAD.match(opcode):
                group_bytes += _load_bytes_per_thread(opcode)
                loads += 1
                pending |= dests
            else:
                pending -= dests
            j += 1
        groups.append((group_bytes, loads))
        i = j if j < n else n
    return groups


def _instructions(sass: str) -> list:
    """[(address, opcode, operands)] of one function's SASS."""
    return [(int(a, 16), op, ops) for a, _, op, ops in _INSTR.findall(sass)]


def loop_instructions(sass: str) -> int:
    """Instructions in the main loop of one function's SASS."""
    return len(_main_loop(_instructions(sass)))


def cuobjdump_sass_functions(path: str) -> dict:
    """{mangled name: SASS} of every sm_90 function in a cubin or an object file with an embedded fatbin."""
    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", "sm_90", path], capture_output=True, text=True,
                          check=True).stdout
    parts = re.split(r"\n\s+Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


def analyse(kernel) -> dict:
    """Resource usage and the main loop's loads of a CompiledKernel for sm_90."""
    usage = _RESOURCES.search(_cuobjdump_run(kernel.asm["cubin"], "--dump-resource-usage"))
    regs, stack, static_shared, local = (int(g) for g in usage.groups())
    sass = _cuobjdump_run(kernel.asm["cubin"], "-sass")
    instructions = _instructions(sass)
    body = _main_loop(instructions)
    loads = [op for _, op, _ in body if _GLOBAL_LOAD.match(op)]
    groups = _load_groups(body)
    warps = kernel.metadata.num_warps
    shared = max(static_shared, kernel.metadata.shared)
    widths = {}
    for op in loads:
        bits = _load_bytes_per_thread(op) * 8
        widths[bits] = widths.get(bits, 0) + 1
    return dict(
        regs=regs, spill_bytes=stack + local, shared=shared, warps=warps,
        ctas_per_sm=split.ctas_per_sm(regs, shared, warps),
        loop_instructions=len(body), loads_per_tile=len(loads), load_widths=widths,
        serial_load_groups=len(groups),
        bytes_per_tile=sum(_load_bytes_per_thread(op) for op in loads) * 32 * warps,
        # a tile's bytes over the DRAM latencies it waits in series: the mean bytes in flight (Little's law)
        bytes_in_flight_per_cta=sum(_load_bytes_per_thread(op) for op in loads) * 32 * warps // max(1, len(groups)),
        barriers_per_tile=sum(op.startswith("BAR") for _, op, _ in body),
        shuffles_per_tile=sum(op.startswith("SHFL") for _, op, _ in body),
        split_counter_ordered=_split_counter_ordered([op for _, op, _ in instructions]),
    )


def _split_counter_ordered(ops):
    """For a kernel whose programs count finished splits with an atomic add (the folded merge): whether a
    CTA barrier and then a GPU-scope fence come before the add with no store between (every thread's partials
    are released with it), and an L1 invalidation right after it (the merge then reads the other programs'
    partials, not stale lines). None for a kernel without such an add."""
    adds = [i for i, op in enumerate(ops) if op.startswith("ATOMG") and ".ADD" in op]
    if not adds:
        return None
    add = adds[0]
    barrier = max((i for i, op in enumerate(ops[:add]) if op.startswith("BAR.SYNC")), default=None)
    if barrier is None:
        return False
    between = ops[barrier + 1:add]
    fenced = any(op.startswith("MEMBAR") and op.endswith(".GPU") for op in between)
    stores = any(op.startswith(("STG", "ST.", "RED")) for op in between)
    invalidated = any(op.startswith("CCTL.IVALL") for op in ops[add + 1:add + 4])
    return fenced and not stores and invalidated


def _point_tensors(point: DecodePoint):
    dtype = getattr(torch, point.dtype)
    cache_dtype = getattr(torch, point.cache_dtype or point.dtype)
    blocks = point.context // point.block_size
    q = torch.empty(point.batch, point.num_heads, point.head_dim, dtype=dtype)
    cache = torch.empty(2, point.block_size, point.num_kv_heads, point.head_dim, dtype=cache_dtype)
    scales = torch.empty(2, point.block_size, point.num_kv_heads) if point.cache_dtype else None
    tables = torch.zeros(point.batch, blocks, dtype=torch.int32)
    lens = torch.full((point.batch,), point.context, dtype=torch.int32)
    return q, cache, cache, tables, lens, scales


def point_launches(point: DecodePoint, num_splits: int, fold_merge: bool = False):
    """[(kernel, args, kwargs, grid)] of a decode at `point` with `num_splits` (small stand-in tensors with
    the real strides: only strides, alignment and ints decide the specialisation); fold_merge: with split
    counters, as kvkernels.generate launches it (the merge in the decode kernel)."""
    q, k_cache, v_cache, tables, lens, scales = _point_tensors(point)
    shape = check_decode_inputs(q, k_cache, v_cache, tables, lens)
    config = triton_decode.decode_config(shape, q.dtype, k_cache.dtype)
    counters = torch.zeros(point.batch, point.num_kv_heads, dtype=torch.int32) if fold_merge else None
    return triton_decode.decode_launches(q, k_cache, v_cache, tables, lens, shape, 1.0, torch.empty_like(q), config,
                                         num_splits, split_counters=counters, k_scale=scales, v_scale=scales)


def point_splits(point: DecodePoint, sms: int = SMS) -> int:
    """The split count a launch on `sms` SMs picks: from the compiled split kernel's occupancy, as on the GPU."""
    fn, args, kwargs, _ = point_launches(point, num_splits=2)[0]
    occupancy = analyse(compile_launch(fn, args, kwargs))["ctas_per_sm"]
    tile = kwargs["TILE_N"]
    return split.choose_num_splits(point.batch, point.num_kv_heads, point.context, sms, occupancy, tile)


def model_point(point: DecodePoint, sms: int = SMS) -> list:
    """The launches a decode at `point` makes on an H100, each compiled and analysed."""
    num_splits = point_splits(point, sms)
    rows = []
    for fn, args, kwargs, grid in point_launches(point, num_splits):
        row = analyse(compile_launch(fn, args, kwargs))
        row.update(point=point.name, kernel=fn.__name__.strip("_"), splits=num_splits,
                   programs=grid[0] * grid[1] * grid[2])
        if fn is triton_decode._paged_decode_kernel:
            row["instructions_per_kv_byte"] = round(
                row["loop_instructions"] * row["warps"] / (kwargs["TILE_N"] * kv_row_bytes(point) * 2), 4)
        _throughput(row, sms)
        rows.append(row)
    return rows


def cuda_round_tokens(point: DecodePoint) -> int:
    """Tokens one CTA of csrc's decode kernel loads per round (csrc/paged_decode.cuh DecodeConfig): 16-byte
    vectors, 8-byte ones for 1-byte pages, whose lane groups take twice the tokens up to a group tile of 4."""
    page_bytes = getattr(torch, point.cache_dtype or point.dtype).itemsize
    vec_bytes = 8 if page_bytes == 1 else 16
    vecs = point.head_dim * page_bytes // vec_bytes
    lanes = min(1 << (vecs - 1).bit_length(), 32)
    _, group_tile = cuda_ext.head_chunking(point.num_heads // point.num_kv_heads)
    tokens = (2 if group_tile >= 4 else 4) * (2 if vec_bytes == 8 and group_tile <= 4 else 1)
    return 128 // lanes * tokens


# Main-loop instructions of csrc's decode kernel on sm_90 for the modelled points, q fp16: (page dtype, head dim,
# group tile) -> instructions per round (nvcc 13.0, 2026-11-24; tests/test_cuda_ext.py reads them from the build).
CUDA_SM90_LOOP_INSTRUCTIONS = {("float16", 64, 1): 321, ("float8_e4m3fn", 64, 1): 848, ("int8", 64, 1): 932,
                               ("float16", 128, 4): 432, ("float8_e4m3fn", 128, 4): 910, ("int8", 128, 4): 943}


def model_cuda_point(point: DecodePoint, sms: int = SMS) -> dict:
    """The CUDA kernel at `point` from its sm_90 register table: a round's K and V rows (and fp8 / int8 pages'
    scales) issued together, the next round's table entry looked up ahead (one DRAM latency per round); capped by
    instruction issue where CUDA_SM90_LOOP_INSTRUCTIONS has the point."""
    page_bytes = getattr(torch, point.cache_dtype or point.dtype).itemsize
    group = point.num_heads // point.num_kv_heads
    chunks, group_tile = cuda_ext.head_chunking(group)
    ctas = cuda_ext.decode_ctas_per_sm(page_bytes, group)
    splits = cuda_ext.num_splits(point.batch, point.num_kv_heads, group, point.context, sms, page_bytes)
    programs = point.batch * point.num_kv_heads * chunks * splits
    round_bytes = cuda_round_tokens(point) * kv_row_bytes(point) * 2
    row = dict(point=point.name, kernel="cuda paged_decode_kernel", splits=splits, programs=programs,
               ctas_per_sm=ctas, bytes_in_flight_per_cta=round_bytes)
    instructions = CUDA_SM90_LOOP_INSTRUCTIONS.get((point.cache_dtype or point.dtype, point.head_dim, group_tile))
    if point.dtype == "float16" and instructions:
        row["instructions_per_kv_byte"] = round(instructions * (cuda_ext.DECODE_THREADS // 32) / round_bytes, 4)
    return _throughput(row, sms)


def _throughput(row: dict, sms: int) -> dict:
    """Adds waves, bytes in flight per SM and the modelled TB/s: each wave streams at
    min(peak, its resident CTAs' bytes in flight / latency) (Little's law), so a tail wave costs only
    where it holds too few CTAs to keep HBM busy; a loop with instructions_per_kv_byte streams at most
    ISSUE_RATE's worth (issue_tb_s)."""
    slots = row["ctas_per_sm"] * sms
    full_waves, tail = divmod(row["programs"], slots)
    wave_sizes = [slots] * full_waves + ([tail] if tail else [])
    tb_s = 0.0
    if row["bytes_in_flight_per_cta"]:
        # every CTA streams the same bytes: a wave of n CTAs takes n / rate(n) in those units
        rates = [min(HBM_BYTES_PER_S, n * row["bytes_in_flight_per_cta"] / DRAM_LATENCY_S) for n in wave_sizes]
        tb_s = row["programs"] / sum(n / r for n, r in zip(wave_sizes, rates)) / 1e12
    if row.get("instructions_per_kv_byte"):
        row["issue_tb_s"] = round(ISSUE_RATE * sms / row["instructions_per_kv_byte"] / 1e12, 2)
        tb_s = min(tb_s, row["issue_tb_s"])
    row.update(waves=round(row["programs"] / slots, 2),
               bytes_in_flight_per_sm=int(row["bytes_in_flight_per_cta"] * min(row["programs"], slots) / sms),
               modelled_tb_s=round(tb_s, 2))
    return row


def table(points=POINTS) -> list:
    return [row for point in points for row in model_point(point) + [model_cuda_point(point)]]


COLUMNS = ["point", "kernel", "splits", "programs", "warps", "regs", "spill_bytes", "shared", "ctas_per_sm", "waves",
           "loads_per_tile", "load_widths", "bytes_per_tile", "serial_load_groups", "bytes_in_flight_per_cta", "bytes_in_flight_per_sm",
           "instructions_per_kv_byte", "issue_tb_s", "modelled_tb_s", "loop_instructions", "barriers_per_tile",
           "shuffles_per_tile"]


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [", ".join(f"{n}x{w}b" for w, n in sorted(row.get(c, {}).items())) if c == "load_widths"
                 else str(row.get(c, "")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header() -> str:
    from importlib.metadata import version
    return (f"static model: sm_90, triton {version('triton')}, {SMS} SMs, {HBM_BYTES_PER_S / 1e12:.1f} TB/s, "
            f"{DRAM_LATENCY_S * 1e9:.0f} ns DRAM latency: {TARGET_BYTES_IN_FLIGHT_PER_SM / 1024:.1f} KB in flight "
            "per SM keeps HBM busy")


# Issue 14's speed points: fp8 / int8 pages against fp16 pages.
QUANT_POINTS = [p for p in POINTS if p.name in ("gpt2 B=1 x 1k", "gpt2 B=1 x 16k", "gpt2 B=64 x 16k",
                                                 "gqa32/8 d128 B=1 x 16k")] + [
    DecodePoint("gqa32/8 d128 B=64 x 16k", batch=64, context=16384, **GQA)]


def kv_row_bytes(point: DecodePoint) -> int:
    """Bytes of one token's K (or V) row of one KV head: the page row, and its fp32 scale for fp8 / int8 pages."""
    return point.head_dim * getattr(torch, point.cache_dtype or point.dtype).itemsize + (4 if point.cache_dtype else 0)


def kv_bytes(point: DecodePoint) -> int:
    """K + V bytes a decode at `point` reads: pages, and per-token fp32 scales for fp8 / int8 pages."""
    return point.batch * point.context * point.num_kv_heads * kv_row_bytes(point) * 2


def quant_speedups(points=QUANT_POINTS) -> list:
    """Per point, backend and page dtype: the main decode kernel's modelled time (K/V bytes / modelled TB/s; the
    merge and launch overheads left out, so short contexts are flattered) and its speed-up over the same backend's
    fp16 pages."""
    rows = []
    for point in points:
        for backend, model in (("triton", lambda p: model_point(p)[0]), ("cuda", model_cuda_point)):
            base_us = None
            for cache_dtype in (None, "float8_e4m3fn", "int8"):
                quant_point = dataclasses.replace(point, cache_dtype=cache_dtype)
                main_row = model(quant_point)
                us = kv_bytes(quant_point) / (main_row["modelled_tb_s"] * 1e12) * 1e6
                base_us = base_us or us
                rows.append(dict(point=point.name, backend=backend, pages=cache_dtype or point.dtype,
                                 splits=main_row["splits"],
                                 ctas_per_sm=main_row["ctas_per_sm"], waves=main_row["waves"],
                                 bytes_in_flight_per_sm=main_row["bytes_in_flight_per_sm"],
                                 modelled_tb_s=main_row["modelled_tb_s"],
                                 kv_mib=round(kv_bytes(quant_point) / 2**20, 2), modelled_us=round(us, 2),
                                 speedup=round(base_us / us, 2)))
    return rows


def measured_issue_rates(kernels_json: str, min_batch: int = 16, min_context: int = 4096) -> list:
    """The warp instructions per SM per ns each Triton cell of a `bench.kernels` JSON sustained: its measured time
    against the loop instructions of this checkout's kernel at that point (calibrates ISSUE_RATE). Only meaningful
    on the code that was timed (the JSON's git_commit), which `main` prints beside the table. Large points only,
    where the kernel, not the launch, is timed."""
    with open(kernels_json) as f:
        run = json.load(f)
    rows = []
    for cell in run["points"]:
        if cell["batch"] < min_batch or cell["context"] < min_context:
            continue
        heads = dict(num_heads=cell["num_heads"], num_kv_heads=cell["num_kv_heads"], head_dim=cell["head_dim"],
                     block_size=cell["block_size"], dtype={"fp16": "float16", "bf16": "bfloat16"}[cell["dtype"]])
        for column, cache_dtype in (("triton", None), ("triton_fp8", "float8_e4m3fn"), ("triton_int8", "int8")):
            timing = cell["columns"].get(column, {})
            if timing.get("status") != "ok":
                continue
            point = DecodePoint(cell["shape"], batch=cell["batch"], context=cell["context"], cache_dtype=cache_dtype,
                                **heads)
            fn, args, kwargs, _ = point_launches(point, max(2, cell["num_splits"]))[0]
            loop = analyse(compile_launch(fn, args, kwargs))
            tiles = point.batch * point.num_kv_heads * -(-point.context // kwargs["TILE_N"])
            rate = tiles * loop["loop_instructions"] * loop["warps"] / SMS / (timing["us"] * 1e3)
            rows.append(dict(point=f"{cell['shape']} {cell['dtype']} B={point.batch} x {point.context} "
                                   f"block {point.block_size}", column=column, us=round(timing["us"], 1),
                             tb_s=round(timing["gbps"] / 1e3, 2), loop_instructions=loop["loop_instructions"],
                             warp_instructions_per_sm_ns=round(rate, 2)))
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--issue-rates" in argv:
        paths = argv[argv.index("--issue-rates") + 1:]
        for path in paths:
            with open(path) as f:
                print(f"{path}: timed at commit {json.load(f)['environment'].get('git_commit')}; loop instructions "
                      "from this checkout's kernels (compare only on the timed code)")
        rows = [row for path in paths for row in measured_issue_rates(path)]
        if not rows:
            sys.exit("no Triton cell at B >= 16 and L >= 4k in " + ", ".join(paths))
        print("| " + " | ".join(rows[0]) + " |\n|" + " --- |" * len(rows[0]))
        print("\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows))
        return
    if "--quant" in argv:
        rows = quant_speedups()
        print(header())
        columns = list(rows[0])
        print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
        print("\n".join("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows))
        return
    rows = table()
    if "--json" in argv:
        print(json.dumps(rows))
    else:
        print(header())
        print(markdown(rows))


if __name__ == "__main__":
    main()
