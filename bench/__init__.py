"""kvkernels benchmark harness: `python -m bench.kernels`, `python -m bench.generate`, `python -m bench.seeds`.

Every entry point takes `--quick` (tiny shapes, a CPU smoke run in seconds) and `--out DIR`, and writes
a JSON file (raw numbers + environment), a Markdown table and PNG plots. See BENCHMARKS.md.
"""
import os

import torch

# Triton runs on the CPU only through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
