"""Accuracy of fp8 / int8 paged KV against fp16 pages, measured on the CPU.

    python -m bench.kv_accuracy            # ~30 minutes on 2 CPU cores; bench/results/kv_accuracy.{json,md}
    python -m bench.kv_accuracy --quick    # a smoke run in under a minute (a temp folder, not bench/results)

1. Attention output relative error (Frobenius) of the reference decode over random pages (Gaussian K/V, and
   with two key channels 10x the rest, as real keys have), fp8 / int8 pages with per-token scales vs fp16 pages.
2. Two GPT-2s in fp16, each with kvkernels.patch(cache_dtype=...) / kvkernels.generate(cache_dtype=...) against
   the same model on fp16 pages:
   - teacher-forced next-token KL(fp16 || quantized) and top-1 agreement over EVAL_POSITIONS positions;
   - greedy decoding (kvkernels.generate) for GENERATED_TOKENS tokens: agreement position by position and the
     first divergence;
   - sampling with the seed tutorials' settings (T=0.7, top-k 50, top-p 0.9, repetition penalty 1.2; patched
     model.generate, one seed for both caches): the same agreement. Two caches draw the same token until their
     distributions differ enough to move the draw, so this follows the text a user would see, and it does not
     agree trivially where greedy text has collapsed into a loop.
   Models:
   - "trained": 2 layers, 4 heads, d=128, byte vocabulary, no dropout, TRAIN_STEPS AdamW steps (warm-up, cosine)
     of BATCH x CONTEXT bytes of English text that ships with Python (pydoc's topic help and the LICENSE), in
     fp32, then cast to fp16; every position the evaluation uses was trained; a HELD_OUT window left out for the
     evaluation text and prompt.
   - "random": 4 layers, 4 heads, d=256, 512 tokens, random weights with initializer_range 0.3 (spread logits:
     varied greedy tokens), on random token ids.
   Both are weak proxies: minutes of CPU training make a model that has learned byte statistics and common words,
   not language, and random weights have none of a trained model's outlier structure. Real checkpoints (GPT-2
   124M and up, on a GPU) are what these numbers stand in for.
"""
import argparse
import glob
import inspect
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

import kvkernels
from kvkernels import reference

from .common import add_run_args, environment, environment_markdown, markdown_table, output_dir, smoke_run_notice, \
    write_json

FULL = dict(train_steps=700, eval_positions=300, generated_tokens=500)
QUICK = dict(train_steps=4, eval_positions=16, generated_tokens=16)
CONTEXT, BATCH, LEARNING_RATE, WARMUP_STEPS, PROMPT = 544, 8, 3e-3, 50, 32
HELD_OUT = slice(100_000, 102_000)  # bytes of pydoc's topic help never trained on
CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2)  # the seeds'


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


def train_tiny_gpt2(data, steps, seed=0, progress=True):
    """A byte-level GPT-2 trained on `data` (int64 [N]) for `steps` steps; returns (model, last loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=256, n_positions=1024, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01, betas=(0.9, 0.98))
    # Linear warm-up, then a cosine from the peak down to a tenth of it.
    cosine = lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * cosine(step))
    bar = tqdm(range(steps), desc="training byte GPT-2", unit="step", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,))
        batch = torch.stack([data[s:s + CONTEXT] for s in starts])    # [BATCH, CONTEXT]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), loss.item()


@torch.no_grad()
def teacher_forced(model, ids, cache_dtype):
    """fp32 log-softmax [T, V] of each next token, one token per forward over the (patched) cache."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24+
    with kvkernels.patched(model, backend="torch", cache_dtype=cache_dtype):
        out = model(ids[:, :1], use_cache=True)
        logits = [out.logits[0, -1]]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t:t + 1], use_cache=True, **{cache_arg: out.past_key_values})
            logits.append(out.logits[0, -1])
    return torch.stack(logits).float().log_softmax(-1)


def greedy(model, prompt, cache_dtype, tokens):
    """int64 [tokens]: kvkernels.generate's greedy continuation of prompt [1, PROMPT], EOS off."""
    return kvkernels.generate(model, prompt, max_new_tokens=tokens, backend="torch", eos_token_id=[],
                              cache_dtype=cache_dtype)[0, prompt.shape[1]:]


@torch.no_grad()
def sampled(model, prompt, cache_dtype, tokens, seed=0):
    """int64 [tokens]: patched model.generate's sampled continuation (the seeds' settings), seeded, EOS off."""
    with kvkernels.patched(model, backend="torch", cache_dtype=cache_dtype):
        torch.manual_seed(seed)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                             min_new_tokens=tokens, pad_token_id=0, **SAMPLING)
    return out[0, prompt.shape[1]:]


