"""The slot KV cache's bookkeeping: lowest-first allocation and compaction."""

import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache


def _cache(n_slots=8):
    cfg = ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, intermediate_size=32, vocab_size=10)
    c = KVCache(cfg, n_slots=n_slots, max_seq=12)
    g = torch.Generator().manual_seed(0)
    for t in c.k + c.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return c


def test_compact_moves_sequences_into_the_lowest_slots():
    c = _cache()
    for _ in range(8):
        c.alloc()
    for s in (0, 2, 4, 6, 7):
        c.free(s)
    used = [(5, 7), (1, 4), (3, 9)]  # (slot, positions written)
    before = [(t.clone()) for t in c.k + c.v]
    moves = c.compact(used)
    assert moves == {5: 0, 3: 2}  # 1 stays; the highest slots fill the holes below 3
    for old, new in [(t, u) for t, u in zip(before, c.k + c.v)]:
        assert torch.equal(new[0, :, :7], old[5, :, :7])
        assert torch.equal(new[2, :, :9], old[3, :, :9])
        assert torch.equal(new[1], old[1])
    assert [c.alloc() for _ in range(5)] == [3, 4, 5, 6, 7]  # lowest free first, moved-from slots free
    assert c.n_free == 0


def test_compact_without_holes_moves_nothing():
    c = _cache()
    for _ in range(3):
        c.alloc()
    assert c.compact([(0, 5), (1, 5), (2, 5)]) == {}
    assert c.alloc() == 3
