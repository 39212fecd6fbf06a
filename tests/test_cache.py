"""PagedKVCache and its allocator: invariants (property tests), exhaustion, and decode over appended tokens."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvkernels import BlockAllocator, CacheFullError, PagedKVCache
from conftest import DEVICE, kernel_backends
from helpers import dense_attention_fp64


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 12),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_allocator_invariants(num_blocks, ops):
    alloc = BlockAllocator(num_blocks)
    owned = []  # groups of blocks handed out, in order
    for is_alloc, n in ops:
        if is_alloc:
            free_before = alloc.num_free
            if n > free_before:
                with pytest.raises(CacheFullError) as err:
                    alloc.allocate(n)
                assert (err.value.needed, err.value.free) == (n, free_before)
                assert alloc.num_free == free_before, "a failed allocation must take nothing"
                continue
            blocks = alloc.allocate(n)
            assert len(blocks) == len(set(blocks)) == n
            assert all(0 <= b < num_blocks for b in blocks)
            held = {b for group in owned for b in group}
            assert not held & set(blocks), "a block was handed out twice"
            owned.append(blocks)
        elif owned:
            group = owned.pop(n % len(owned))
            alloc.free(group)
            if group:
                with pytest.raises(ValueError, match="not allocated"):
                    alloc.free(group[:1])  # double free is refused
        held = sum(len(g) for g in owned)
        assert alloc.num_in_use == held and alloc.num_free == num_blocks - held


def test_allocator_rejects_bad_frees():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    with pytest.raises(ValueError, match="twice"):
        alloc.free([blocks[0], blocks[0]])
    with pytest.raises(ValueError, match="block 3 is not allocated"):
        alloc.free([3])
    assert alloc.num_in_use == 2


def make_cache(backend, **kw):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=32, max_batch_size=3, num_blocks=12, block_size=4,
                dtype=torch.float32, device=DEVICE, backend=backend)
    args.update(kw)
    return PagedKVCache(**args)


@pytest.mark.parametrize("backend", kernel_backends())
def test_ragged_appends_decode_like_dense_attention(backend):
    """Prompts of different lengths, then decode steps; every layer's decode equals dense attention."""
    g = torch.Generator().manual_seed(3)
    cache = make_cache(backend, block_size=8)  # the CUDA kernel takes powers of two from 8
    for pool in cache.k_pools + cache.v_pools:
        pool.fill_(float("nan"))
    prompt_lens = [5, 1, 8]
    history = {(layer, s): ([], []) for layer in range(2) for s in range(3)}

    def append(seqs, counts):
        slots = cache.reserve(seqs, counts)
        for layer in range(2):
            k = torch.randn(sum(counts), 2, 32, generator=g)
            v = torch.randn(sum(counts), 2, 32, generator=g)
            cache.append(layer, k.to(DEVICE), v.to(DEVICE), slots)
            start = 0
            for s, n in zip(seqs, counts):
                history[layer, s][0].append(k[start:start + n])
                history[layer, s][1].append(v[start:start + n])
                start += n

    append([0, 1, 2], prompt_lens)
    for step in range(6):
        append([0, 1, 2], [1, 1, 1])
        for layer in range(2):
            q = torch.randn(3, 4, 32, generator=g)
            out = cache.decode(layer, q.to(DEVICE))
            ks = [torch.cat(history[layer, s][0]) for s in range(3)]
            vs = [torch.cat(history[layer, s][1]) for s in range(3)]
            torch.testing.assert_close(out.cpu().double(), dense_attention_fp64(q, ks, vs, 32 ** -0.5),
                                       rtol=1e-5, atol=1e-5)
    assert [cache.seq_len(s) for s in range(3)] == [n + 6 for n in prompt_lens]
    assert cache.seq_lens.tolist() == [n + 6 for n in prompt_lens]


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["reserve", "truncate", "free"]), st.lists(st.integers(0, 3), min_size=1,
                                                                                         max_size=4, unique=True),
                              st.integers(0, 20)), min_size=1, max_size=16))
