"""Random paged-KV problems for the kernel tests: ragged lengths, shuffled tables, NaN in every free slot;
tiny GPT-2s and decoders of each family; the sm_90 compile scripts' runner; a counter of the kernels a run would launch."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class PagedProblem:
    q: torch.Tensor             # [B, H, D]
    k_cache: torch.Tensor       # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq]
    seq_lens: torch.Tensor      # int32 [B]
    k_rows: list                # per sequence [L_b, H_kv, D]: the logical K the pages must hold
    v_rows: list

    def args(self):
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens


def make_problem(lens, *, num_heads=4, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.float32,
                 device="cpu", spare_blocks=3, extra_table_cols=1, generator=None) -> PagedProblem:
    """Pages for sequences of the given lengths, scattered over a shuffled pool.

    Free slots (the tail of each last block, unused blocks) hold NaN so that any read past
    seq_len shows up in the output. Table entries past a sequence's last block hold junk ids.
    """
    g = generator or torch.Generator().manual_seed(0)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    max_blocks = max(blocks_per_seq) + extra_table_cols
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    # junk beyond each sequence's blocks: out-of-range ids a kernel must never follow
    tables = torch.full((len(lens), max_blocks), num_blocks + 1000, dtype=torch.int32)
    k_rows, v_rows = [], []
    for b, n in enumerate(lens):
        ids = [perm.pop() for _ in range(blocks_per_seq[b])]
        tables[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        for pos in range(n):
            k_cache[ids[pos // block_size], pos % block_size] = k[pos]
            v_cache[ids[pos // block_size], pos % block_size] = v[pos]
        k_rows.append(k.to(device))
        v_rows.append(v.to(device))
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    return PagedProblem(q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
                        torch.tensor(lens, dtype=torch.int32, device=device), k_rows, v_rows)


def dense_attention_fp64(q, k_rows, v_rows, scale):
    """The math, one sequence at a time, in float64: out[b, h] = softmax(scale q k^T) v."""
    outs = []
    num_heads = q.shape[1]
    for b in range(q.shape[0]):
        k = k_rows[b].double()                      # [L, H_kv, D]
        v = v_rows[b].double()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)       # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].double(), k) * scale
        outs.append(torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v))
    return torch.stack(outs)


def nan_output(q):
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def make_gpt2(seed=0, dtype=torch.float32, model_class=None, device="cpu", **overrides):
    """Tiny random GPT-2 with eager attention. initializer_range 0.3 spreads the logits: varied greedy tokens and
    no near-ties. Two heads keep Triton's CPU interpreter (one program per sequence and head) quick."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=1,
                  pad_token_id=0, initializer_range=0.3, attn_implementation="eager")
    config.update(overrides)
    torch.manual_seed(seed)
    return (model_class or GPT2LMHeadModel)(GPT2Config(**config)).to(device, dtype).eval()


def padded_batch(prompt_lens=(9, 5, 7), vocab=256, seed=1, device="cpu"):
    """Left-padded prompts: input_ids and attention_mask [len(prompt_lens), max(prompt_lens)]."""
    generator = torch.Generator().manual_seed(seed)
    width = max(prompt_lens)
    ids = torch.randint(2, vocab, (len(prompt_lens), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(prompt_lens):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def run_sm90_compile(script, *args, timeout=900):
    """Runs tests/<script>, which compiles kernels for sm_90 and prints JSON last, in a child process without
    TRITON_INTERPRET (the compiler needs real @triton.jit functions) on this checkout's kvkernels; returns
    that JSON. The child's Triton defaults to unfused multiply-adds, Triton 3.10's default: the launches pin
    fusion (kvkernels.split.FP_FUSION). Skips where the installed triton ships no NVIDIA toolchain."""
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton build ships no NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", script), *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# Tiny fp32 decoders of each family kvkernels.patch serves, covering GQA groups H/H_kv of 1, 4 and 8, head dims 64, 80
# and 128, a sliding window on every layer (Mistral) and alternating full and windowed layers (Qwen2).
DECODERS = {
    "llama": dict(num_attention_heads=8, num_key_value_heads=1, head_dim=64),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=80, sliding_window=6),
    "qwen2": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=128, use_sliding_window=True,
                  sliding_window=6, max_window_layers=1),
    "qwen3": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=80),
    "gpt2": dict(n_head=4, n_embd=128, n_positions=256, initializer_range=0.3),
}


def make_decoder(family, seed=0, device="cpu", sharpen=8.0, attn_implementation="eager", **overrides):
    """Tiny random `family` decoder (a key of DECODERS) with `attn_implementation` attention, its LM head (unless tied to the
    embeddings: GPT-2 spreads its logits by initializer_range) scaled by `sharpen` so that greedy is far from ties."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(vocab_size=256, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    if family == "gpt2":
        config.update(n_layer=2)
    else:
        config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
    config.update(DECODERS[family], **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config),
                                             attn_implementation=attn_implementation)
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model.to(device).eval()


# Ops that only make, view or describe tensors: no kernel runs for them.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size"}
# Ops that read a device value on the host: a CUDA graph cannot capture them.
HOST_SYNC = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "masked_select", "unique"}


class KernelCounter(TorchDispatchMode):
    """Counts the kernels an eager run would launch on a GPU: aten ops that compute (views, allocations and
    metadata do not launch) plus Triton launches. An addmm counts twice: at M = 1 cuBLAS copies the bias into
    the output in a kernel of its own. Ops inside a Triton launch (the interpreter's copies) are not counted.
    dry: skip executing Triton kernels, in the step (their launch is counted all the same) and around it."""

    def __init__(self, monkeypatch, dry=False):
        super().__init__()
        self.ops, self.launches, self.grids, self.syncs, self._inside, self._active = {}, {}, {}, [], False, False
        self.unfused = set()  # kernels launched without fused multiply-adds pinned
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        kernel_class = InterpretedFunction if os.environ.get("TRITON_INTERPRET") == "1" else JITFunction
        launch = kernel_class.run

        def counted_launch(fn, *args, **kwargs):
            if kwargs.get("warmup"):   # a compile without a launch (the split heuristic reads the occupancy)
                return launch(fn, *args, **kwargs)
            if self._active:
                self.launches[fn.fn.__name__] = self.launches.get(fn.fn.__name__, 0) + 1
                self.grids[fn.fn.__name__] = tuple(kwargs["grid"])
                if kwargs.get("enable_fp_fusion") is not True:
                    self.unfused.add(fn.fn.__name__)
            if dry:
                return None
            self._inside = True
            try:
                return launch(fn, *args, **kwargs)
            finally:
                self._inside = False
        monkeypatch.setattr(kernel_class, "run", counted_launch)

    def __enter__(self):
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside:
            if name in HOST_SYNC:
                self.syncs.append(name)
            if name not in NO_KERNEL and not func.is_view:
                self.ops[name] = self.ops.get(name, 0) + (2 if name == "addmm" else 1)
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values()) + sum(self.launches.values())
