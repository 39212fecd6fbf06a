"""python -m kvkernels, the demo a new user runs first."""
import re
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kvkernels import __main__ as demo

METHODS = ["HF generate, no cache", "HF generate, dynamic cache", "kvkernels.patch + HF generate",
           "kvkernels.generate"]


def test_help_explains_every_flag():
    parser_flags = ["--model", "--tokenizer", "--prompt", "--max-new-tokens", "--batch-size", "--dtype", "--device",
                    "--backend", "--block-size", "--no-cuda-graph", "--skip-no-cache", "--seed"]
    out = subprocess.run([sys.executable, "-m", "kvkernels", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in parser_flags:
        # Each flag is followed by help text on its own line or the next one.
        assert re.search(rf"{flag}\b[^\n]*\n?\s+\S", out.stdout), flag
    assert "tokens/s" in out.stdout


def test_runs_every_method_and_they_agree(capsys):
    assert demo.main(["--device", "cpu", "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("HF", "kvkernels"))}
    assert list(rows) == METHODS
    for name in METHODS[1:]:
        assert rows[name].rstrip().endswith("yes"), rows[name]
    numbers = re.findall(r"^kvkernels\.generate\s+([\d.]+)\s+([\d.]+)\s+(\d+)", out, re.M)
    tokens_per_second, ms_per_token, new_tokens = numbers[0]
    assert float(tokens_per_second) > 0 and float(ms_per_token) > 0 and int(new_tokens) == 3
    assert "token ids [" in out                             # no tokenizer: the ids are printed
    assert re.search(r"^note: the first kvkernels\.generate call took [\d.]+ s", out, re.M)


def test_local_model_directory(tmp_path, capsys):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    assert demo.main(["--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "6", "--skip-no-cache"]) == 0
    out = capsys.readouterr().out
    assert "HF generate, no cache" not in out and "kvkernels.patch + HF generate" in out
    assert "0.1M parameters" in out or "0.0M parameters" in out
    with pytest.raises(SystemExit, match="n_positions=64"):
        demo.main(["--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "60"])


def test_tokenizer_prompt_and_decoded_output(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>"] + "the quick brown fox jumps over lazy dog a cat sat on mat".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(words), n_positions=32)) \
        .save_pretrained(tmp_path / "model")
    assert demo.main(["--model", str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tok"), "--device", "cpu",
                      "--prompt", "the cat sat on the", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "prompt 5 tokens" in out
    decoded = re.search(r"first sequence, new tokens: '(.*)'", out).group(1).split()
    assert len(decoded) == 4 and set(decoded) <= set(words)


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--max-new-tokens", "0"])
    assert exit_info.value.code == 2 and "--max-new-tokens must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--dtype", "int8"])