def test_device_tables_and_lengths_follow_the_host_through_any_operations(ops):
    """After every reserve (leading slots or not, within a block or into new ones), truncate and free, the device's
    block_tables and seq_lens are the host's view: each position's block from the slots reserve returned, zeros past a
    sequence's blocks (a reserve copies only the table rows that grew: the others must already be right)."""
    cache = make_cache("torch", num_blocks=64, block_size=4, max_batch_size=4)
    blocks = {s: [] for s in range(4)}               # per sequence slot: the block of each position
    for op, seqs, n in ops:
        if op == "reserve":
            try:
                slots = cache.reserve(seqs, [n] * len(seqs)).tolist()
            except (CacheFullError, ValueError):        # pool or table full: all or nothing, the state stays
                slots, seqs = [], []
            for i, seq in enumerate(seqs):
                blocks[seq] += [slot // 4 for slot in slots[i * n:(i + 1) * n]]
        elif op == "truncate":
            lens = [min(n, len(blocks[s])) for s in seqs]
            cache.truncate(seqs, lens)
            for seq, keep in zip(seqs, lens):
                del blocks[seq][keep:]
        else:
            cache.free(seqs)
            for seq in seqs:
                blocks[seq] = []
        for seq in range(4):
            table = list(dict.fromkeys(blocks[seq]))    # one entry per block, in position order
            assert cache.block_tables[seq].tolist() == table + [0] * (cache.max_blocks_per_seq - len(table))
            assert int(cache.seq_lens[seq]) == len(blocks[seq]) == cache.seq_len(seq)


@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b == "triton"])
def test_reset_zeroes_a_split_counter_an_interrupted_decode_left(backend):
    """A split Triton decode merges through the pool's counters and leaves them at zero; one left behind (a decode
    interrupted mid-launch) would make every later split decode merge too early. reset() zeroes them."""
    cache = make_cache(backend, num_blocks=200, max_blocks_per_seq=200, block_size=4)
    q = torch.randn(1, 4, 32, device=DEVICE)
    for step in range(2):
        slots = cache.reserve([0], [700])
        k, v = torch.randn(2, 700, 2, 32, device=DEVICE)
        cache.append(0, k, v, slots)
        expected = dense_attention_fp64(q.cpu(), [k.cpu()], [v.cpu()], 32 ** -0.5)
        torch.testing.assert_close(cache.decode(0, q).cpu().double(), expected, rtol=1e-5, atol=1e-5)
        assert not cache.split_counters.any()
        cache.split_counters[0, 0] = 1       # what an interrupted launch can leave
        cache.reset()


def test_exhaustion_is_clear_and_loses_nothing():
    cache = make_cache("torch", num_blocks=5)
    slots = cache.reserve([0, 1], [9, 3])        # 3 + 1 blocks
    k = torch.randn(12, 2, 32, device=DEVICE)
    cache.append(0, k, k, slots)
    tables_before = cache.block_tables.clone()
    with pytest.raises(CacheFullError, match=r"needs 2 new block\(s\) but only 1 of 5 are free"):
        cache.reserve([0, 1], [4, 4])           # seq 0 needs 1 more block, seq 1 needs 1 more
    assert [cache.seq_len(0), cache.seq_len(1)] == [9, 3]
    assert torch.equal(cache.block_tables, tables_before)
    q = torch.randn(2, 4, 32, device=DEVICE)
    before = cache.decode(0, q)
    cache.reserve([1], [1])                      # still fits in seq 1's block
    cache.free([0])
    assert cache.allocator.num_free == 5 - 1
    assert cache.seq_len(0) == 0 and before.isfinite().all()


def test_decode_of_an_empty_slot_is_refused():
    cache = make_cache("torch")
    cache.reserve([0], [3])
    with pytest.raises(ValueError, match=r"slot\(s\) \[1\] hold no tokens"):
        cache.decode(0, torch.randn(2, 4, 32, device=DEVICE))


def test_decode_on_chosen_slots():
    cache = make_cache("torch")
    slots = cache.reserve([2, 0], [3, 6])
    kv = torch.randn(9, 2, 32, device=DEVICE)
    cache.append(1, kv, kv, slots)
    q = torch.randn(1, 4, 32, device=DEVICE)
    out = cache.decode(1, q, seqs=[2])
    expected = dense_attention_fp64(q.cpu(), [kv[:3].cpu()], [kv[:3].cpu()], 32 ** -0.5)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_sizing_and_memory_report():
    by_tokens = make_cache("torch", num_blocks=None, max_tokens=30)       # 30 tokens -> 8 blocks of 4
    assert by_tokens.num_blocks == 8
    per_token = 2 * 2 * 2 * 32 * 4                                          # K+V x layers x heads x dim x fp32
    assert by_tokens.memory().bytes_per_token == per_token
    by_bytes = make_cache("torch", num_blocks=None, memory_bytes=per_token * 4 * 5 + 100)
    assert by_bytes.num_blocks == 5
    by_bytes.reserve([0], [6])
    mem = by_bytes.memory()
    assert (mem.blocks_in_use, mem.total_bytes) == (2, 5 * 4 * per_token)
    assert "2/5 blocks in use" in str(mem)
    with pytest.raises(ValueError, match="exactly one of"):
        make_cache("torch", max_tokens=10)
    with pytest.raises(ValueError, match="holds no block"):
        make_cache("torch", num_blocks=None, memory_bytes=10)


def test_reserve_rejects_more_than_the_table_covers():
    cache = make_cache("torch", max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="more than the block table covers"):
        cache.reserve([0], [9])
    assert cache.allocator.num_in_use == 0


