"""Accuracy of fp8 / int8 paged KV against the unquantized cache, measured on the CPU.

    python -m bench.kv_accuracy              # ~8 minutes on 2 shared CPU cores; writes bench/results/kv_accuracy.json

1. Attention output relative error (Frobenius) of the reference decode over random pages (Gaussian K/V, and
   with two key channels 10x the rest, as real keys have), fp8 / int8 pages with per-token scales vs fp16 pages.
2. Two GPT-2s, each with kvkernels.patch(cache_dtype=...) / kvkernels.generate(cache_dtype=...) against the
   fp32 cache: teacher-forced next-token KL(fp32 || quantized) and top-1 agreement over EVAL_POSITIONS
   positions, and greedy token agreement over GREEDY_TOKENS tokens (position by position, and the first
   divergence).
   - "trained": 2 layers, 4 heads, d=128, byte vocabulary, trained for TRAIN_SECONDS on English text that ships
     with Python (pydoc's topic help and the LICENSE) on CONTEXT-byte windows (every position the evaluation
     uses was trained), a HELD_OUT window left out for the evaluation text and prompt.
   - "random": 4 layers, 4 heads, d=256, 512 tokens, random weights with initializer_range 0.3 (spread logits:
     varied greedy tokens), on random token ids.
   Both are weak proxies: minutes of CPU training make a model that has learned little (its greedy text may
   be one repeated byte, which agrees trivially), and random weights have none of a trained model's outlier
   structure. Real checkpoints (GPT-2 124M and up, on a GPU) are what these numbers stand in for.
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

TRAIN_SECONDS, CONTEXT, BATCH, EVAL_POSITIONS, GREEDY_TOKENS, PROMPT = 240, 544, 4, 300, 500, 32
HELD_OUT = slice(100_000, 102_000)  # bytes of pydoc's topic help never trained on
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
    """A byte-level GPT-2 trained on `data` (int64 [N]) for `seconds`; returns (model, steps, last loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=256, n_positions=1024, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    start, steps = time.time(), 0
    while time.time() - start < seconds:
        starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,))
        batch = torch.stack([data[s:s + CONTEXT + 1] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return model.eval(), steps, loss.item()


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


def model_metrics(model, text, prompt):
    """text int64 [1, EVAL_POSITIONS + 1] for teacher forcing; prompt int64 [1, PROMPT] for greedy decoding."""
    exact = teacher_forced(model, text, None)
    greedy_exact = kvkernels.generate(model, prompt, max_new_tokens=GREEDY_TOKENS, backend="torch",
                                      eos_token_id=[])[0, PROMPT:]
    results = {"next-token loss (fp32 cache, nats)": float(F.nll_loss(exact[:-1], text[0, 1:])),
               "greedy distinct tokens (fp32 cache)": int(greedy_exact.unique().numel())}
    for name in CACHE_DTYPES:
        quant = teacher_forced(model, text, name)
        kl = F.kl_div(quant, exact, log_target=True, reduction="none").sum(-1)       # KL(exact || quant) [T]
        greedy = kvkernels.generate(model, prompt, max_new_tokens=GREEDY_TOKENS, backend="torch", eos_token_id=[],
                                    cache_dtype=name)[0, PROMPT:]
        same = greedy == greedy_exact
        results[name] = dict(
            kl_mean=float(kl.mean()), kl_max=float(kl.max()),
            top1_agreement=float((quant.argmax(-1) == exact.argmax(-1)).float().mean()),
            greedy_agreement=float(same.float().mean()),
            greedy_first_divergence=int(same.logical_not().nonzero()[0]) if not same.all() else GREEDY_TOKENS)
    return results


def random_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=512, n_positions=1024, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def main():
    torch.set_num_threads(2)
    results = {"attention_relative_error": attention_errors()}
    data = english_bytes()
    model, steps, loss = train_tiny_gpt2(torch.cat([data[:HELD_OUT.start], data[HELD_OUT.stop:]]))
    held_out = data[HELD_OUT]
    results["trained"] = dict(train_seconds=TRAIN_SECONDS, steps=steps, final_train_loss=loss, text_bytes=len(data),
                              **model_metrics(model, held_out[None, :EVAL_POSITIONS + 1], held_out[None, -PROMPT:]))
    ids = torch.randint(0, 512, (1, EVAL_POSITIONS + 1 + PROMPT), generator=torch.Generator().manual_seed(1))
    results["random"] = model_metrics(random_gpt2(), ids[:, :EVAL_POSITIONS + 1], ids[:, -PROMPT:])
    directory = output_dir(None, quick=False)
    with open(os.path.join(directory, "kv_accuracy.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
