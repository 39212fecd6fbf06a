"""64-bit offsets: a pool over 2**31 elements decodes and appends correctly (bug shipped elsewhere:
int32 `block_id * stride` overflow)."""
import os
import subprocess
import sys

from conftest import kernel_backends


def test_pool_over_2_pow_31_elements():
    backends = [b for b in kernel_backends() if b != "torch"]
    script = os.path.join(os.path.dirname(__file__), "large_pool_check.py")
    run = subprocess.run([sys.executable, script, *backends], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-3000:]}"
    lines = run.stdout.split()
    results = {lines[i]: (float(lines[i + 1]), lines[i + 2]) for i in range(0, len(lines), 3)}
    assert sorted(results) == sorted(backends)
    for backend, (error, written) in results.items():
        assert error < 2e-3, f"{backend}: max error {error}"
        assert written == "True", f"{backend}: the far slot was not written"
