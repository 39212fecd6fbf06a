"""The CUDA C++ backend: csrc/ compiles (CPU, needs nvcc), clear errors without a GPU, and on a GPU the
CUDA-specific checks: every head dim / dtype / block size and group size against the reference, forced
split layouts with poisoned partial buffers, agreement with Triton, CUDA-graph replay, torch.compile,
and compute-sanitizer. The shared decode suite runs the "cuda" backend through conftest.kernel_backends().
"""
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import kvkernels
from kvkernels import cuda_ext, reference
from kvkernels._validate import check_decode_inputs
from kvkernels.split import MIN_SPLIT_TOKENS

NVCC = shutil.which("nvcc")
COMPILE_ARCHS = ("80", "90")
NAN = float("nan")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ----------------------------------------------------------------------------------------------------
# CPU: csrc/ compiles for sm_80 and sm_90 against torch's headers
# ----------------------------------------------------------------------------------------------------

def _compile_commands(out_dir: Path):
    from torch.utils import cpp_extension

    torch_include = Path(cpp_extension.include_paths()[0])
    flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]]
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU wheel ships c10/cuda without its generated header
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in COMPILE_ARCHS]
    cuda_flags = [*cpp_extension.COMMON_NVCC_FLAGS, "--use_fast_math", "-Xptxas", "-v", *gencode]
    sources = sorted(cuda_ext.CSRC_DIR.glob("*.cu"), key=lambda p: not p.name.startswith("paged_decode"))
    commands = [[NVCC, "-c", str(src), "-o", str(out_dir / f"{src.stem}.o"), *flags, *cuda_flags] for src in sources]
    # ops.cpp is host code: nvcc hands it to the host compiler with the CUDA include path added.
    commands += [[NVCC, "-c", str(cuda_ext.CSRC_DIR / "ops.cpp"), "-o", str(out_dir / "ops.o"), *flags]]
    return commands


