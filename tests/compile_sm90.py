"""Compiles the Triton kernels for sm_90 as a real launch specialises them; prints {case: analysis} as JSON.

Run in its own process (tests/test_triton_compile.py does): the compiler needs real @triton.jit
functions, which TRITON_INTERPRET=1 replaces with interpreted ones. The analysis is
`kvkernels.static_model.analyse`: registers, spills, CTAs per SM, the main loop's loads and bytes in flight.
"""
import json

import torch

from kvkernels import static_model, triton_write_kv
from kvkernels.static_model import DecodePoint, GPT2, GQA


def point(dtype, head_dim, num_heads, num_kv_heads, batch=2, context=4096, cache_dtype=None):
    return DecodePoint(f"{dtype}-d{head_dim}", dtype, num_heads, num_kv_heads, head_dim, 16, batch, context,
                       cache_dtype)


FP8, INT8 = "float8_e4m3fn", "int8"


# (point, splits); a split case also compiles its merge kernel.
DECODE_CASES = {
    "decode-fp16-d64": (point("float16", 64, 2, 2), 1),
    "decode-bf16-d80-split8": (point("bfloat16", 80, 2, 2), 8),
    "decode-fp16-d128-gqa4": (point("float16", 128, 8, 2), 1),
    "decode-fp32-d256-split4": (point("float32", 256, 2, 2), 4),
    "decode-fp16-d96-gqa3-split2": (point("float16", 96, 6, 2), 2),
    "decode-fp32-d128-gqa4": (point("float32", 128, 8, 2), 1),
    "decode-bf16-d128-gqa4": (point("bfloat16", 128, 8, 2), 1),
    # the design points the static bounds are asserted on
    "gpt2-split22": (DecodePoint("gpt2", batch=16, context=4096, **GPT2), 22),
    "gqa-32x8-d128-split8": (DecodePoint("gqa", batch=16, context=4096, **GQA), 8),
    # fp8 / int8 pages (per-token scales), the same design points and the other q dtypes / head dims
    "gpt2-fp8-split22": (DecodePoint("gpt2", batch=16, context=4096, cache_dtype=FP8, **GPT2), 22),
    "gpt2-int8-split22": (DecodePoint("gpt2", batch=16, context=4096, cache_dtype=INT8, **GPT2), 22),
    "gqa-32x8-d128-fp8-split8": (DecodePoint("gqa", batch=16, context=4096, cache_dtype=FP8, **GQA), 8),
    "gqa-32x8-d128-int8-split8": (DecodePoint("gqa", batch=16, context=4096, cache_dtype=INT8, **GQA), 8),
    "decode-bf16-d128-gqa4-fp8": (point("bfloat16", 128, 8, 2, cache_dtype=FP8), 1),
    "decode-fp32-d256-int8": (point("float32", 256, 2, 2, cache_dtype=INT8), 1),
    "decode-fp32-d128-gqa4-fp8": (point("float32", 128, 8, 2, cache_dtype=FP8), 1),
    # grouped int8 pages with fp16 q: byte lanes (D / 4 words, 20 of 32 used at d80), and bytes where a lane's
    # dot would have K < 16 (d32)
    "decode-fp16-d80-gqa4-int8": (point("float16", 80, 8, 2, cache_dtype=INT8), 1),
    "decode-fp16-d32-gqa4-int8": (point("float16", 32, 8, 2, cache_dtype=INT8), 1),
}
# the same design points with the merge folded into the decode kernel (split counters, as generate runs it)
FOLDED_CASES = {name + "-folded": case for name, case in DECODE_CASES.items() if name in ("gpt2-split22",
                                                                                          "gqa-32x8-d128-split8")}


def write_case(num_kv_heads=12, head_dim=64, block_size=16, cache_dtype=torch.float16):
    k = torch.empty(4, num_kv_heads, head_dim, dtype=torch.float16)
    cache = torch.empty(8, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    scales = torch.empty(8, block_size, num_kv_heads) if cache_dtype != torch.float16 else None
    return triton_write_kv.write_kv_launch(k, k, cache, cache, torch.zeros(4, dtype=torch.int64), scales, scales)


def analysed(fn, args, kwargs):
    kernel = static_model.compile_launch(fn, args, kwargs)
    return dict(static_model.analyse(kernel), fp_fusion=kernel.metadata.enable_fp_fusion)


def analyse_all():
    results = {}
    for name, (decode_point, splits) in DECODE_CASES.items():
        launches = static_model.point_launches(decode_point, splits)
        for suffix, (fn, args, kwargs, _) in zip(["", "-merge"], launches):
            results[name + suffix] = analysed(fn, args, kwargs)
    for name, (decode_point, splits) in FOLDED_CASES.items():
        (fn, args, kwargs, _), = static_model.point_launches(decode_point, splits, fold_merge=True)
        results[name] = analysed(fn, args, kwargs)
    for name, cache_dtype in (("write-h12-d64", torch.float16), ("write-h12-d64-fp8", torch.float8_e4m3fn),
                              ("write-h12-d64-int8", torch.int8)):
        results[name] = analysed(*write_case(cache_dtype=cache_dtype)[:3])
    return results


if __name__ == "__main__":
    print(json.dumps(analyse_all()))
