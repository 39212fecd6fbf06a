"""The CUDA C++ backend (csrc/): loading, and thin wrappers over its ops.

`load()` imports `kvkernels._C` when it was built ahead of time (`KVKERNELS_BUILD_CUDA=1 pip install -e .`),
otherwise JIT-builds csrc/ with ninja for the current GPU's architecture (cached between runs in torch's
extension directory, or in $KVKERNELS_BUILD_DIR). Either way the library registers
`torch.ops.kvkernels.paged_decode_attention` and `torch.ops.kvkernels.write_kv_cache` (schemas in
csrc/ops.cpp); this module adds their fake implementations so they trace under torch.compile.
Without a GPU, nvcc or a working build, `load()` warns once with the reason and returns None.
"""
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from .split import MIN_SPLIT_TOKENS, choose_num_splits, ctas_per_sm, num_sms

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 256
MAX_QUANTIZED_HEAD_DIM = 256  # csrc/kvkernels.h kMaxQuantizedHeadDim
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("ops.cpp", "paged_decode_fp16.cu", "paged_decode_bf16.cu", "paged_decode_fp32.cu", "paged_decode_fp8.cu",
           "paged_decode_int8.cu", "write_kv.cu")
_JIT_NAME = "kvkernels_cuda"
# Registers per thread of csrc's decode kernel on sm_90, the most over head dims (and, for 1-byte fp8 / int8
# pages, over q's dtypes), by (page element bytes, group tile): `ptxas -v`, nvcc 13.0, 2026-11-24
# (tests/test_cuda_ext.py's compile test fails if a build needs more). With its 128 threads and at most 1056 bytes
# of shared memory they give the CTAs per SM the split uses.
SM90_DECODE_REGISTERS = {(1, 1): 112, (1, 2): 122, (1, 4): 158, (1, 8): 216,
                         (2, 1): 72, (2, 2): 96, (2, 4): 123, (2, 8): 222,
                         (4, 1): 107, (4, 2): 122, (4, 4): 134, (4, 8): 223}
DECODE_THREADS, DECODE_SHARED_BYTES = 128, 1056
MAX_GROUP_TILE = 8  # csrc/kvkernels.h kMaxGroupTile
# Shown in the build error's place: ninja's full log is long, its end says what failed.
_ERROR_TAIL_CHARS = 3000


class _LoadState:
    tried = False
    module = None  # the loaded extension module, or None
    reason = ""    # why module is None


# A plain module global rather than functools.lru_cache: torch.compile reads it as a constant.
_state = _LoadState()


def load():
    """The loaded extension module (its ops live under torch.ops.kvkernels), or None if unavailable.

    Tries once per process; on failure warns once, saying why (see `unavailable_reason()`).
    """
    if not _state.tried:
        _state.tried = True
        module, reason = _load_extension()
        if module is not None:
            try:
                _register_fakes()
            except Exception as e:  # eager calls would work, torch.compile would not: refuse both, loudly
                module, reason = None, f"registering the ops' fake implementations failed: {e}"
        _state.module, _state.reason = module, reason
        if module is None:
            warnings.warn(f"kvkernels CUDA backend unavailable: {reason}", RuntimeWarning, stacklevel=2)
    return _state.module


def unavailable_reason() -> str:
    """Why `load()` returns None ("" when the extension loaded)."""
    load()
    return _state.reason


def _load_extension():
    """Returns (module, "") or (None, reason)."""
    if not torch.cuda.is_available():
        return None, (f"no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
                      "torch.cuda.is_available() is False)")
    prebuilt_error = ""
    if importlib.util.find_spec("kvkernels._C") is not None:
        try:
            return _with_ops(importlib.import_module("kvkernels._C"))
        except Exception as e:  # a stale build (other torch or CUDA): fall back to the JIT build
            prebuilt_error = f"kvkernels._C failed to import ({e}); "
    module, reason = _jit_build()
    return module, (prebuilt_error + reason if module is None else "")


def _with_ops(module):
    ops = torch.ops.kvkernels
    for name in ("paged_decode_attention", "write_kv_cache"):
        if not hasattr(ops, name):
            return None, f"{module.__name__} loaded but did not register torch.ops.kvkernels.{name}"
    stale = stale_schema(ops)
    if stale:
        return None, (f"{module.__name__} is an older build: {stale}; rebuild it "
                      "(KVKERNELS_BUILD_CUDA=1 pip install -e .)")
    return module, ""


