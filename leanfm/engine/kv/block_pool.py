"""BlockPool: one KV group's fixed-size blocks, with reference counts, a free queue and the prefix cache.

A block is free when no request references it. Free blocks wait in a queue in eviction order: blocks
holding no cached prefix go to the front (reused first), cached ones to the back (least recently freed
first out, i.e. LRU). A cached free block can be revived by a prefix hit (`touch`) until it is
reused; reusing it evicts it from the cache.

Cache keys chain the blocks of a sequence: key_i = (hash(key_{i-1}), token ids of block i). The dict
compares the tokens of a block exactly, so only a 64-bit collision of a whole parent chain could alias
two prefixes. A request's salt (its LoRA adapter) stands in for the first block's parent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the parent key, the block's token ids)
NULL_BLOCK = 0  # placeholder for blocks a request no longer holds (out of its sliding window)


def block_key(parent: BlockKey | None, token_ids: tuple[int, ...], salt: str | None = None) -> BlockKey:
    """The key of a block after `parent` (None: the first block, whose chain starts from `salt`: sequences
    computed with different weights, such as different LoRA adapters, never share blocks)."""
    if parent is not None:
        return (hash(parent), token_ids)
    return (hash(("salt", salt)) if salt is not None else 0, token_ids)


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-free ones included: they get evicted)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with reference count 1, evicting cached prefixes from the front of the queue."""
        if n > len(self._free):
            raise RuntimeError(f"block pool exhausted: asked for {n}, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            key = self.key[block_id]
            if key is not None:
                if self.cached.get(key) == block_id:
                    del self.cached[key]
                self.key[block_id] = None
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a prefix hit); a free one leaves the free queue."""
        for block_id in block_ids:
            if block_id == NULL_BLOCK:
                continue
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; blocks reaching zero join the free queue."""
        for block_id in block_ids:
            if block_id == NULL_BLOCK:
                continue
            count = self.ref_cnt[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            self.ref_cnt[block_id] = count
            if count == 0:
                self._free[block_id] = None
                if self.key[block_id] is None:  # holds nothing reusable: hand it out first
                    self._free.move_to_end(block_id, last=False)

    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def cache(self, block_id: int, key: BlockKey) -> None:
        """Register a full, computed block under its key (a block already cached under it wins)."""
        if block_id == NULL_BLOCK or self.key[block_id] is not None or key in self.cached:
            return
        self.key[block_id] = key
        self.cached[key] = block_id

    def reset_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        self.cached.clear()
        self.key = [None] * self.num_blocks
