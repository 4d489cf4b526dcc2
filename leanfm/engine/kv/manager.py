"""KVCacheManager: per-request block tables over one BlockPool per KV group, and the prefix cache.

Protocol, as the scheduler uses it each step:

    prefix = kv.get_computed_blocks(req)            # waiting request: its cached prefix (maybe empty)
    ok = kv.allocate_slots(req, num_new, prefix)    # room for num_new more tokens? (False: nothing taken)
    ... the runner computes the tokens ...
    kv.cache_blocks(req)                            # full computed blocks become reusable prefixes
    kv.truncate(req, num_tokens)                    # rejected draft tokens: their blocks go back
    kv.free(req)                                    # finished, aborted or preempted

The sliding-window group keeps only the blocks the next queries can see: before each allocation it
drops blocks whose every position is older than `window` tokens before the first new token. A
streaming group (StreamingLLM) does the same but never drops its first blocks, which hold the sinks.
An h2o group's table covers slots, not positions: min(computed, budget) resident tokens plus the
step's new ones; the runner evicts back to the budget after each step, and the next allocation frees
the blocks past what the request then needs.

A prefix hit of n blocks needs, in every full group, the n blocks of the prefix, and in a sliding
group only the blocks covering the last `window - 1` positions of the prefix (older entries of its
table are the null block). The hit is the longest n for which all groups have what they need, and
never the whole sequence: the last token is always computed, to get its logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from leanfm.engine.kv.block_pool import NULL_BLOCK, BlockKey, BlockPool, block_key
from leanfm.engine.kv.groups import KVGroupSpec


class KVRequest(Protocol):
    """What the manager reads of a request."""

    request_id: str
    all_token_ids: list[int]
    block_keys: list[BlockKey]  # the manager's memo of the request's block keys
    # optional `cache_salt: str | None`: seeds the hash chain (a LoRA adapter's requests share only among themselves)


@dataclass(frozen=True)
class CachedPrefix:
    num_tokens: int  # prefix tokens whose KV is cached (a multiple of the block size)
    blocks: tuple[tuple[int, ...], ...]  # per group, the table entries (null where not needed)


EMPTY_PREFIX = CachedPrefix(0, ())


@dataclass
class _Tables:
    tables: list[list[int]]  # per group; index = logical block (position // block_size)
    num_cached: int = 0  # leading full blocks already registered in the prefix cache
    first_live: list[int] = field(default_factory=list)  # per group, first entry not yet dropped


class KVCacheManager:
    def __init__(self, groups: Sequence[KVGroupSpec], block_size: int, enable_prefix_caching: bool = True):
        if not groups:
            raise ValueError("a KV cache needs at least one group")
        self.groups = tuple(groups)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(g.num_blocks) for g in self.groups]
        self._reqs: dict[str, _Tables] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---------------------------------------------------------------- prefix cache
    def _keys(self, req: KVRequest, num_blocks: int) -> list[BlockKey]:
        keys, ids, bs = req.block_keys, req.all_token_ids, self.block_size
        for i in range(len(keys), num_blocks):
            keys.append(block_key(keys[-1] if keys else None, tuple(ids[i * bs:(i + 1) * bs]),
                                  getattr(req, "cache_salt", None)))
        return keys

    def get_computed_blocks(self, req: KVRequest) -> CachedPrefix:
        """The longest cached prefix of the request's tokens usable by every group (see the module doc)."""
        if not self.enable_prefix_caching:
            return EMPTY_PREFIX
        max_blocks = (len(req.all_token_ids) - 1) // self.block_size
        keys = self._keys(req, max_blocks)
        n = max_blocks
        for g, pool in zip(self.groups, self.pools, strict=True):
            if g.window is None:
                n = next((i for i in range(n) if pool.lookup(keys[i]) is None), n)
        for g, pool in zip(self.groups, self.pools, strict=True):
            if g.window is not None:
                n = self._sliding_hit(pool, keys, n, g.window)
        if n == 0:
            return EMPTY_PREFIX
        blocks = []
        for g, pool in zip(self.groups, self.pools, strict=True):
            lo = 0 if g.window is None else self._first_needed(n * self.block_size, g.window)
            blocks.append((NULL_BLOCK,) * lo + tuple(pool.cached[keys[i]] for i in range(lo, n)))
        return CachedPrefix(n * self.block_size, tuple(blocks))

    def _first_needed(self, num_computed: int, window: int) -> int:
        """First logical block a query at position num_computed (or later) can see through `window`."""
        return max(0, num_computed - window + 1) // self.block_size

    def _sliding_hit(self, pool: BlockPool, keys: list[BlockKey], n: int, window: int) -> int:
        while n > 0:
            lo = self._first_needed(n * self.block_size, window)
            missing = next((i for i in range(n - 1, lo - 1, -1) if pool.lookup(keys[i]) is None), None)
            if missing is None:
                return n
            n = missing  # a shorter prefix whose window lies below the missing block
        return 0

    def cache_blocks(self, req: KVRequest, num_computed_tokens: int) -> None:
        """Register the request's full, computed blocks in the prefix cache of every group."""
        t = self._reqs.get(req.request_id)
        if not self.enable_prefix_caching or t is None:
            return
        num_full = num_computed_tokens // self.block_size
        if num_full <= t.num_cached:
            return
        keys = self._keys(req, num_full)
        for table, pool in zip(t.tables, self.pools, strict=True):
            for i in range(t.num_cached, num_full):
                pool.cache(table[i], keys[i])
        t.num_cached = num_full

    # ---------------------------------------------------------------- allocation
    def allocate_slots(self, req: KVRequest, num_computed: int, num_new: int,
                       prefix: CachedPrefix = EMPTY_PREFIX) -> bool:
        """Make the request's tables cover positions [0, num_computed + num_new). For a request without
        tables (new or preempted), `prefix` is its cached prefix and num_computed == prefix.num_tokens.
        Returns False, taking nothing, when a group has too few free blocks."""
        t = self._reqs.get(req.request_id)
        if t is not None:
            self._drop_out_of_window(t, num_computed)
            tables = t.tables
        else:
            tables = [list(b) for b in prefix.blocks] if prefix.blocks else [[] for _ in self.groups]
        ends = [self._end_block(g, num_computed, num_new) for g in self.groups]
        if t is not None:
            self._trim(t, ends)
        for table, pool, end_block in zip(tables, self.pools, ends, strict=True):
            revived = 0 if t is not None else sum(1 for b in table if b != NULL_BLOCK and pool.is_free(b))
            if end_block - len(table) + revived > pool.num_free:
                return False
        if t is None:
            for table, pool in zip(tables, self.pools, strict=True):
                pool.touch(table)  # before allocating, so that no hit block gets evicted
            first = [max(self._first_needed(num_computed, g.window), self._sink_blocks(g)) if g.window else 0
                     for g in self.groups]
            t = self._reqs[req.request_id] = _Tables(tables, prefix.num_tokens // self.block_size, first)
            self.prefix_queries += len(req.all_token_ids) if self.enable_prefix_caching else 0
            self.prefix_hits += prefix.num_tokens
        for table, pool, end_block in zip(t.tables, self.pools, ends, strict=True):
            if end_block > len(table):
                table.extend(pool.allocate(end_block - len(table)))
        return True

    def _end_block(self, g: KVGroupSpec, num_computed: int, num_new: int) -> int:
        """Table length a group needs for num_new tokens after num_computed (h2o: in slots)."""
        if g.budget is not None:
            num_computed = min(num_computed, g.budget)
        return math.ceil((num_computed + num_new) / self.block_size)

    def _sink_blocks(self, g: KVGroupSpec) -> int:
        return math.ceil(g.sinks / self.block_size)

    def _trim(self, t: _Tables, ends: list[int]) -> None:
        """h2o: free the blocks past what the request needs now (last step's evicted new tokens)."""
        for g, table, pool, end in zip(self.groups, t.tables, self.pools, ends, strict=True):
            if g.budget is not None and len(table) > end:
                pool.free(reversed(table[end:]))
                del table[end:]

    def _drop_out_of_window(self, t: _Tables, num_computed: int) -> None:
        for g, (group, table, pool) in enumerate(zip(self.groups, t.tables, self.pools, strict=True)):
            if group.window is None:
                continue
            lo = min(self._first_needed(num_computed, group.window), len(table))
            if lo > t.first_live[g]:
                pool.free(reversed(table[t.first_live[g]:lo]))
                table[t.first_live[g]:lo] = [NULL_BLOCK] * (lo - t.first_live[g])
                t.first_live[g] = lo

    def free(self, req: KVRequest) -> None:
        """Give back every block the request holds (last blocks first, so they are evicted first)."""
        t = self._reqs.pop(req.request_id, None)
        if t is not None:
            for table, pool in zip(t.tables, self.pools, strict=True):
                pool.free(reversed(table))

    def truncate(self, req: KVRequest, num_tokens: int) -> None:
        """Give back the request's blocks past its first num_tokens positions (the slots of rejected draft
        tokens, speculative decoding). Blocks already in the prefix cache hold final tokens: never cut."""
        t = self._reqs.get(req.request_id)
        if t is None:
            return
        keep = max(math.ceil(num_tokens / self.block_size), t.num_cached)
        for table, pool in zip(t.tables, self.pools, strict=True):
            if len(table) > keep:
                pool.free(reversed(table[keep:]))
                del table[keep:]

    # ---------------------------------------------------------------- views
    def block_tables(self, req: KVRequest) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(table) for table in self._reqs[req.request_id].tables)

    def num_live_blocks(self, req: KVRequest, group: int) -> int:
        """Blocks the request holds in a group (dropped sliding-window entries not counted)."""
        t = self._reqs.get(req.request_id)
        return 0 if t is None else sum(1 for b in t.tables[group] if b != NULL_BLOCK)

    def holds(self, req: KVRequest) -> bool:
        return req.request_id in self._reqs

    def max_blocks_needed(self, num_tokens: int, max_chunk: int) -> list[int]:
        """Blocks a request of num_tokens tokens needs at most per group, computed in chunks <= max_chunk."""
        bs = self.block_size
        out = []
        for g in self.groups:
            full = math.ceil(num_tokens / bs)
            if g.budget is not None:
                full = min(full, math.ceil((g.budget + max_chunk) / bs))
            elif g.window is not None:
                full = min(full, self._sink_blocks(g) + math.ceil((g.window + max_chunk) / bs) + 1)
            out.append(full)
        return out
