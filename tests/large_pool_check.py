"""Decode and write on a pool of more than 2**31 elements, far blocks included; prints the max errors.

Run in a child process by tests/test_large_pool.py: an int32 offset overflow is an illegal address,
which can kill the process rather than raise. On the CPU the pool is never touched beyond the few
blocks used, so it costs little real memory.
"""
import sys

import torch

import kvkernels
from kvkernels import reference


def main(backends):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_blocks, block_size, heads, dim = 2**31 // (16 * 64) + 64, 16, 1, 64
    k_cache = torch.empty(num_blocks, block_size, heads, dim, dtype=torch.float16, device=device)
    v_cache = torch.empty_like(k_cache)
    assert k_cache.numel() > 2**31
    tables = torch.tensor([[num_blocks - 1, 3, num_blocks - 2], [num_blocks - 5, 0, 0]], dtype=torch.int32,
                          device=device)
    for block in set(tables.flatten().tolist()):
        k_cache[block].normal_()
        v_cache[block].normal_()
    q = torch.randn(2, heads, dim, dtype=torch.float16, device=device)
    lens = torch.tensor([40, 16], dtype=torch.int32, device=device)
    far_slot = torch.tensor([(num_blocks - 1) * block_size + 13], device=device)
    for backend in backends:
        # Each backend's write lands in a block that sequence 0 reads, so the next backend's expectation moves.
        expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens)
        out = torch.full_like(q, float("nan"))
        kvkernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, backend=backend, out=out)
        new_k = torch.randn(1, heads, dim, dtype=torch.float16, device=device)
        kvkernels.write_kv_cache(new_k, -new_k, k_cache, v_cache, far_slot, backend=backend)
        written = torch.equal(k_cache[num_blocks - 1, 13], new_k[0]) and torch.equal(v_cache[num_blocks - 1, 13],
                                                                                     -new_k[0])
        print(backend, (out.float() - expected.float()).abs().max().item(), written)


if __name__ == "__main__":
    main(sys.argv[1:])
