"""Accuracy of fp8 / int8 paged KV against the unquantized cache, measured on the CPU.

    python -m bench.kv_accuracy              # ~3 minutes on 2 CPU cores; writes bench/results/kv_accuracy.{json,md}

1. Attention output relative error (Frobenius) of the reference decode over random pages (Gaussian K/V, and
   with two key channels 10x the rest, as real keys have), fp8 / int8 pages with per-token scales vs fp16 pages.
2. A tiny GPT-2 (2 layers, 4 heads, d=128, byte vocabulary) trained for TRAIN_SECONDS on English text that
   ships with Python (its LICENSE and pydoc's topic help), then, with kvkernels.patch(cache_dtype=...) against
   the fp32 cache: teacher-forced next-token KL and top-1 agreement over EVAL_POSITIONS positions of held-out
   text, and greedy token agreement over GREEDY_TOKENS tokens of kvkernels.generate (up to the first
   divergence, and position by position). A few minutes of training is a weak model; a random-weight one is a
   weaker proxy still: real checkpoints (GPT-2 124M and up) are what these numbers stand in for.
"""
import glob
import json
import os
import time

import torch
import torch.nn.functional as F

import kvkernels
from kvkernels import reference

from .common import output_dir

TRAIN_SECONDS, CONTEXT, EVAL_POSITIONS, GREEDY_TOKENS = 150, 128, 300, 500
CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def attention_errors(seed=0):
    """{(name, outliers): relative error} of the reference decode, quantized pages vs fp16 pages."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, dim, length, block = 4, 8, 2, 64, 512, 16
    results = {}
    for outliers in (False, True):
        k = torch.randn(batch * length // block, block, kv_heads, dim, generator=g)
        v = torch.randn(batch * length // block, block, kv_heads, dim, generator=g)
        if outliers:
            k[..., :2] *= 10
        q = torch.randn(batch, heads, dim, generator=g).half()
        tables = torch.randperm(batch * length // block, generator=g, dtype=torch.int32).view(batch, -1)
        lens = torch.full((batch,), length, dtype=torch.int32)
        exact = reference.paged_decode_attention(q, k.half(), v.half(), tables, lens).float()
        for name, dtype in CACHE_DTYPES.items():
            kq, ks = reference.quantize(k.view(-1, kv_heads, dim), dtype)
            vq, vs = reference.quantize(v.view(-1, kv_heads, dim), dtype)
            out = reference.paged_decode_attention(q, kq.view(k.shape), vq.view(v.shape), tables, lens,
                                                   k_scale=ks.view(k.shape[:3]), v_scale=vs.view(v.shape[:3]))
            results[f"{name}, {'outlier channels' if outliers else 'gaussian'}"] = \
                float((out.float() - exact).norm() / exact.norm())
    return results


def english_bytes() -> torch.Tensor:
    """uint8 text of Python's LICENSE and pydoc topic help (English prose, offline)."""
    from pydoc_data import topics
    text = "".join(topics.topics.values())
    for path in sorted(glob.glob("/usr/lib/python3*/LICENSE.txt"))[:1]:
        text += open(path, encoding="utf-8", errors="ignore").read()
    return torch.frombuffer(bytearray(text.encode("ascii", errors="ignore")), dtype=torch.uint8).long()


def train_tiny_gpt2(data, seconds=TRAIN_SECONDS, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=256, n_positions=1024, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start, steps = time.time(), 0
    while time.time() - start < seconds:
        starts = torch.randint(0, len(data) - CONTEXT - 1, (32,))
        batch = torch.stack([data[s:s + CONTEXT + 1] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return model.eval(), steps, float(loss)


@torch.no_grad()
def teacher_forced(model, ids, cache_dtype):
    """log-softmax [T, V] of each next token, one token per forward over the (patched) cache."""
    with kvkernels.patched(model, backend="torch", cache_dtype=cache_dtype):
        out = model(ids[:, :1], use_cache=True)
        logits = [out.logits[0, -1]]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits).float().log_softmax(-1)


def model_metrics(model, data):
    held_out = data[-(EVAL_POSITIONS + 1):][None]                     # the last bytes: never a training start
    exact = teacher_forced(model, held_out, None)
    prompt = data[-600:-600 + 32][None]
    greedy_exact = kvkernels.generate(model, prompt, max_new_tokens=GREEDY_TOKENS, backend="torch",
                                      eos_token_id=[])[0, 32:]
    results = {"next-byte loss (fp32 cache)": float(F.nll_loss(exact[:-1], held_out[0, 1:]))}
    for name in CACHE_DTYPES:
        quant = teacher_forced(model, held_out, name)
        kl = F.kl_div(quant, exact, log_target=True, reduction="none").sum(-1)       # KL(exact || quant) [T]
        greedy = kvkernels.generate(model, prompt, max_new_tokens=GREEDY_TOKENS, backend="torch", eos_token_id=[],
                                    cache_dtype=name)[0, 32:]
        same = greedy == greedy_exact
        results[name] = dict(
            kl_mean=float(kl.mean()), kl_max=float(kl.max()),
            top1_agreement=float((quant.argmax(-1) == exact.argmax(-1)).float().mean()),
            greedy_agreement=float(same.float().mean()),
            greedy_first_divergence=int(same.logical_not().nonzero()[0]) if not same.all() else GREEDY_TOKENS)
    return results


def main():
    torch.set_num_threads(2)
    results = {"attention_relative_error": attention_errors()}
    data = english_bytes()
    model, steps, loss = train_tiny_gpt2(data[:-2000])
    results["model"] = dict(train_seconds=TRAIN_SECONDS, steps=steps, final_train_loss=loss, text_bytes=len(data))
    results.update(model_metrics(model, data))
    directory = output_dir(None, quick=False)
    with open(os.path.join(directory, "kv_accuracy.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