@pytest.fixture(scope="module")
def compiled_csrc(tmp_path_factory):
    """csrc/ compiled once for sm_80 and sm_90: (commands, results, the objects' directory)."""
    out_dir = tmp_path_factory.mktemp("csrc")
    commands = _compile_commands(out_dir)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:  # more jobs than cores only thrash
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), commands))
    elapsed = time.perf_counter() - start
    print(f"compiled {len(commands)} sources for sm_{'/sm_'.join(COMPILE_ARCHS)} in {elapsed:.1f} s")
    return commands, results, out_dir


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile csrc/")
def test_csrc_compiles_for_sm80_and_sm90_without_spills(compiled_csrc):
    commands, results, _ = compiled_csrc
    assert len(commands) == len(cuda_ext.SOURCES), "every source in cuda_ext.SOURCES is compiled here"
    for cmd, result in zip(commands, results):
        assert result.returncode == 0, f"{Path(cmd[2]).name} failed to compile:\n{result.stderr[-6000:]}"
    # Every kernel keeps its state in registers: a spill to local memory would slow every decode step.
    ptxas = "".join(r.stderr for r in results)
    spills = re.findall(r"(\d+) bytes spill stores", ptxas)
    assert spills and all(n == "0" for n in spills), f"register spills in ptxas output:\n{ptxas[-4000:]}"
    entries = set(re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", ptxas))
    decode_kernels = {name for name, _ in entries if "paged_decode_kernel" in name}
    # (q dtypes: own pages + fp8 + int8 pages) x head dims x group tiles
    assert len(decode_kernels) == 3 * 3 * len(cuda_ext.SUPPORTED_HEAD_DIMS) * 4
    assert {arch for _, arch in entries} == set(COMPILE_ARCHS)
    # The split count trusts cuda_ext's register table for the occupancy: no sm_90 build may need more.
    # Mangled template arguments: q's type (float, __half, __nv_bfloat16), then the page type: a back-reference
    # to q's (S1_) or float again for its own pages, __nv_fp8_e4m3 or signed char (a) for 1-byte pages.
    kernel = (r"^ '\w*paged_decode_kernelI(f|6__half|13__nv_bfloat16)(f|S1_|13__nv_fp8_e4m3|a)Li\d+ELi(\d+)E\w*' "
              r"for 'sm_90'.*?Used (\d+) registers")
    used = [re.search(kernel, entry, re.DOTALL) for entry in ptxas.split("Compiling entry function")]
    used = [m.groups() for m in used if m]
    assert len(used) == len(decode_kernels), "one register count per sm_90 decode kernel"
    for scalar, pages, tile, registers in used:
        element_size = 1 if pages in ("13__nv_fp8_e4m3", "a") else 4 if scalar == "f" else 2
        key = (element_size, int(tile))
        assert int(registers) <= cuda_ext.SM90_DECODE_REGISTERS[key], (scalar, pages, tile, registers)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile csrc/")
def test_static_model_reads_the_kernels_loop_instructions(compiled_csrc):
    """The static model's instruction-issue cap for the CUDA kernel uses its main loop's sm_90 instruction count
    at the modelled points (q fp16): the table must be the compiled kernel's, within 5% (another nvcc)."""
    from kvkernels import static_model
    _, results, out_dir = compiled_csrc
    assert all(r.returncode == 0 for r in results)
    mangled_pages = {"float16": "S1_", "float8_e4m3fn": "13__nv_fp8_e4m3", "int8": "a"}
    objects = {"float16": "paged_decode_fp16.o", "float8_e4m3fn": "paged_decode_fp8.o", "int8": "paged_decode_int8.o"}
    for (pages, head_dim, tile), table in static_model.CUDA_SM90_LOOP_INSTRUCTIONS.items():
        sass = static_model.cuobjdump_sass_functions(str(out_dir / objects[pages]))
        name = next(n for n in sass if re.search(rf"paged_decode_kernelI6__half{mangled_pages[pages]}Li{head_dim}E"
                                                  rf"Li{tile}E", n))
        instructions = static_model.loop_instructions(sass[name])
        assert abs(instructions - table) <= 0.05 * table, (pages, head_dim, tile, instructions, table)


ROUND_LAYOUT = """
#include <cstdio>
#include "paged_decode.cuh"
using namespace kvkernels;
template <typename KT, int HEAD_DIM>
void print_tiles(const char* pages) {
  printf("%s %d 1 %d\\n", pages, HEAD_DIM, DecodeConfig<KT, HEAD_DIM, 1>::kRoundTokens);
  printf("%s %d 2 %d\\n", pages, HEAD_DIM, DecodeConfig<KT, HEAD_DIM, 2>::kRoundTokens);
  printf("%s %d 4 %d\\n", pages, HEAD_DIM, DecodeConfig<KT, HEAD_DIM, 4>::kRoundTokens);
  printf("%s %d 8 %d\\n", pages, HEAD_DIM, DecodeConfig<KT, HEAD_DIM, 8>::kRoundTokens);
}
template <typename KT>
void print_head_dims(const char* pages) {
  print_tiles<KT, 32>(pages); print_tiles<KT, 64>(pages); print_tiles<KT, 80>(pages);
  print_tiles<KT, 96>(pages); print_tiles<KT, 128>(pages); print_tiles<KT, 256>(pages);
}
int main() {
  print_head_dims<float>("float32");
  print_head_dims<__half>("float16");
  print_head_dims<__nv_bfloat16>("bfloat16");
  print_head_dims<__nv_fp8_e4m3>("float8_e4m3fn");
  print_head_dims<int8_t>("int8");
}
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile csrc/")
def test_static_model_reads_the_kernels_round_layout(tmp_path):
    """The static model's tokens per CTA round (its bytes in flight and split tile) are the compiled kernel's:
    a host program prints csrc's DecodeConfig for every page dtype, head dim and group tile."""
    from kvkernels import static_model
    (tmp_path / "layout.cu").write_text(ROUND_LAYOUT)
    build = subprocess.run([NVCC, "-std=c++17", f"-I{cuda_ext.CSRC_DIR}", "-o", str(tmp_path / "layout"),
                            str(tmp_path / "layout.cu")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    printed = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [line.split() for line in printed if line]
    assert len(rows) == 5 * len(cuda_ext.SUPPORTED_HEAD_DIMS) * 4
    for pages, head_dim, tile, round_tokens in rows:
        quantized = pages in ("float8_e4m3fn", "int8")
        point = static_model.DecodePoint("layout", dtype="float16" if quantized else pages, num_heads=int(tile),
                                         num_kv_heads=1, head_dim=int(head_dim), block_size=16, batch=1, context=1024,
                                         cache_dtype=pages if quantized else None)
        assert static_model.cuda_round_tokens(point) == int(round_tokens), (pages, head_dim, tile)


def test_op_schemas_parse_and_match_the_fake_implementations():
    source = (cuda_ext.CSRC_DIR / "ops.cpp").read_text()
    library = re.search(r"TORCH_LIBRARY\(kvkernels, m\) \{(.*?)\n\}", source, re.S).group(1)
    assert 'm.set_python_module("kvkernels.cuda_ext")' in library  # where register_fake is called from
    definitions = re.findall(r"m\.def\((.*?)\);", library, re.S)
    schemas = [torch._C.parse_schema("".join(re.findall(r'"([^"]*)"', d))) for d in definitions]
    assert {f"kvkernels::{s.name}" for s in schemas} == set(cuda_ext.FAKES)
    for schema in schemas:
        fake = cuda_ext.FAKES[f"kvkernels::{schema.name}"]
        assert [a.name for a in schema.arguments] == list(inspect.signature(fake).parameters)
        assert schema.returns == []
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written == ({"out", "partial_out", "partial_lse"} if schema.name == "paged_decode_attention"
                           else {"k_cache", "v_cache", "k_scale", "v_scale"})  # fp8 / int8 rows' scales
        optional = [a.name for a in schema.arguments if a.has_default_value()]
        assert optional == ["k_scale", "v_scale"]


# ----------------------------------------------------------------------------------------------------
# CPU: clear errors and fallbacks without the extension
# ----------------------------------------------------------------------------------------------------

def test_import_does_not_build_or_warn():
    code = "import kvkernels, kvkernels.cuda_ext as c; assert not c._state.tried, 'import tried to load csrc/'"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "kvkernels CUDA backend unavailable" not in result.stderr


def test_load_warns_once_with_the_reason(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_state", cuda_ext._LoadState())
    monkeypatch.setattr(cuda_ext, "_load_extension", lambda: (None, "nvcc was not found: simulated"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cuda_ext.load() is None
        assert cuda_ext.load() is None
        assert cuda_ext.unavailable_reason() == "nvcc was not found: simulated"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["kvkernels CUDA backend unavailable: nvcc was not found: simulated"]
    with pytest.raises(RuntimeError, match="simulated"):
        cuda_ext.write_kv_cache(None, None, None, None, None)


def test_missing_sources_are_named_in_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_ext, "CSRC_DIR", tmp_path)
    module, reason = cuda_ext._jit_build()
    assert module is None
    assert str(tmp_path) in reason and "ops.cpp" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_cuda_load_returns_none_and_says_why(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_state", cuda_ext._LoadState())
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        assert cuda_ext.load() is None
    assert "no CUDA device" in cuda_ext.unavailable_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")
def test_without_cuda_backend_cuda_raises_and_auto_still_works():
    q, k_cache, v_cache, block_tables, seq_lens = make_case([5, 17], 4, 2, 32, 8, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        kvkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        kvkernels.write_kv_cache(k_cache[0], v_cache[0], k_cache, v_cache, torch.full((8,), -1), backend="cuda")
    out = kvkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, backend="auto")
    expected = reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_misaligned_cache_rows_raise_value_error_before_the_op():
    pool = torch.zeros(4 * 16 * 2 * 64 + 8, dtype=torch.float16)
    cuda_ext.check_rows_aligned(pool[:-8].view(4, 16, 2, 64), "k_cache")                 # aligned: passes
    with pytest.raises(ValueError, match="16-byte boundary"):
        cuda_ext.check_rows_aligned(pool[1:-7].view(4, 16, 2, 64), "k_cache")
    with pytest.raises(ValueError, match="stride 60 of dim 2"):
        cuda_ext.check_rows_aligned(pool[:4 * 16 * 2 * 60].view(4, 16, 2, 60)[..., :56], "v_cache")


def test_quantized_rows_wider_than_the_append_holds_raise_value_error():
    rows = torch.zeros(1, 1, 512)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        cuda_ext.check_quantized_write(rows, torch.zeros(2, 8, 1, 512, dtype=torch.int8))
    cuda_ext.check_quantized_write(rows, torch.zeros(2, 8, 1, 512, dtype=torch.float16))   # a copy: any width
    cuda_ext.check_quantized_write(rows[..., :256], torch.zeros(2, 8, 1, 256, dtype=torch.float8_e4m3fn))


def test_an_older_build_without_scale_arguments_is_refused_by_name():
    """An ahead-of-time kvkernels._C from before fp8 / int8 pages imports fine, but every call would fail on its
    argument count: load() refuses it, saying so."""
    def ops(decode, write):
        op = lambda schema: types.SimpleNamespace(default=types.SimpleNamespace(_schema=torch._C.parse_schema(schema)))
        return types.SimpleNamespace(paged_decode_attention=op(decode), write_kv_cache=op(write))
    source = (cuda_ext.CSRC_DIR / "ops.cpp").read_text()
    library = re.search(r"TORCH_LIBRARY\(kvkernels, m\) \{(.*?)\n\}", source, re.S).group(1)
    current = ["kvkernels::" + "".join(re.findall(r'"([^"]*)"', d)) for d in re.findall(r"m\.def\((.*?)\);", library, re.S)]
    assert cuda_ext.stale_schema(ops(*current)) == ""
    old_decode = ("kvkernels::paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
                  "Tensor seq_lens, float scale, int min_split_tokens, int max_splits, Tensor! out, "
                  "Tensor! partial_out, Tensor! partial_lse) -> ()")
    assert "paged_decode_attention takes no k_scale" in cuda_ext.stale_schema(ops(old_decode, current[1]))


def test_unsupported_shapes_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="head_dim 48"):
        cuda_ext.check_supported(48, 16)
    for block_size in (4, 12, 512):
        with pytest.raises(ValueError, match=f"block_size {block_size}"):
            cuda_ext.check_supported(64, block_size)
    for head_dim in cuda_ext.SUPPORTED_HEAD_DIMS:
        cuda_ext.check_supported(head_dim, 8)


# ----------------------------------------------------------------------------------------------------
# Inputs: ragged lengths, shuffled tables, NaN wherever no sequence reads
# ----------------------------------------------------------------------------------------------------

def make_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cuda", seed=0):
    """q [B, H, D], caches [num_blocks, block_size, H_kv, D] with NaN in every unused slot, shuffled int32
    block_tables [B, M] whose entries past each sequence's last block are -1, int32 seq_lens [B]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(lens)
    max_blocks = math.ceil(max(lens) / block_size) + 1  # a spare column: never read
    num_blocks = batch * max_blocks + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=gen, device=device)[: batch * max_blocks]
    block_tables = block_tables.view(batch, max_blocks).to(torch.int32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
    for b, n in enumerate(lens):
        positions = torch.arange(n, device=device)
        used[block_tables[b, positions // block_size].long(), positions % block_size] = True
        block_tables[b, math.ceil(n / block_size):] = -1
    k_cache[~used] = NAN
    v_cache[~used] = NAN
    q = torch.randn(batch, num_heads, head_dim, generator=gen, device=device).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32, device=device)


def expected_output(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    return reference.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens,
                                            scale=scale)


def assert_matches(out, expected, dtype, factor=1.0):
    assert not out.isnan().any(), "some output elements were not written (or are NaN)"
    tol = TOLERANCE[dtype] * factor
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def run_op(q, k_cache, v_cache, block_tables, seq_lens, max_splits, min_split_tokens=MIN_SPLIT_TOKENS, scale=None,
           k_scale=None, v_scale=None):
    """The raw op with an explicit split count; output and partial buffers start as NaN."""
    batch, num_heads, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.full_like(q, NAN)
    if max_splits > 1:
        partial_out = torch.full((batch, num_heads, max_splits, head_dim), NAN, device=q.device)
        partial_lse = torch.full((batch, num_heads, max_splits), NAN, device=q.device)
    else:  # unused without splits
        partial_out, partial_lse = torch.empty(0, device=q.device), torch.empty(0, device=q.device)
    torch.ops.kvkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, min_split_tokens,
                                               max_splits, out, partial_out, partial_lse, k_scale, v_scale)
    return out


def quantize_case(case, cache_dtype, static=False):
    """make_case's fp pages as fp8 / int8 pages with per-token (or static per-head) fp32 scales. Unused slots keep
    their NaN poison in NaN per-token scales (and NaN fp8 pages). Returns (q, k_pages, v_pages, block_tables,
    seq_lens, k_scale, v_scale)."""
    q, k_cache, v_cache, block_tables, seq_lens = case
    num_blocks, block_size, heads, dim = k_cache.shape
    quantized = []
    for cache in (k_cache, v_cache):
        rows = cache.float().reshape(-1, heads, dim)
        scale = torch.rand(heads, device=cache.device) * 0.01 + 0.02 if static else None
        pages, scales = reference.quantize(rows, cache_dtype, scale)
        scales = torch.where(rows.isnan().any(-1), float("nan"), scales)
        quantized += [pages.view(cache.shape), scale if static else scales.view(num_blocks, block_size, heads)]
    return q, quantized[0], quantized[2], block_tables, seq_lens, quantized[1], quantized[3]


def expected_quantized(q, k_pages, v_pages, block_tables, seq_lens, k_scale, v_scale):
    return reference.paged_decode_attention(q.double(), k_pages, v_pages, block_tables, seq_lens,
                                            k_scale=k_scale, v_scale=v_scale).double()


QUANT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@pytest.fixture(scope="module")
def cuda_backend():
    assert cuda_ext.load() is not None, f"the CUDA extension did not load: {cuda_ext.unavailable_reason()}"


# ----------------------------------------------------------------------------------------------------
# GPU: correctness of every compiled configuration
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_head_dim_dtype_block_size_matches_reference(cuda_backend, dtype, head_dim, block_size):
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 700]  # block edges; 700 splits (capacity > 256)
    case = make_case(lens, 4, 2, head_dim, block_size, dtype, seed=head_dim + block_size)
    expected = expected_output(*case)
    assert_matches(kvkernels.paged_decode_attention(*case, backend="cuda"), expected, dtype)
    assert_matches(run_op(*case, max_splits=1), expected, dtype)  # the direct-write path, no merge


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 7, 8, 12, 16, 32])
def test_grouped_query_heads_match_reference(cuda_backend, group):
    # Groups above 8 split into chunks of heads; 3, 5, 7 and 12 leave heads of the compiled tile idle.
    case = make_case([3, 300, 64], 2 * group, 2, 128, 16, torch.float16, seed=group)
    out = kvkernels.paged_decode_attention(*case, backend="cuda")
    assert_matches(out, expected_output(*case), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("max_splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("min_split_tokens", [16, 256])
def test_forced_split_layouts_with_poisoned_partials(cuda_backend, max_splits, min_split_tokens):
    # min_split_tokens 16 with partitions rounded to whole tiles leaves trailing splits empty: the main
    # kernel must skip them and the merge must never read their NaN partial slots.
    lens = [1, 17, 255, 256, 257, 1000, 2048]
    case = make_case(lens, 4, 4, 64, 16, torch.float32, seed=max_splits)
    out = run_op(*case, max_splits=max_splits, min_split_tokens=min_split_tokens)
    assert_matches(out, expected_output(*case), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("max_splits", [1, 4])
def test_lengths_past_capacity_are_clamped_and_zero_length_is_nan(cuda_backend, max_splits):
    q, k_cache, v_cache, block_tables, seq_lens = make_case([40, 40, 40], 2, 1, 64, 16, torch.float32)
    capacity = block_tables.shape[1] * 16
    k_cache = torch.nan_to_num(k_cache)  # the spare table column's blocks become readable at full capacity
    v_cache = torch.nan_to_num(v_cache)
    block_tables = torch.arange(block_tables.numel(), device="cuda", dtype=torch.int32).view_as(block_tables)
    lens = torch.tensor([capacity + 1000, 0, 40], dtype=torch.int32, device="cuda")
    out = run_op(q, k_cache, v_cache, block_tables, lens, max_splits=max_splits)
    clamped = torch.tensor([capacity, 1, 40], dtype=torch.int32, device="cuda")
    expected = expected_output(q, k_cache, v_cache, block_tables, clamped)
    torch.testing.assert_close(out[[0, 2]].double(), expected[[0, 2]], atol=1e-4, rtol=1e-4)
    assert out[1].isnan().all(), "a zero-length sequence must give NaN, never a plausible answer"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 12, 64), (8, 2, 128), (6, 1, 80)])
def test_cuda_agrees_with_triton(cuda_backend, dtype, num_heads, num_kv_heads, head_dim):
    case = make_case([7, 129, 1500, 33], num_heads, num_kv_heads, head_dim, 16, dtype, seed=num_heads)
    out_cuda = kvkernels.paged_decode_attention(*case, backend="cuda")
    out_triton = kvkernels.paged_decode_attention(*case, backend="triton")
    assert_matches(out_cuda, out_triton.double(), dtype, factor=2.0)


# ----------------------------------------------------------------------------------------------------
# GPU: fp8 / int8 pages (1-byte vectors, per-token or static scales, their own round layout)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("pages", QUANT_DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantized_pages_every_head_dim_and_dtype_match_reference(cuda_backend, pages, head_dim, dtype):
    for block_size in (8, 32):
        lens = [1, block_size, block_size + 1, 700]  # block edges; 700 splits
        case = quantize_case(make_case(lens, 4, 2, head_dim, block_size, dtype, seed=head_dim + block_size),
                             QUANT_DTYPES[pages])
        expected = expected_quantized(*case)
        q, k, v, tables, lens_t, k_scale, v_scale = case
        out = kvkernels.paged_decode_attention(q, k, v, tables, lens_t, k_scale=k_scale, v_scale=v_scale,
                                               backend="cuda")
        assert_matches(out, expected, dtype)
        assert_matches(run_op(q, k, v, tables, lens_t, max_splits=1, k_scale=k_scale, v_scale=v_scale), expected,
                       dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", QUANT_DTYPES)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 12, 32])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_quantized_pages_grouped_heads_and_static_scales(cuda_backend, pages, group, static):
    case = quantize_case(make_case([3, 300, 64], 2 * group, 2, 128, 16, torch.float16, seed=group),
                         QUANT_DTYPES[pages], static=static)
    q, k, v, tables, lens, k_scale, v_scale = case
    out = kvkernels.paged_decode_attention(q, k, v, tables, lens, k_scale=k_scale, v_scale=v_scale, backend="cuda")
    assert_matches(out, expected_quantized(*case), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", QUANT_DTYPES)
@pytest.mark.parametrize("max_splits", [2, 7, 64])
def test_quantized_pages_forced_splits_with_poisoned_partials(cuda_backend, pages, max_splits):
    case = quantize_case(make_case([1, 17, 255, 257, 1000, 2048], 4, 4, 64, 16, torch.float32, seed=max_splits),
                         QUANT_DTYPES[pages])
    q, k, v, tables, lens, k_scale, v_scale = case
    out = run_op(q, k, v, tables, lens, max_splits=max_splits, min_split_tokens=16, k_scale=k_scale,
                 v_scale=v_scale)
    assert_matches(out, expected_quantized(*case), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("pages", QUANT_DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(12, 12, 64), (8, 2, 128)])
def test_quantized_pages_cuda_agrees_with_triton(cuda_backend, pages, num_heads, num_kv_heads, head_dim):
    case = quantize_case(make_case([7, 129, 1500, 33], num_heads, num_kv_heads, head_dim, 16, torch.bfloat16),
                         QUANT_DTYPES[pages])
    q, k, v, tables, lens, k_scale, v_scale = case
    outs = [kvkernels.paged_decode_attention(q, k, v, tables, lens, k_scale=k_scale, v_scale=v_scale, backend=b)
            for b in ("cuda", "triton")]
    assert_matches(outs[0], outs[1].double(), torch.bfloat16, factor=2.0)




@pytest.mark.gpu
def test_strided_views_of_a_larger_pool(cuda_backend):
    # Caches that are a head slice of a wider pool, q a transposed buffer: only the last dims are contiguous.
    q, k_cache, v_cache, block_tables, seq_lens = make_case([90, 5], 4, 2, 96, 16, torch.float16)
    k_pool = torch.randn(*k_cache.shape[:2], 5, 96, device="cuda", dtype=torch.float16)
    v_pool = torch.randn_like(k_pool)
    k_pool[:, :, 1:3] = k_cache
    v_pool[:, :, 1:3] = v_cache
    q_t = q.transpose(0, 1).contiguous().transpose(0, 1)
    case = (q_t, k_pool[:, :, 1:3], v_pool[:, :, 1:3], block_tables, seq_lens)
    out = kvkernels.paged_decode_attention(*case, backend="cuda")
    assert_matches(out, expected_output(q, k_cache, v_cache, block_tables, seq_lens), torch.float16)


@pytest.mark.gpu
def test_bad_inputs_fail_loudly(cuda_backend):
    q, k_cache, v_cache, block_tables, seq_lens = make_case([20], 2, 2, 64, 16, torch.float16)
    with pytest.raises(ValueError, match="head_dim 48"):
        kvkernels.paged_decode_attention(q[..., :48].contiguous(), k_cache[..., :48].contiguous(),
                                         v_cache[..., :48].contiguous(), block_tables, seq_lens, backend="cuda")
    misaligned = torch.empty(k_cache.numel() + 1, device="cuda", dtype=k_cache.dtype)[1:].view_as(k_cache)
    misaligned.copy_(k_cache)
    with pytest.raises(ValueError, match="16-byte"):
        kvkernels.paged_decode_attention(q, misaligned, v_cache, block_tables, seq_lens, backend="cuda")


RAW_OP_ERRORS = """
import torch, kvkernels
from kvkernels import cuda_ext
assert cuda_ext.load() is not None
q = torch.randn(1, 2, 48, device="cuda", dtype=torch.float16)
cache = torch.randn(2, 16, 2, 48, device="cuda", dtype=torch.float16)
tables = torch.zeros(1, 2, device="cuda", dtype=torch.int32)
lens = torch.full((1,), 20, device="cuda", dtype=torch.int32)
empty = torch.empty(0, device="cuda")
try:
    torch.ops.kvkernels.paged_decode_attention(q, cache, cache, tables, lens, 48 ** -0.5, 256, 1, torch.empty_like(q),
                                               empty, empty.clone())
except RuntimeError as e:
    print("RuntimeError:", str(e).splitlines()[0])
"""


@pytest.mark.gpu
def test_raw_op_checks_raise_instead_of_crashing(cuda_backend):
    """The op's own TORCH_CHECK (no Python check in front). On the H100 (torch 2.11, nvcc 13.0) this throw took
    the whole process down (SIGSEGV); a child process reports that as a failure instead of killing the session."""
    run = subprocess.run([sys.executable, "-c", RAW_OP_ERRORS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode} (a negative code is a signal): {run.stderr[-2000:]}"
    assert "RuntimeError: kvkernels: the CUDA decode kernel supports head_dim" in run.stdout, run.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_write_kv_cache_strided_inputs_and_skipped_slots(cuda_backend, dtype):
    num_blocks, block_size, num_kv_heads, head_dim = 6, 8, 3, 80
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_new = torch.randn(head_dim * 2, num_kv_heads, 5, device="cuda", dtype=dtype)[::2].transpose(0, 2)  # any strides
    v_new = torch.randn(5, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    slots = torch.tensor([3, -1, 47, 8, -1], device="cuda")
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(k_new, v_new, k_expected, v_expected, slots)
    kvkernels.write_kv_cache(k_new, v_new, k_cache, v_cache, slots, backend="cuda")
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


# ----------------------------------------------------------------------------------------------------
# GPU: CUDA graphs, torch.compile, the op contract, compute-sanitizer
# ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graph_replay_after_changing_lengths_and_tables(cuda_backend):
    q, k_cache, v_cache, block_tables, seq_lens = make_case([50, 400, 9], 8, 2, 64, 16, torch.float16)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    k_new = torch.randn(3, 2, 64, device="cuda", dtype=torch.float16)
    v_new = torch.randn_like(k_new)
    slots = torch.full((3,), -1, device="cuda")

    def step():
        kvkernels.write_kv_cache(k_new, v_new, k_cache, v_cache, slots, backend="cuda", validate=False)
        return kvkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, backend="cuda",
                                                validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    # A new step: longer sequences, a reshuffled table, slots for the appended tokens.
    num_blocks = k_cache.shape[0]
    block_tables.copy_(torch.randperm(num_blocks, device="cuda")[: block_tables.numel()].view_as(block_tables))
    seq_lens.copy_(torch.tensor([51, 401, 10], dtype=torch.int32, device="cuda"))
    last = (seq_lens.long() - 1)
    slots.copy_(block_tables[torch.arange(3, device="cuda"), last // 16].long() * 16 + last % 16)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(k_new, v_new, k_expected, v_expected, slots)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    eager = kvkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, backend="cuda")
    assert torch.equal(out, eager)
    assert_matches(out, expected_output(q, k_cache, v_cache, block_tables, seq_lens), torch.float16)


@pytest.mark.gpu
def test_torch_compile_fullgraph_traces_the_ops(cuda_backend):
    q, k_cache, v_cache, block_tables, seq_lens = make_case([30, 600], 4, 2, 128, 16, torch.bfloat16)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    shape = check_decode_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    k_new = torch.randn(2, 2, 128, device="cuda", dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    slots = (block_tables[:, 0].long() * 16 + 15)  # overwrite the last slot of each first block

    def step(q, k_new, v_new, k_cache, v_cache, slots, block_tables, seq_lens):
        cuda_ext.write_kv_cache(k_new, v_new, k_cache, v_cache, slots)
        out = torch.empty_like(q)
        cuda_ext.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, shape, 128 ** -0.5, out)
        return out

    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    expected = step(q, k_new, v_new, k_eager, v_eager, slots, block_tables, seq_lens)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, k_new, v_new, k_cache, v_cache, slots, block_tables, seq_lens)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_opcheck_schema_and_fake_implementations(cuda_backend):
    q, k_cache, v_cache, block_tables, seq_lens = make_case([30, 600], 4, 2, 64, 16, torch.float16)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)  # opcheck compares whole buffers
    batch, num_heads, head_dim = q.shape
    for max_splits in (1, 3):
        if max_splits > 1:  # zeros: slots of skipped splits keep them, identically on every run
            partial_out = torch.zeros(batch, num_heads, max_splits, head_dim, device="cuda")
            partial_lse = torch.zeros(batch, num_heads, max_splits, device="cuda")
        else:
            partial_out, partial_lse = torch.zeros(0, device="cuda"), torch.zeros(0, device="cuda")
        args = (q, k_cache, v_cache, block_tables, seq_lens, 0.125, MIN_SPLIT_TOKENS, max_splits, torch.zeros_like(q),
                partial_out, partial_lse)
        torch.library.opcheck(torch.ops.kvkernels.paged_decode_attention.default, args)
    k_new = torch.randn(2, 2, 64, device="cuda", dtype=torch.float16)
    slots = torch.tensor([5, -1], device="cuda")
    torch.library.opcheck(torch.ops.kvkernels.write_kv_cache.default, (k_new, k_new + 1, k_cache, v_cache, slots))
    # fp8 pages: the optional scale arguments, read by the decode and written by the append
    q8, k8, v8, tables8, lens8, k_scale, v_scale = quantize_case(
        (q, k_cache, v_cache, block_tables, seq_lens), torch.float8_e4m3fn)
    torch.library.opcheck(torch.ops.kvkernels.paged_decode_attention.default,
                          (q8, k8, v8, tables8, lens8, 0.125, MIN_SPLIT_TOKENS, 1, torch.zeros_like(q8),
                           torch.zeros(0, device="cuda"), torch.zeros(0, device="cuda"), k_scale, v_scale))
    torch.library.opcheck(torch.ops.kvkernels.write_kv_cache.default, (k_new, k_new + 1, k8, v8, slots, k_scale,
                                                                        v_scale))


SANITIZED_RUN = textwrap.dedent("""
    import torch, kvkernels
    from kvkernels.split import MIN_SPLIT_TOKENS
    torch.manual_seed(0)
    k_cache = torch.randn(12, 16, 2, 64, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(2, 4, 64, device="cuda", dtype=torch.float16)
    tables = torch.tensor([[3, 1, 7, 0, -1, -1], [11, 2, 5, 4, 9, 8]], device="cuda", dtype=torch.int32)
    lens = torch.tensor([50, 96], device="cuda", dtype=torch.int32)
    kvkernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, backend="cuda")
    for max_splits in (1, 4):  # lengths past capacity are clamped, never read beyond the table
        out = torch.empty_like(q)
        partial_out = torch.empty(2, 4, max_splits, 64, device="cuda")
        partial_lse = torch.empty(2, 4, max_splits, device="cuda")
        torch.ops.kvkernels.paged_decode_attention(q, k_cache, v_cache, tables.abs(), lens * 100, 0.125, 16,
                                                   max_splits, out, partial_out, partial_lse)
    kvkernels.write_kv_cache(q[:, :2], q[:, 2:], k_cache, v_cache, torch.tensor([191, -1], device="cuda"),
                             backend="cuda")
    for page_dtype in (torch.float8_e4m3fn, torch.int8):  # 1-byte pages: 8-byte loads, per-token scales
        k_pages = torch.zeros(12, 16, 2, 64, device="cuda", dtype=page_dtype)
        v_pages = torch.zeros_like(k_pages)
        k_scale = torch.ones(12, 16, 2, device="cuda")
        v_scale = torch.ones_like(k_scale)
        slots = torch.arange(192, device="cuda")
        kvkernels.write_kv_cache(k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64), k_pages, v_pages, slots,
                                 k_scale=k_scale, v_scale=v_scale, backend="cuda")
        kvkernels.paged_decode_attention(q, k_pages, v_pages, tables, lens, k_scale=k_scale, v_scale=v_scale,
                                         backend="cuda")
        static = torch.full((2,), 0.02, device="cuda")  # [H_kv]: block and slot strides 0; bf16 rows and q
        kvkernels.write_kv_cache(k_cache.view(-1, 2, 64).bfloat16(), v_cache.view(-1, 2, 64).bfloat16(), k_pages,
                                 v_pages, slots, k_scale=static, v_scale=static.clone(), backend="cuda")
        kvkernels.paged_decode_attention(q.bfloat16(), k_pages, v_pages, tables, lens, k_scale=static,
                                         v_scale=static.clone(), backend="cuda")
        out = torch.empty_like(q)
        torch.ops.kvkernels.paged_decode_attention(q, k_pages, v_pages, tables.abs(), lens * 100, 0.125, 16, 4, out,
                                                   torch.empty(2, 4, 4, 64, device="cuda"),
                                                   torch.empty(2, 4, 4, device="cuda"), k_scale, v_scale)
    torch.cuda.synchronize()
    print("sanitized run done")
""")


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
def test_compute_sanitizer_memcheck_is_clean(cuda_backend, tmp_path):
    script = tmp_path / "decode_run.py"
    script.write_text(SANITIZED_RUN)
    result = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                             sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "sanitized run done" in output, output[-6000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-6000:]


# ----------------------------------------------------------------------------------------------------
# CPU: backend="auto" per shape, and the lazy build's one progress line
# ----------------------------------------------------------------------------------------------------

def decode_shape(num_heads, num_kv_heads, head_dim=64, block_size=16):
    from kvkernels._validate import DecodeShape
    return DecodeShape(batch=4, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=64,
                       block_size=block_size, max_blocks_per_seq=8)


@pytest.fixture
def load_calls(monkeypatch):
    calls = []

    def fake_load(result=object()):
        calls.append(1)
        return result
    monkeypatch.setattr(cuda_ext, "load", fake_load)
    return calls


def test_auto_picks_the_faster_backend_per_shape_class(monkeypatch, load_calls):
    from kvkernels import ops
    monkeypatch.setitem(ops.AUTO_TABLE, True, {"triton": (2.0, 1), "cuda": (2.5, 1)})
    monkeypatch.setitem(ops.AUTO_TABLE, False, {"triton": (2.5, 1), "cuda": (2.5, 2)})  # tie: more bytes in flight
    cuda = torch.device("cuda")
    assert ops.auto_decode_backend(decode_shape(32, 8), cuda) == "cuda"
    assert ops.auto_decode_backend(decode_shape(12, 12), cuda) == "cuda"
    monkeypatch.setitem(ops.AUTO_TABLE, False, {"triton": (2.6, 1), "cuda": (2.5, 2)})
    calls_before = len(load_calls)
    assert ops.auto_decode_backend(decode_shape(12, 12), cuda) == "triton"
    assert len(load_calls) == calls_before, "the CUDA extension is loaded (built) only when it is the pick"


def test_auto_falls_back_to_triton_where_cuda_cannot_run(monkeypatch, load_calls):
    from kvkernels import ops
    monkeypatch.setitem(ops.AUTO_TABLE, True, {"triton": (2.0, 1), "cuda": (2.5, 1)})
    cuda = torch.device("cuda")
    assert ops.auto_decode_backend(decode_shape(32, 8, head_dim=40), cuda) == "triton"   # no such kernel
    assert ops.auto_decode_backend(decode_shape(32, 8, block_size=4), cuda) == "triton"
    assert not load_calls, "unsupported shapes never trigger a build"
    monkeypatch.setattr(cuda_ext, "load", lambda: None)  # extension unavailable (no nvcc, failed build)
    assert ops.auto_decode_backend(decode_shape(32, 8), cuda) == "triton"


def test_auto_table_names_its_source_and_covers_both_backends():
    from kvkernels import ops
    assert "static model" in ops.AUTO_SOURCE or "GPU run" in ops.AUTO_SOURCE
    for grouped in (False, True):
        assert set(ops.AUTO_TABLE[grouped]) == {"triton", "cuda"}


def test_jit_build_prints_one_progress_line(monkeypatch, capsys, tmp_path):
    from torch.utils import cpp_extension
    built = []
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw) or (_ for _ in ()).throw(
        RuntimeError("simulated compiler error")))
    monkeypatch.setenv("KVKERNELS_BUILD_DIR", str(tmp_path))
    module, reason = cuda_ext._jit_build()
    assert module is None and "simulated compiler error" in reason and len(built) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvkernels: loading the CUDA extension") and str(tmp_path) in lines[0]
    assert "sm_90" in lines[0]
