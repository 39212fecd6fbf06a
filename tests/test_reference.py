"""The oracle itself, checked against the dense math in float64."""
import pytest
import torch

from kvkernels import reference
from kvkernels.split import MIN_SPLIT_TOKENS
from helpers import dense_attention_fp64, make_problem

BLOCK = 16


@pytest.mark.parametrize("lens", [
    [1], [BLOCK - 1], [BLOCK], [BLOCK + 1], [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK, 77],
    [MIN_SPLIT_TOKENS - 1, MIN_SPLIT_TOKENS, MIN_SPLIT_TOKENS + 1, 2 * MIN_SPLIT_TOKENS + 1],
])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1), (6, 2)])
def test_reference_matches_dense_math(lens, heads):
    p = make_problem(lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=40, block_size=BLOCK,
                     dtype=torch.float64)
    out = reference.paged_decode_attention(*p.args())
    expected = dense_attention_fp64(p.q, p.k_rows, p.v_rows, 40 ** -0.5)
    assert not out.isnan().any(), "NaN from a free slot leaked into the result"
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_reference_custom_scale_and_low_precision():
    p = make_problem([5, 33], head_dim=32, dtype=torch.bfloat16)
    out = reference.paged_decode_attention(*p.args(), scale=0.05)
    expected = dense_attention_fp64(p.q, p.k_rows, p.v_rows, 0.05)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1.6e-2)


def test_reference_write_kv_cache_places_rows_and_skips_padding():
    g = torch.Generator().manual_seed(1)
    k_cache = torch.full((5, 4, 2, 8), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k, v = torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 8, generator=g)
    slots = torch.tensor([13, -1, 0, 7])
    reference.write_kv_cache(k, v, k_cache, v_cache, slots)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // 4, slot % 4], k[i])
            assert torch.equal(v_cache[slot // 4, slot % 4], v[i])
    assert k_cache.isnan().sum() == k_cache.numel() - 3 * 16, "only the three given slots are written"
