"""The public kernel-level API: input checks, backend choice, dispatch."""
import functools
import importlib.util
import os

import torch

from . import reference
from ._validate import (check_decode_inputs, check_decode_values, check_kv_scales, check_slot_values,
                        check_split_counters, check_write_inputs, is_quantized)

BACKENDS = ("auto", "triton", "cuda", "torch")

# backend="auto" for decode on a CUDA device: per shape class (grouped query heads or not), the backend with
# the higher modelled HBM throughput (TB/s, mean over the model's points of that class), then the more bytes
# in flight per SM. A GPU run of both (`python -m bench.kernels`) replaces these with measured numbers and
# names its run here.
AUTO_SOURCE = ("static model (python -m bench.kernels --static), 2026-11-24, triton 3.6 (the GPU machine's "
               "version) and csrc's sm_90 ptxas registers (nvcc 13.0); on the H100 (2026-11-24) Triton matched CUDA "
               "at B=64 x 16k (GPT-2) and beat it for GQA, CUDA was faster at B=4-16 x 32k in bf16")
AUTO_TABLE = {  # grouped query heads -> {backend: (modelled TB/s, bytes in flight per SM)}
    False: {"triton": (2.56, 82105), "cuda": (2.53, 82664)},  # gpt2 12 x 64 fp16, B=1..64 x 1k..16k
    True: {"triton": (3.00, 80430), "cuda": (3.00, 31775)},   # 32 q / 8 kv heads x 128 fp16, B=1..16
}


def _unit_stride(x):
    """The kernels index the last dim (and 1-D index tensors) with unit stride; tiny copies otherwise."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # looked up once: this runs per layer per step


def triton_available(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def auto_decode_backend(shape, device: torch.device) -> str:
    """The faster of Triton and CUDA for this decode shape by AUTO_TABLE; Triton where CUDA cannot run it
    (unsupported head dim or block size, or the extension does not load: its first use builds it)."""
    if device.type != "cuda" or not triton_available(device):
        return "triton" if triton_available(device) else "torch"
    ranked = sorted(AUTO_TABLE[shape.num_heads > shape.num_kv_heads].items(), key=lambda item: item[1], reverse=True)
    if ranked[0][0] == "cuda":
        from . import cuda_ext
        supported = (shape.head_dim in cuda_ext.SUPPORTED_HEAD_DIMS
                     and cuda_ext.MIN_BLOCK_SIZE <= shape.block_size <= cuda_ext.MAX_BLOCK_SIZE
                     and shape.block_size & (shape.block_size - 1) == 0)
        if supported and cuda_ext.load() is not None:
            return "cuda"
    return "triton"


def _cuda_loads() -> bool:
    from . import cuda_ext
    return cuda_ext.load() is not None


def resolve_backend(backend: str, device: torch.device, shape=None, quantized=False, windowed=False) -> str:
    """Maps "auto" to the fastest backend for `device` (and the decode `shape`, when given) and checks that an
    explicit choice can run there. Window starts (`windowed`) run on Triton or the reference only: the CUDA
    backend has none. fp8 / int8 pages (`quantized`) run on every backend; "auto" picks Triton for them, whose
    quantized kernels were measured on the H100, until a GPU run of the CUDA ones (csrc/) ranks the two (CUDA
    where Triton is not installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if quantized and not triton_available(device) and device.type == "cuda" and _cuda_loads():
            return "cuda"
        if quantized or windowed:
            return "triton" if triton_available(device) else "torch"
        if shape is not None:
            return auto_decode_backend(shape, device)
        return "triton" if triton_available(device) else "torch"
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(f"backend='triton' cannot run on {device}: it needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before triton is imported to run on the CPU")
    if backend == "cuda":
        from . import cuda_ext
        if windowed:
            raise NotImplementedError("backend='cuda' has no seq_starts (sliding window) yet: use backend='triton' "
                                      "(or 'auto', which picks it here)")
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if cuda_ext.load() is None:
            raise RuntimeError(f"backend='cuda' is unavailable: {cuda_ext.unavailable_reason()}")
    return backend


def _layout(*tensors):
    """What a launch is specialised on besides the data: each tensor's shape, strides, dtype and device (None stays;
    anything else is its type, which no tensor's layout equals)."""
    return tuple(t if t is None else (t.shape, t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)
                 for t in tensors)


def _check_out(q, out):
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous last dim, "
                         f"got {got}")


