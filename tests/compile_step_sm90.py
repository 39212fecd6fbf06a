"""Compiles the decode-step kernels (kvkernels.triton_step) for sm_90 at GPT-2 124M's shapes, specialised the way
a real launch specialises them (ints equal to 1 become constants, pointers and ints divisible by 16 carry
tt.divisibility=16), and prints {case: {registers, spilled_bytes}} as JSON.

Run in its own process (tests/test_step_kernels.py does): the compiler needs real @triton.jit functions, which
TRITON_INTERPRET=1 replaces with interpreted ones.
"""
import json
import os
import re
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvkernels import split, static_model, triton_step

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1"}


class Ptr:
    def __init__(self, dtype):
        self.dtype = dtype


def compile_launch(fn, args, constexprs, num_warps=4, *, workdir):
    """Compiles `fn` as a launch with these arguments would: args maps each runtime argument to a Ptr, int or
    float; returns the cubin's registers and spilled bytes."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, Ptr):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, **split.FP_FUSION})  # as the launches
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "spilled_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "split_counter_ordered": static_model._split_counter_ordered(
                [op for _, _, op, _ in static_model._INSTR.findall(sass)]),
            # loads to registers, how many of them 128 bits wide, and asynchronous copies to shared memory
            "ldg": len(re.findall(r"\bLDG\.E", sass)), "ldg_128": len(re.findall(r"\bLDG\.E\.128", sass)),
            "ldgsts": len(re.findall(r"\bLDGSTS", sass))}


def split_case(M, N, K, dtype):
    """Blocks and (splits, k_chunk) as a launch on an H100's 132 SMs picks them."""
    block_m, block_k, block_n = triton_step._gemm_blocks(M, N, K, dtype)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    return (block_m, block_k, block_n), split.split_k(tiles, K, block_k, 132)


def linear_case(dtype, M, N, K, *, layer_norm=False, bias=True, gelu=False, residual=False, transposed=False,
                out_dtype=None):
    (block_m, block_k, block_n), (splits, k_chunk) = split_case(M, N, K, dtype)
    args = dict(x_ptr=Ptr(dtype), w_ptr=Ptr(dtype), bias_ptr=Ptr(dtype), ln_w_ptr=Ptr(dtype), ln_b_ptr=Ptr(dtype),
                out_ptr=Ptr(out_dtype or dtype), partials_ptr=Ptr(torch.float32), counters_ptr=Ptr(torch.int32),
                M=M, N=N, K=K, k_chunk=k_chunk, ln_eps=1e-5, stride_xm=K,
                stride_wk=1 if transposed else N, stride_wn=K if transposed else 1, stride_om=N)
    constexprs = dict(LAYER_NORM=layer_norm, HAS_BIAS=bias, GELU=gelu, RESIDUAL=residual, SPLIT_K=splits > 1,
                      DOT_FP32=False, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n)
    return triton_step._linear_kernel, args, constexprs


def qkv_case(dtype, M, embed=768, heads=12, block_size=16, max_blocks=64):
    head_dim = embed // heads
    (block_m, block_k, block_n), (splits, k_chunk) = split_case(M, 3 * embed, embed, dtype)
    args = dict(x_ptr=Ptr(dtype), w_ptr=Ptr(dtype), bias_ptr=Ptr(dtype), ln_w_ptr=Ptr(dtype), ln_b_ptr=Ptr(dtype),
                q_ptr=Ptr(dtype), k_cache_ptr=Ptr(dtype), v_cache_ptr=Ptr(dtype), block_tables_ptr=Ptr(torch.int32),
                lengths_ptr=Ptr(torch.int32), partials_ptr=Ptr(torch.float32), counters_ptr=Ptr(torch.int32),
                M=M, K=embed, k_chunk=k_chunk, ln_eps=1e-5, stride_xm=embed, stride_wk=3 * embed,
                stride_wn=1, stride_qm=embed, stride_cb=block_size * embed, stride_ct=embed, stride_ch=head_dim,
                stride_tb=max_blocks)
    constexprs = dict(EMBED=embed, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, SPLIT_K=splits > 1, DOT_FP32=False,
                      BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n)
    return triton_step._qkv_write_kernel, args, constexprs


def embed_case(dtype, embed=768):
    args = dict(tokens_ptr=Ptr(torch.int64), lengths_ptr=Ptr(torch.int32), wte_ptr=Ptr(dtype), wpe_ptr=Ptr(dtype),
                x_ptr=Ptr(dtype), seq_lens_ptr=Ptr(torch.int32), stride_wte=embed, stride_wpe=embed, stride_x=embed)
    return triton_step._embed_kernel, args, dict(EMBED=embed, EMBED_PAD=triton.next_power_of_2(embed))


def update_state_case(greedy, penalty, vocab=50257, max_new_tokens=256):
    args = dict(logits_ptr=Ptr(torch.float32 if greedy else torch.int64), chosen_ptr=Ptr(torch.int64),
                seen_ptr=Ptr(torch.bool), tokens_ptr=Ptr(torch.int64), lengths_ptr=Ptr(torch.int32),
                finished_ptr=Ptr(torch.bool), done_at_ptr=Ptr(torch.int64), step_ptr=Ptr(torch.int64),
                out_ptr=Ptr(torch.int64), eos_ptr=Ptr(torch.int64), num_eos=1, pad=50256, penalty=1.1, V=vocab,
                stride_lb=vocab, stride_sb=vocab, stride_ob=max_new_tokens)
    constexprs = dict(GREEDY=greedy, PENALTY=penalty, GROW=True, BLOCK_V=triton_step.SELECT_BLOCK_V, EOS_PAD=1)
    return triton_step._update_state_kernel, args, constexprs, triton_step.SELECT_WARPS


CASES = {
    "linear-fp16-ln-c_fc-gelu-b1": linear_case(torch.float16, 1, 3072, 768, layer_norm=True, gelu=True),
    "linear-fp16-c_proj-residual-b1": linear_case(torch.float16, 1, 768, 768, residual=True),
    "linear-fp16-mlp_proj-residual-b32": linear_case(torch.float16, 32, 768, 3072, residual=True),
    "linear-bf16-ln-lm_head-b8": linear_case(torch.bfloat16, 8, 50257, 768, layer_norm=True, bias=False,
                                             transposed=True, out_dtype=torch.float32),
    "linear-fp32-ln-c_fc-gelu-b32": linear_case(torch.float32, 32, 3072, 768, layer_norm=True, gelu=True),
    "qkv-fp16-b1": qkv_case(torch.float16, 1),
    "qkv-bf16-b32": qkv_case(torch.bfloat16, 32),
    "qkv-fp32-b8": qkv_case(torch.float32, 8),
    "embed-fp16": embed_case(torch.float16),
    "update_state-greedy-penalty": update_state_case(True, True),
    "update_state-sampled": update_state_case(False, False),
}

if __name__ == "__main__":
    workdir = sys.argv[1]
    print(json.dumps({name: compile_launch(*case, workdir=workdir) for name, case in CASES.items()}))
