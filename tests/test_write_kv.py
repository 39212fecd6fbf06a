"""write_kv_cache on every backend against the reference, including padding slots and strided inputs."""
import pytest
import torch

import kvkernels
from kvkernels import reference
from conftest import DEVICE, kernel_backends

BACKENDS = kernel_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads_dim", [(1, 32), (3, 80), (4, 64), (2, 256)])
def test_write_matches_reference(backend, dtype, heads_dim):
    heads, dim = heads_dim
    g = torch.Generator().manual_seed(heads * dim)
    num_blocks, block_size, n = 6, 8, 11
    pool = torch.randn(num_blocks, block_size, heads, dim, generator=g).to(dtype).to(DEVICE)
    k_cache, v_cache = pool.clone(), pool.clone() + 1
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    slots[[2, 7]] = -1
    slots = torch.stack([slots, slots], dim=1).to(DEVICE)[:, 0]  # a strided view
    assert slots.stride(0) == 2
    # k and v as views into a fused projection [N, 3, H, D], the way attention layers produce them
    qkv = torch.randn(n, 3, heads, dim, generator=g).to(dtype).to(DEVICE)
    k, v = qkv[:, 1], qkv[:, 2]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(k, v, expected_k, expected_v, slots)
    kvkernels.write_kv_cache(k, v, k_cache, v_cache, slots, backend=backend)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert not torch.equal(k_cache, pool), "nothing was written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_then_decode_round_trip(backend):
    """Tokens written one step at a time into scattered blocks decode like dense attention."""
    g = torch.Generator().manual_seed(7)
    heads, dim, block_size, steps = 2, 32, 8, 19
    k_cache = torch.full((8, block_size, heads, dim), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.tensor([[5, 2, 7]], dtype=torch.int32, device=DEVICE)
    ks, vs = torch.randn(steps, heads, dim, generator=g), torch.randn(steps, heads, dim, generator=g)
    for pos in range(steps):
        slot = torch.tensor([int(table[0, pos // block_size]) * block_size + pos % block_size], device=DEVICE)
        kvkernels.write_kv_cache(ks[pos:pos + 1].to(DEVICE), vs[pos:pos + 1].to(DEVICE), k_cache, v_cache, slot,
                                 backend=backend)
    q = torch.randn(1, heads, dim, generator=g)
    out = kvkernels.paged_decode_attention(q.to(DEVICE), k_cache, v_cache, table,
                                           torch.tensor([steps], dtype=torch.int32, device=DEVICE), backend=backend)
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q[0], ks) * dim ** -0.5, dim=-1)
    torch.testing.assert_close(out[0].cpu(), torch.einsum("hl,lhd->hd", probs, vs), rtol=1e-5, atol=1e-5)


def test_triton_write_never_goes_past_the_pool():
    """Unvalidated slots past the pool are dropped by the kernel, not written out of bounds: the pools are
    views of larger buffers, so a stray write would land in the block right after them."""
    k_buffer = torch.zeros(3, 4, 1, 8, device=DEVICE)
    v_buffer = torch.zeros_like(k_buffer)
    k_cache, v_cache = k_buffer[:2], v_buffer[:2]                   # 8 slots
    k = torch.randn(2, 1, 8, device=DEVICE)
    kvkernels.write_kv_cache(k, k, k_cache, v_cache, torch.tensor([3, 8], device=DEVICE), backend="triton",
                             validate=False)
    assert torch.equal(k_cache[0, 3], k[0]) and torch.equal(v_cache[0, 3], k[0])
    assert k_buffer[2].count_nonzero() == 0 and v_buffer[2].count_nonzero() == 0, "slot 8 was written past the pool"