class DecodePlan:
    """A decode over one set of block tables, planned once and run for each layer (FlashInfer's plan / run): the
    constructor checks the inputs, resolves the backend and, for Triton, picks the split count; `run` checks that a
    layer's tensors are laid out as the plan's (and `out`) and launches. The arguments are `paged_decode_attention`'s;
    q, the caches and the scales given here are templates (their layout, not their data, is used). The tables, lengths
    and starts are the plan's own: views of them are read at every `run`, except one whose last stride is not 1, which
    is copied once, here.

    Calls of `run` on one plan must not overlap in time (they share the split counters): a model's layers, one after
    another on one stream.
    """

    def __init__(self, q, k_cache, v_cache, block_tables, seq_lens, *, k_scale=None, v_scale=None, backend="auto",
                 validate=True, seq_starts=None, split_counters=None):
        shape = check_decode_inputs(q, k_cache, v_cache, block_tables, seq_lens, seq_starts=seq_starts)
        check_kv_scales(k_cache, v_cache, k_scale, v_scale)
        self.backend = resolve_backend(backend, q.device, shape, is_quantized(k_cache.dtype), seq_starts is not None)
        if split_counters is not None:
            check_split_counters(split_counters, shape, q.device, check_zero=False)
        self.shape, self.split_counters = shape, split_counters
        self.block_tables, self.seq_lens = _unit_stride(block_tables), _unit_stride(seq_lens)
        self.seq_starts = None if seq_starts is None else _unit_stride(seq_starts)
        if validate:
            self.validate()
        self.num_splits = None
        if self.backend == "triton":
            from . import triton_decode
            self.num_splits = triton_decode.default_num_splits(shape, q.dtype, q.device, cache_dtype=k_cache.dtype)
        self._layout = _layout(q, k_cache, v_cache, k_scale, v_scale)

    def validate(self) -> None:
        """The checks of the values (one device sync; none while a CUDA graph is captured): seq_lens, seq_starts, the
        block ids in use, and split counters all zero."""
        if self.split_counters is not None:
            check_split_counters(self.split_counters, self.shape, self.seq_lens.device, check_zero=True)
        check_decode_values(self.block_tables, self.seq_lens, self.shape, self.seq_starts)

    def matches(self, q, k_cache, v_cache, k_scale=None, v_scale=None) -> bool:
        """Whether `run` takes these tensors: laid out as the plan's templates."""
        return _layout(q, k_cache, v_cache, k_scale, v_scale) == self._layout

    def run(self, q, k_cache, v_cache, *, scale=None, k_scale=None, v_scale=None, out=None):
        """The decode of q [B, H, D] over k_cache, v_cache (and k_scale, v_scale for fp8 / int8 pages), laid out as the
        plan's; scale and out as in `paged_decode_attention`. Returns out [B, H, D] in q's dtype."""
        if not self.matches(q, k_cache, v_cache, k_scale, v_scale):
            raise ValueError("q, k_cache, v_cache, k_scale and v_scale must have the shapes, strides, dtypes and device "
                             "of the tensors the plan was made with: make a DecodePlan for these")
        _check_out(q, out)
        return self._launch(q, k_cache, v_cache, scale, k_scale, v_scale, out)

    def _launch(self, q, k_cache, v_cache, scale, k_scale, v_scale, out):
        """Launches into `out` (checked by the caller; None: allocated)."""
        shape = self.shape
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        scale = shape.head_dim ** -0.5 if scale is None else float(scale)
        q, block_tables, seq_lens, seq_starts = _unit_stride(q), self.block_tables, self.seq_lens, self.seq_starts
        if self.backend == "torch":
            out.copy_(reference.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                                       k_scale=k_scale, v_scale=v_scale, validate=False,
                                                       seq_starts=seq_starts))
        elif self.backend == "cuda":
            from . import cuda_ext
            cuda_ext.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, shape, scale, out,
                                            k_scale=k_scale, v_scale=v_scale)
        else:
            from . import triton_decode
            triton_decode.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, shape, scale, out,
                                                 num_splits=self.num_splits, seq_starts=seq_starts,
                                                 split_counters=self.split_counters, k_scale=k_scale, v_scale=v_scale)
        return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale=None, k_scale=None, v_scale=None,
                           backend="auto", validate=True, out=None, seq_starts=None, split_counters=None):
    """Single-query attention for each sequence over its pages of a paged KV cache.

    Args:
        q: [B, H, D] fp16 / bf16 / fp32, the one new query per sequence.
        k_cache: [num_blocks, block_size, H_kv, D], q's dtype (NHD pages), or float8_e4m3fn / int8 pages
            with scales. H % H_kv == 0.
        v_cache: same shape and dtype as k_cache.
        block_tables: int32 [B, max_blocks_per_seq], physical block ids in logical order; entries past
            a sequence's last block are never read.
        seq_lens: int32 [B], tokens cached for each sequence, 1 <= seq_lens <= max_blocks_per_seq * block_size.
        scale: softmax scale, default D ** -0.5.
        k_scale, v_scale: fp32, only with fp8 / int8 pages: [num_blocks, block_size, H_kv], one scale per
            cached token and KV head (as write_kv_cache stores them), or [H_kv] static per-head scales.
            A page element x stands for x * scale.
        seq_starts: None, or int32 [B], each sequence's first visible token (a sliding window), 0 <= seq_starts <
            seq_lens: the tokens before it are never read. Triton and the reference; the CUDA backend has none.
        backend: "auto" | "triton" | "cuda" | "torch". "auto": on CUDA the faster of Triton and CUDA for this
            shape (AUTO_TABLE; Triton for fp8 / int8 pages), on the CPU Triton's interpreter when
            TRITON_INTERPRET=1, else the reference.
        validate: check seq_lens and the block ids in use (one device sync; skipped while capturing a
            CUDA graph). Callers that own the tables, like PagedKVCache, pass False.
        out: optional [B, H, D] tensor of q's dtype and device to write into (a static buffer for CUDA
            graphs); allocated when None.
        split_counters: optional int32 [B, H_kv] on q's device, all zero, which the kernel leaves zero: with
            them a split Triton decode merges its partitions in its last program instead of a second launch
            (the CUDA backend keeps its merge launch). Reuse one tensor across calls on the same stream; calls
            running concurrently need their own.

    Returns:
        out: [B, H, D] in q's dtype.

    A model's layers share the tables: `DecodePlan` makes these checks once and runs each layer's decode.
    """
    plan = DecodePlan(q, k_cache, v_cache, block_tables, seq_lens, k_scale=k_scale, v_scale=v_scale, backend=backend,
                      validate=False, seq_starts=seq_starts, split_counters=split_counters)
    _check_out(q, out)      # before the values' device sync: a wrong buffer is the cheaper error to report
    if validate:
        plan.validate()
    return plan._launch(q, k_cache, v_cache, scale, k_scale, v_scale, out)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None, backend="auto",
                   validate=True):
    """Writes new tokens' K and V into their slots of the paged cache, in place.

    Args:
        k, v: [N, H_kv, D], the cache's dtype (fp16 / bf16 / fp32 for fp8 / int8 pages).
        k_cache, v_cache: [num_blocks, block_size, H_kv, D].
        slot_mapping: int64 [N], block * block_size + offset for each token; -1 skips the token.
        k_scale, v_scale: fp32, only with fp8 / int8 pages, which store each row quantized:
            [num_blocks, block_size, H_kv] receive each written row's scale (absmax x (1 / 448) for fp8,
            x (1 / 127) for int8) at its slot; [H_kv] are static per-head scales, read (values past +-448 x scale or
            +-127 x scale saturate).
        backend: "auto" | "triton" | "cuda" | "torch".
        validate: check slots are in range and distinct (one device sync; skipped while capturing).
    """
    _, num_slots = check_write_inputs(k, v, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    backend = resolve_backend(backend, k_cache.device, quantized=is_quantized(k_cache.dtype))
    if validate:
        check_slot_values(slot_mapping, num_slots)
    slot_mapping = _unit_stride(slot_mapping)
    if backend == "torch":
        reference.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale,
                                 validate=False)
    elif backend == "cuda":
        from . import cuda_ext
        cuda_ext.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        from . import triton_write_kv
        triton_write_kv.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
