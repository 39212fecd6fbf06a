"""Bad inputs fail loudly, naming the argument, on every backend: no silent wrong answer."""
import pytest
import torch

import kvkernels
from kvkernels import ops
from conftest import DEVICE, kernel_backends
from helpers import make_problem

BACKENDS = kernel_backends()


@pytest.fixture
def problem():
    return make_problem([5, 20], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, device=DEVICE)


def decode(p, backend="torch", **overrides):
    args = dict(q=p.q, k_cache=p.k_cache, v_cache=p.v_cache, block_tables=p.block_tables, seq_lens=p.seq_lens)
    args.update(overrides)
    return kvkernels.paged_decode_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("override, error, match", [
    (lambda p: dict(q=p.q.int()), TypeError, "q has dtype"),
    (lambda p: dict(q=p.q.double()), TypeError, "q has dtype"),
    (lambda p: dict(k_cache=p.k_cache.half()), TypeError, "k_cache has dtype"),
    (lambda p: dict(v_cache=p.v_cache.half()), TypeError, "v_cache has dtype"),
    (lambda p: dict(block_tables=p.block_tables.long()), TypeError, "block_tables must be int32"),
    (lambda p: dict(seq_lens=p.seq_lens.long()), TypeError, "seq_lens must be int32"),
    (lambda p: dict(q=p.q.tolist()), TypeError, "q must be a torch.Tensor"),
    (lambda p: dict(q=p.q[0]), ValueError, r"q must be \[batch, num_heads, head_dim\]"),
    (lambda p: dict(k_cache=p.k_cache[0]), ValueError, "k_cache must be"),
    (lambda p: dict(v_cache=p.v_cache[:, :4]), ValueError, "v_cache has shape"),
    (lambda p: dict(q=p.q[..., :16].contiguous()), ValueError, "head_dim"),
    (lambda p: dict(q=torch.cat([p.q, p.q[:, :1]], 1)), ValueError, r"num_heads \(5\) must be a multiple"),
    (lambda p: dict(block_tables=p.block_tables[:1]), ValueError, "block_tables must be"),
    (lambda p: dict(seq_lens=p.seq_lens[:1]), ValueError, "seq_lens must be"),
    (lambda p: dict(seq_lens=torch.zeros_like(p.seq_lens)), ValueError, "seq_lens must be >= 1"),
    (lambda p: dict(seq_lens=p.seq_lens + 1000), ValueError, "exceeds what block_tables covers"),
    (lambda p: dict(block_tables=-p.block_tables - 1), ValueError, r"block_tables\[0, 0\] = .* outside"),
    (lambda p: dict(k_cache=p.k_cache.transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "k_cache must be contiguous in its last"),
    (lambda p: dict(q=p.q.to("meta")), ValueError, "all tensors must share a device"),
    (lambda p: dict(split_counters=torch.zeros(2, 2)), ValueError, "split_counters must be a contiguous int32"),
    (lambda p: dict(split_counters=torch.zeros(2, 4, dtype=torch.int32, device=p.q.device)), ValueError,
     r"split_counters must be .* shape \(2, 2\)"),
    (lambda p: dict(split_counters=torch.zeros(2, 2, dtype=torch.int32, device=p.q.device).t()), ValueError,
     "split_counters must be a contiguous"),
    (lambda p: dict(split_counters=torch.ones(2, 2, dtype=torch.int32, device=p.q.device)), ValueError,
     "split_counters must be all zero"),
    (lambda p: dict(split_counters=[[0, 0], [0, 0]]), TypeError, "split_counters must be a torch.Tensor"),
])
def test_bad_decode_inputs(problem, backend, override, error, match):
    with pytest.raises(error, match=match):
        decode(problem, backend, **override(problem))


def test_unknown_backend(problem):
    with pytest.raises(ValueError, match="backend must be one of"):
        decode(problem, backend="flash")


def test_bad_out_buffer(problem):
    with pytest.raises(ValueError, match="out must be"):
        decode(problem, out=torch.empty(2, 4, 16, device=DEVICE))


def test_junk_table_entries_past_the_last_block_are_fine(problem):
    """make_problem fills unused table columns with out-of-range ids; they are never read or rejected."""
    assert (problem.block_tables >= problem.k_cache.shape[0]).any()
    assert not decode(problem).isnan().any()


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_triton_on_cpu_needs_the_interpreter(problem, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.resolve_backend("auto", problem.q.device) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        decode(problem, backend="triton")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="CPU-only behaviour")
def test_auto_uses_the_interpreted_triton_kernel_when_enabled(problem, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend("auto", problem.q.device) == "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("override, error, match", [
    (lambda a: dict(slot_mapping=a["slot_mapping"].int()), TypeError, "slot_mapping must be int64"),
    (lambda a: dict(k=a["k"].half()), TypeError, "k has dtype"),
    (lambda a: dict(k=a["k"][:, :1]), ValueError, "k must be"),
    (lambda a: dict(v=a["v"][:2]), ValueError, "v has shape"),
    (lambda a: dict(slot_mapping=a["slot_mapping"][:2]), ValueError, "slot_mapping must be"),
    (lambda a: dict(slot_mapping=a["slot_mapping"] + 1000), ValueError, r"values must be -1 \(skip\) or in"),
    (lambda a: dict(slot_mapping=a["slot_mapping"] - 10), ValueError, r"values must be -1 \(skip\) or in"),
    (lambda a: dict(slot_mapping=torch.zeros_like(a["slot_mapping"])), ValueError, "same slot more than once"),
])
def test_bad_write_inputs(backend, override, error, match):
    args = dict(k=torch.randn(3, 2, 8, device=DEVICE), v=torch.randn(3, 2, 8, device=DEVICE),
                k_cache=torch.randn(4, 4, 2, 8, device=DEVICE), v_cache=torch.randn(4, 4, 2, 8, device=DEVICE),
                slot_mapping=torch.tensor([1, 6, -1], device=DEVICE))
    before = args["k_cache"].clone()
    args.update(override(args))
    with pytest.raises(error, match=match):
        kvkernels.write_kv_cache(**args, backend=backend)
    assert torch.equal(args["k_cache"], before), "a rejected write must not touch the cache"