def agreement(kind, tokens, baseline):
    same = tokens == baseline
    first = int(same.logical_not().nonzero()[0]) if not same.all() else len(same)
    return {f"{kind}_agreement": float(same.float().mean()), f"{kind}_first_divergence": first}


def model_metrics(model, text, prompt, tokens):
    """text int64 [1, positions + 1] for teacher forcing; prompt int64 [1, PROMPT] for greedy and sampled text."""
    exact = teacher_forced(model, text, None)
    greedy_exact, sampled_exact = greedy(model, prompt, None, tokens), sampled(model, prompt, None, tokens)
    results = {"next-token loss (fp16 cache, nats)": float(F.nll_loss(exact[:-1], text[0, 1:])),
               "greedy distinct tokens (fp16 cache)": int(greedy_exact.unique().numel()),
               "sampled distinct tokens (fp16 cache)": int(sampled_exact.unique().numel())}
    for name in CACHE_DTYPES:
        quant = teacher_forced(model, text, name)
        kl = F.kl_div(quant, exact, log_target=True, reduction="none").sum(-1)       # KL(exact || quant) [T]
        results[name] = dict(
            kl_mean=float(kl.mean()), kl_max=float(kl.max()),
            top1_agreement=float((quant.argmax(-1) == exact.argmax(-1)).float().mean()),
            **agreement("greedy", greedy(model, prompt, name, tokens), greedy_exact),
            **agreement("sampled", sampled(model, prompt, name, tokens), sampled_exact))
    return results


def random_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=512, n_positions=1024, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def markdown(result):
    settings = result["settings"]
    lines = ["# Quantized KV accuracy (fp8 / int8 pages against fp16 pages)", "",
             environment_markdown(result["environment"]), ""]
    if result["quick"]:
        lines += [smoke_run_notice(result["environment"]), ""]
    lines += ["## Attention output, relative error against fp16 pages (reference decode, per-token scales)", "",
              markdown_table(["pages", "Gaussian K/V", "outlier key channels"],
                             [[name, f"{result['attention_relative_error'][f'{name}, gaussian']:.4f}",
                               f"{result['attention_relative_error'][f'{name}, outlier channels']:.4f}"]
                              for name in CACHE_DTYPES]), "",
              f"## fp16 models against the same model on fp16 pages ({settings['eval_positions']} teacher-forced "
              f"positions, {settings['generated_tokens']} greedy and sampled tokens)", ""]
    rows = []
    for label, key in (("trained byte GPT-2", "trained"), ("random GPT-2", "random")):
        m = result[key]
        about = (f"{label} (next-token loss {m['next-token loss (fp16 cache, nats)']:.2f} nats; distinct tokens: greedy "
                 f"{m['greedy distinct tokens (fp16 cache)']}, sampled {m['sampled distinct tokens (fp16 cache)']})")
        rows += [[about, name, f"{m[name]['kl_mean']:.2g}", f"{m[name]['kl_max']:.2g}",
                  f"{m[name]['top1_agreement']:.1%}", f"{m[name]['greedy_agreement']:.1%}",
                  m[name]["greedy_first_divergence"], f"{m[name]['sampled_agreement']:.1%}",
                  m[name]["sampled_first_divergence"]] for name in CACHE_DTYPES]
    lines += [markdown_table(["model", "pages", "KL mean", "KL max", "top-1 agreement", "greedy agreement",
                              "greedy first divergence", "sampled agreement", "sampled first divergence"], rows), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kv_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, "a smoke run: a few training steps, 16 positions and tokens (not accuracy results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    result = {"environment": environment(torch.device("cpu")), "quick": args.quick, "settings": settings,
              "attention_relative_error": attention_errors()}
    data = english_bytes()
    model, loss = train_tiny_gpt2(torch.cat([data[:HELD_OUT.start], data[HELD_OUT.stop:]]), settings["train_steps"],
                                  progress=not args.no_progress)
    held_out, positions, tokens = data[HELD_OUT], settings["eval_positions"], settings["generated_tokens"]
    result["trained"] = dict(final_train_loss=loss, text_bytes=len(data),
                             **model_metrics(model.half(), held_out[None, :positions + 1], held_out[None, -PROMPT:],
                                             tokens))
    ids = torch.randint(0, 512, (1, positions + 1 + PROMPT), generator=torch.Generator().manual_seed(1))
    result["random"] = model_metrics(random_gpt2().half(), ids[:, :positions + 1], ids[:, -PROMPT:], tokens)
    directory = output_dir(args.out, args.quick)
    write_json(directory / "kv_accuracy.json", result)
    (directory / "kv_accuracy.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