def stale_schema(ops) -> str:
    """What a loaded library's ops lack that this module passes ("" when nothing): an ahead-of-time build from
    before fp8 / int8 pages imports fine but would fail every call on its argument count."""
    for name in ("paged_decode_attention", "write_kv_cache"):
        arguments = [a.name for a in getattr(ops, name).default._schema.arguments]
        if arguments[-2:] != ["k_scale", "v_scale"]:
            return f"its {name} takes no k_scale / v_scale"
    return ""


def _jit_build():
    missing = [name for name in SOURCES if not (CSRC_DIR / name).is_file()]
    if missing:
        return None, (f"the CUDA sources are not at {CSRC_DIR} (missing {', '.join(missing)}); they ship with a "
                      "source checkout: install it with `pip install -e .`, or build ahead of time with "
                      "KVKERNELS_BUILD_CUDA=1")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None, "nvcc was not found: install a CUDA toolkit or set CUDA_HOME to one"
    if not cpp_extension.is_ninja_available():
        return None, "ninja was not found: `pip install ninja` to JIT-build the CUDA extension"
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    build_dir = os.environ.get("KVKERNELS_BUILD_DIR")
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    # One line: a first build takes minutes; later processes find it cached and load in a second.
    where = build_dir or "torch's extension directory"
    print(f"kvkernels: loading the CUDA extension (csrc/ is built for sm_{arch} on first use, cached in {where})",
          file=sys.stderr, flush=True)
    try:
        module = cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(CSRC_DIR / name) for name in SOURCES],
            extra_cflags=["-O3", "-std=c++17"],
            # An explicit -gencode replaces torch's arch list: build for this GPU only.
            extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                               f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            build_directory=build_dir or None,
            verbose=os.environ.get("KVKERNELS_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # compiler errors, a missing linker, an unwritable cache directory
        message = str(e)
        if len(message) > _ERROR_TAIL_CHARS:
            message = "..." + message[-_ERROR_TAIL_CHARS:]
        return None, f"building csrc/ for sm_{arch} failed: {message}"
    return _with_ops(module)


# Fake (meta) implementations for torch.compile: both ops only write into their preallocated `Tensor!`
# arguments and return nothing. Argument names follow the schemas in csrc/ops.cpp.
def _decode_fake(q, k_cache, v_cache, block_tables, seq_lens, scale, min_split_tokens, max_splits,
                 out, partial_out, partial_lse, k_scale=None, v_scale=None):
    return None


def _write_fake(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    return None


FAKES = {"kvkernels::paged_decode_attention": _decode_fake, "kvkernels::write_kv_cache": _write_fake}


def _register_fakes():
    # Called from this module, which csrc/ops.cpp names with m.set_python_module as the fakes' home.
    for name, fake in FAKES.items():
        torch.library.register_fake(name, fake)


def _require_loaded():
    if load() is None:
        raise RuntimeError(f"kvkernels CUDA backend unavailable: {_state.reason}")


def check_supported(head_dim: int, block_size: int) -> None:
    """Raises ValueError for a head dim or block size the CUDA decode kernel was not compiled for."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported by backend='cuda' (supported: {SUPPORTED_HEAD_DIMS}); "
                         "use backend='triton'")
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size {block_size} is not supported by backend='cuda': it needs a power of two "
                         f"from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")


def check_quantized_write(k: torch.Tensor, k_cache: torch.Tensor) -> None:
    """Raises ValueError for fp8 / int8 rows wider than the quantizing append holds (one warp, 8 values a lane).
    The op checks the same (TORCH_CHECK)."""
    if k_cache.element_size() == 1 and k.shape[-1] > MAX_QUANTIZED_HEAD_DIM:
        raise ValueError(f"backend='cuda' quantizes rows of head_dim <= {MAX_QUANTIZED_HEAD_DIM}, got {k.shape[-1]}; "
                         "use backend='triton'")


def check_rows_aligned(cache: torch.Tensor, name: str) -> None:
    """Raises ValueError unless every cache row starts on 16 bytes: the kernel reads rows with 16-byte vector
    loads. The op checks the same (TORCH_CHECK); checking first gives a Python error however the extension was built."""
    if cache.data_ptr() % 16:
        raise ValueError(f"{name} must start on a 16-byte boundary for backend='cuda' (it is a view at an odd "
                         "offset); use a contiguous copy or backend='triton'")
    for dim in range(3):
        if cache.size(dim) > 1 and cache.stride(dim) * cache.element_size() % 16:
            raise ValueError(f"{name} stride {cache.stride(dim)} of dim {dim} is not a multiple of 16 bytes: "
                             "backend='cuda' reads aligned rows; use backend='triton'")


def head_chunking(group: int):
    """(chunks, group tile) of csrc/kvkernels.h chunk_heads: CTAs per KV head and the kernel's head tile."""
    chunks = -(-group // MAX_GROUP_TILE)
    return chunks, 1 << (-(-group // chunks) - 1).bit_length()


def decode_ctas_per_sm(page_element_size: int, group: int) -> int:
    """CTAs per SM of the CUDA decode kernel on sm_90, from its registers (static: no GPU query needed)."""
    registers = SM90_DECODE_REGISTERS[(page_element_size, head_chunking(group)[1])]
    return ctas_per_sm(registers, DECODE_SHARED_BYTES, DECODE_THREADS // 32)


def num_splits(batch: int, num_kv_heads: int, group: int, capacity: int, sms: int, page_element_size: int) -> int:
    """Split count from the CUDA kernel's occupancy, with the Triton backend's rule (kvkernels.split); the static
    model calls this too, so it models the count a launch uses."""
    chunks, _ = head_chunking(group)
    return choose_num_splits(batch, num_kv_heads * chunks, capacity, sms, decode_ctas_per_sm(page_element_size, group))


def default_num_splits(shape, page_dtype: torch.dtype, device: torch.device) -> int:
    return num_splits(shape.batch, shape.num_kv_heads, shape.num_heads // shape.num_kv_heads,
                      shape.max_blocks_per_seq * shape.block_size, num_sms(device), page_dtype.itemsize)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, shape, scale, out, k_scale=None,
                           v_scale=None):
    """Runs the CUDA decode kernel (and the split merge when splitting) into `out`. Inputs checked by kvkernels.ops.

    Args:
        q: [B, H, D] fp16 / bf16 / fp32.
        k_cache, v_cache: [num_blocks, block_size, H_kv, D], q's dtype or float8_e4m3fn / int8, last dim contiguous,
            16-byte aligned rows.
        block_tables: int32 [B, max_blocks_per_seq].
        seq_lens: int32 [B].
        shape: the `kvkernels._validate.DecodeShape` of these inputs.
        scale: softmax scale (float).
        out: [B, H, D] in q's dtype, last dim contiguous; written in place.
        k_scale, v_scale: fp32, only with fp8 / int8 pages: [num_blocks, block_size, H_kv] or [H_kv] (static).
    """
    _require_loaded()
    check_supported(shape.head_dim, shape.block_size)
    if not torch.compiler.is_compiling():   # data_ptr() cannot be traced; the op's TORCH_CHECK still runs
        check_rows_aligned(k_cache, "k_cache")
        check_rows_aligned(v_cache, "v_cache")
    if out.numel() == 0:
        return
    # Same static maximum as the Triton backend: from the table's capacity, never from seq_lens (no sync).
    max_splits = default_num_splits(shape, k_cache.dtype, q.device)
    if max_splits > 1:
        partial_out = torch.empty(shape.batch, shape.num_heads, max_splits, shape.head_dim,
                                  device=q.device, dtype=torch.float32)
        partial_lse = torch.empty(shape.batch, shape.num_heads, max_splits, device=q.device, dtype=torch.float32)
    else:  # the kernel writes `out` directly and never touches these (distinct: mutated args must not alias)
        partial_out = torch.empty(0, device=q.device, dtype=torch.float32)
        partial_lse = torch.empty(0, device=q.device, dtype=torch.float32)
    torch.ops.kvkernels.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, float(scale),
                                               MIN_SPLIT_TOKENS, max_splits, out, partial_out, partial_lse,
                                               k_scale, v_scale)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Writes k, v [N, H_kv, D] (any strides) into k_cache, v_cache [num_blocks, block_size, H_kv, D] at
    slot_mapping int64 [N] (-1 skips). fp8 / int8 pages store each row quantized, with its fp32 scale written to
    k_scale, v_scale [num_blocks, block_size, H_kv] or static [H_kv] scales read. Inputs already checked by
    kvkernels.ops."""
    _require_loaded()
    check_quantized_write(k, k_cache)
    if k.shape[0] == 0:
        return
    torch.ops.kvkernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
