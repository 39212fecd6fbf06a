"""Compiles the Triton kernels for sm_90 and prints {case: spilled stack bytes} as JSON.

Run in its own process (tests/test_triton_compile.py does): the compiler needs real @triton.jit
functions, which TRITON_INTERPRET=1 replaces with interpreted ones.
"""
import json
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvkernels import triton_decode, triton_write_kv

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def pointer_type(name, dtype):
    if "block_tables" in name or "seq_lens" in name:
        return "*i32"
    if "slot_mapping" in name:
        return "*i64"
    return "*fp32" if "partial" in name else "*" + dtype


def spilled_bytes(fn, constexprs, dtype, workdir):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_type(name, dtype)
        else:
            signature[name] = "fp32" if "scale" in name else "i32"
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert ".target sm_90" in kernel.asm["ptx"]
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True,
                           check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def decode_case(dtype, head_dim, group, splits):
    head_dim_pad, group_pad = triton.next_power_of_2(head_dim), triton.next_power_of_2(group)
    return triton_decode._paged_decode_kernel, dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=16,
        TILE_N=triton_decode._tile_tokens(group_pad, head_dim_pad), SPLIT=splits > 1, MIN_SPLIT_TOKENS=256), dtype


CASES = {
    "decode-fp16-d64": decode_case("fp16", 64, 1, 1),
    "decode-bf16-d80-split8": decode_case("bf16", 80, 1, 8),
    "decode-fp16-d128-gqa4": decode_case("fp16", 128, 4, 1),
    "decode-fp32-d256-split4": decode_case("fp32", 256, 1, 4),
    "decode-fp16-d96-gqa3-split2": decode_case("fp16", 96, 3, 2),
    "merge-d64-split22": (triton_decode._merge_splits_kernel, dict(
        HEAD_DIM=64, HEAD_DIM_PAD=64, BLOCK_SIZE=16, TILE_N=64, SPLITS_PAD=32, MIN_SPLIT_TOKENS=256), "fp16"),
    "write-h12-d64": (triton_write_kv._write_kv_kernel, dict(
        NUM_KV_HEADS=12, HEADS_PAD=16, HEAD_DIM=64, HEAD_DIM_PAD=64, BLOCK_SIZE=16), "fp16"),
}

if __name__ == "__main__":
    workdir = sys.argv[1]
    print(json.dumps({name: spilled_bytes(fn, constexprs, dtype, workdir)
                      for name, (fn, constexprs, dtype) in CASES.items()}))
