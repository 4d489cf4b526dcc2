"""KVCacheManager (torch-free): block tables, prefix hits with exact block ids, the sliding-window group
dropping blocks and what a prefix hit needs from it, and allocation that fails without side effects."""

import os
import subprocess
import sys
from pathlib import Path

import leanfm
from leanfm.engine.kv import NULL_BLOCK, KVCacheManager, KVGroupSpec

BS = 4


class Req:
    def __init__(self, rid, ids):
        self.request_id, self.all_token_ids, self.block_keys = rid, list(ids), []


def manager(full=10, sliding=None, window=6, caching=True):
    groups = [KVGroupSpec("full", (0,), None, full, 1)]
    if sliding:
        groups.append(KVGroupSpec("sliding", (1,), window, sliding, 1))
    return KVCacheManager(groups, BS, caching)


def run(kv, req, chunk=4, start=0):
    """Compute the request's tokens from `start` in chunks, as the scheduler would."""
    c = start
    while c < len(req.all_token_ids):
        n = min(chunk, len(req.all_token_ids) - c)
        assert kv.allocate_slots(req, c, n)
        c += n
        kv.cache_blocks(req, c)


def assert_all_free(kv):
    for pool in kv.pools:
        assert pool.num_free == pool.num_usable and not any(pool.ref_cnt)


def test_prefix_hit_shares_blocks_and_is_counted():
    kv = manager()
    a = Req("a", range(10))
    run(kv, a, chunk=10)
    assert kv.block_tables(a) == ((1, 2, 3),)
    b = Req("b", [*range(8), 50, 51, 52])
    prefix = kv.get_computed_blocks(b)
    assert prefix.num_tokens == 8 and prefix.blocks == ((1, 2),)
    assert kv.allocate_slots(b, 8, 3, prefix)
    assert kv.block_tables(b) == ((1, 2, 4),)
    assert kv.pools[0].ref_cnt[1:5] == [2, 2, 1, 1]
    assert (kv.prefix_queries, kv.prefix_hits) == (10 + 11, 8)
    c = Req("c", range(8))  # exactly two cached blocks: the last one is recomputed for its logits
    assert kv.get_computed_blocks(c).num_tokens == 4
    for r in (a, b):
        kv.free(r)
    assert_all_free(kv)
    assert kv.get_computed_blocks(Req("d", range(9))).num_tokens == 8  # cached while free


def test_no_caching_means_no_hits():
    kv = manager(caching=False)
    run(kv, Req("a", range(12)))
    assert kv.get_computed_blocks(Req("b", range(12))).num_tokens == 0
    assert kv.prefix_queries == 0


def test_sliding_group_drops_blocks_out_of_window():
    kv = manager(full=12, sliding=12, window=6)
    a = Req("a", range(24))
    run(kv, a, chunk=1, start=0)
    full, sliding = kv.block_tables(a)
    assert len(full) == 6 and NULL_BLOCK not in full
    # the next query (position 24) sees positions 19..23: blocks 4 and 5 only
    assert sliding[:4] == (NULL_BLOCK,) * 4 and NULL_BLOCK not in sliding[4:]
    assert kv.num_live_blocks(a, 1) <= 3
    kv.free(a)
    assert_all_free(kv)


def test_sliding_hit_needs_the_window_blocks():
    kv = manager(full=12, sliding=12, window=6)
    a = Req("a", range(20))
    run(kv, a)
    kv.free(a)
    b = Req("b", [*range(16), 99, 98, 97, 96])
    assert kv.get_computed_blocks(b).num_tokens == 16  # the dropped sliding blocks are still cached
    # forget sliding block 0 (outside the window of position 16): the hit stands
    pool = kv.pools[1]
    keys = b.block_keys

    def evict(i):
        block = pool.cached.pop(keys[i])
        pool.key[block] = None

    evict(0)
    prefix = kv.get_computed_blocks(b)
    assert prefix.num_tokens == 16 and prefix.blocks[1][:2] == (NULL_BLOCK, NULL_BLOCK)
    # forget block 3 (inside the window): the longest usable prefix is 3 blocks (window at 12: blocks 1, 2)
    evict(3)
    prefix = kv.get_computed_blocks(b)
    assert prefix.num_tokens == 12 and prefix.blocks[1][0] == NULL_BLOCK and NULL_BLOCK not in prefix.blocks[1][1:]
    assert len(prefix.blocks[0]) == 3 and NULL_BLOCK not in prefix.blocks[0]
    assert kv.allocate_slots(b, 12, 8, prefix)
    kv.free(b)
    assert_all_free(kv)


def test_failed_allocation_takes_nothing():
    kv = manager(full=5)  # 4 usable
    a = Req("a", range(8))
    run(kv, a)
    kv.free(a)  # two cached free blocks
    b = Req("b", [*range(8), *range(100, 108)])
    prefix = kv.get_computed_blocks(b)
    assert prefix.num_tokens == 8
    c = Req("c", [*range(4), *range(200, 216)])
    pc = kv.get_computed_blocks(c)
    assert pc.num_tokens == 4 and not kv.allocate_slots(c, 4, 16, pc)  # 1 revived + 4 new > 4 free
    assert kv.pools[0].num_free == 4 and not kv.holds(c) and kv.prefix_hits == 0
    assert kv.allocate_slots(b, 8, 8, prefix)  # 2 revived + 2 new
    assert kv.pools[0].num_free == 0
    kv.free(b)
    assert_all_free(kv)


def test_kv_package_is_torch_free():
    code = "import sys, leanfm.engine.scheduler, leanfm.engine.kv; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(leanfm.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
