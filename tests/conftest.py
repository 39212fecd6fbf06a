import os

import pytest
import torch

# Triton runs on the CPU only through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_backends():
    """Backends that can run on this machine's test device: the reference, Triton, and CUDA where built."""
    backends = ["torch", "triton"]
    if DEVICE.type == "cuda":
        from kvkernels import cuda_ext
        if cuda_ext.load() is not None:
            backends.append("cuda")
    return backends


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
