"""BlockPool: reference counts, the free queue's eviction order, and the prefix cache map (torch-free)."""

import pytest

from leanfm.engine.kv.block_pool import NULL_BLOCK, BlockPool, block_key


def key(i):
    return block_key(None, (i, i, i, i))


def test_allocate_and_free_return_every_block():
    pool = BlockPool(6)
    assert pool.num_usable == 5 and pool.num_free == 5
    a = pool.allocate(3)
    assert a == [1, 2, 3] and NULL_BLOCK not in a and pool.num_used == 3
    pool.touch([a[0]])  # shared by a second request
    pool.free(a)
    assert pool.num_free == 4 and pool.ref_cnt[a[0]] == 1
    pool.free([a[0]])
    assert pool.num_free == 5 and all(c == 0 for c in pool.ref_cnt)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([a[0]])
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(6)


def test_eviction_order_uncached_first_then_least_recently_freed():
    pool = BlockPool(6)
    blocks = pool.allocate(5)
    for b in blocks[:3]:
        pool.cache(b, key(b))
    pool.free([blocks[2], blocks[0]])  # cached, freed in this order
    pool.free([blocks[3]])  # uncached: reused before any cached block
    pool.free([blocks[1]])
    assert pool.allocate(1) == [blocks[3]]
    assert pool.allocate(1) == [blocks[2]]  # the least recently freed cached block is evicted
    assert pool.lookup(key(blocks[2])) is None and pool.key[blocks[2]] is None
    assert pool.lookup(key(blocks[0])) == blocks[0]


def test_touch_revives_a_cached_free_block():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.cache(b, key(7))
    pool.free([b])
    assert pool.is_free(b) and pool.lookup(key(7)) == b
    pool.touch([b])
    assert not pool.is_free(b) and pool.ref_cnt[b] == 1
    assert b not in pool.allocate(2)


def test_first_block_cached_under_a_key_wins():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, key(1))
    pool.cache(b, key(1))  # same content computed twice: the second stays uncached
    assert pool.lookup(key(1)) == a and pool.key[b] is None


def test_keys_chain_the_prefix():
    k1 = block_key(None, (1, 2))
    assert block_key(k1, (3, 4)) != block_key(block_key(None, (9, 2)), (3, 4))
    assert block_key(k1, (3, 4)) == block_key(block_key(None, (1, 2)), (3, 4))