def test_misuse_is_refused_at_the_call_that_is_wrong():
    cache = PagedKVCache(2, 2, 32, max_batch_size=2, num_blocks=4, block_size=4, dtype=torch.float32)
    k = torch.randn(3, 2, 32)
    cache.append(1, k, k, cache.reserve([0], [3]))
    q = torch.randn(1, 2, 32)
    expected = cache.decode(1, q)
    for layer in (2, 5, -1):           # -1 would silently read the last layer
        with pytest.raises(ValueError, match=rf"layer {layer} is outside \[0, 2\)"):
            cache.decode(layer, q)
        with pytest.raises(ValueError, match=rf"layer {layer} is outside"):
            cache.append(layer, k, k, torch.arange(3))
    with pytest.raises(TypeError, match="layer must be an int"):
        cache.decode(1.0, q)
    for seqs in ([9], [-1]):          # -1 would silently free the last slot
        with pytest.raises(ValueError, match=rf"seqs: sequence slot {seqs[0]} is outside \[0, 2\)"):
            cache.free(seqs)
        with pytest.raises(ValueError, match=rf"seqs: sequence slot {seqs[0]} is outside"):
            cache.decode(0, q, seqs)
    with pytest.raises(ValueError, match="freed once"):
        cache.free([0, 0])
    for seqs, lens in (([-1], [0]), ([9], [0])):   # -1 freed the last slot's blocks on the host, then failed
        with pytest.raises(ValueError, match=rf"seqs: sequence slot {seqs[0]} is outside"):
            cache.truncate(seqs, lens)
    with pytest.raises(ValueError, match="match lens one to one"):
        cache.truncate([0, 1], [1])                   # slot 1 was silently left out
    for length in (2.5, True):                        # 2.5 cut slot 0's pages before failing; True was stored
        with pytest.raises(ValueError, match="cannot truncate sequence 0"):
            cache.truncate([0], [length])
    with pytest.raises(ValueError, match=r"q must be a tensor \[batch, num_heads, head_dim\]"):
        cache.decode(1, q[0])                         # blamed seqs for q's rows
    # Nothing was changed by the refused calls.
    assert cache.seq_len(0) == 3 and cache.allocator.num_in_use == 1
    torch.testing.assert_close(cache.decode(1, q), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name, value", [("max_tokens", 0), ("num_blocks", 2.5), ("num_blocks", True),
                                         ("memory_bytes", -1), ("max_blocks_per_seq", -2), ("max_blocks_per_seq", 0),
                                         ("backend", "foo")])
def test_bad_sizes_and_backends_are_refused_at_construction_by_name(name, value):
    """max_tokens=0 was reported as num_blocks, 2.5 blocks failed in torch, max_blocks_per_seq=0 silently meant the
    whole pool, and an unknown backend was taken until the first append."""
    sizes = {"num_blocks": 8} if name in ("max_blocks_per_seq", "backend") else {}
    with pytest.raises(ValueError, match=name):
        PagedKVCache(1, 2, 32, max_batch_size=2, block_size=4, dtype=torch.float32, **sizes, **{name: value})


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float64, "float16"])
def test_a_dtype_the_kernels_cannot_compute_in_is_refused_at_construction(dtype):
    with pytest.raises(TypeError, match="dtype must be one of torch.float16, torch.bfloat16, torch.float32"):
        PagedKVCache(1, 1, 32, max_batch_size=1, num_blocks=1, dtype=dtype)


def test_reserve_ring_reuses_its_blocks_and_frees_each_once():
    cache = PagedKVCache(1, 2, 16, max_batch_size=3, num_blocks=8, block_size=4, max_blocks_per_seq=6)
    cache.reserve_ring([0, 2], [23, 5], ring_blocks=3)
    ring = cache.block_tables[0, :3].tolist()
    assert len(set(ring)) == 3 and cache.block_tables[0].tolist() == ring * 2
    assert cache.block_tables[2, :2].unique().numel() == 2 and cache.seq_lens.tolist() == [23, 0, 5]
    assert cache.allocator.num_free == 8 - 5
    cache.truncate([0], [9])                  # columns 0..2 stay, and they hold every block of the ring
    assert cache.allocator.num_free == 3 and cache.block_tables[0, :3].tolist() == ring
    cache.truncate([0], [4])
    assert cache.allocator.num_free == 5
    cache.reset()
    assert cache.allocator.num_free == 8
    with pytest.raises(ValueError, match="more than the block table"):
        cache.reserve_ring([0], [25], ring_blocks=2)
    cache.reserve([1], [3])
    with pytest.raises(ValueError, match="empty sequence slots"):
        cache.reserve_ring([1], [8], ring_blocks=2)
