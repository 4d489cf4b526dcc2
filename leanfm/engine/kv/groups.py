"""KV groups: the layers that share one block table, and how many blocks each group gets.

Like vLLM's hybrid allocator, full-attention layers form one group and sliding-window layers another.
A request holds one block table per group; the sliding group drops blocks that fall out of its window,
so it needs at most ceil((window + chunk) / block_size) + 1 blocks per request however long the
sequence grows. Block 0 of every group is the null block (never handed out; stands in for dropped blocks).

Under KV compression (EngineConfig.kv_compression) the full-attention layers form a bounded group
instead (leanfm.engine.kv.compression): "streaming" keeps its sink blocks and drops the blocks that
leave its recent window, like a sliding group; "h2o" holds kv_budget slots plus this step's new tokens.
An int8 cache adds one fp32 scale per token, head and K/V; h2o adds a position and a score per slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leanfm.engine.config import DEFAULT_KV_MEMORY_BYTES, EngineConfig, EngineConfigError

if TYPE_CHECKING:
    from leanfm.models.config import ModelConfig


H2O_META_BYTES = 8  # int32 position + fp32 accumulated attention per slot, layer and kv head


@dataclass(frozen=True)
class KVGroupSpec:
    name: str  # "full", "sliding", "streaming" or "h2o"
    layers: tuple[int, ...]  # model layer indices in this group
    window: int | None  # tokens a query sees back (sliding: the model's window; streaming: the recent window)
    num_blocks: int  # including the null block 0
    bytes_per_block: int  # K and V (and scales, metadata) of every layer in the group, for one block
    sinks: int = 0  # streaming: the first `sinks` tokens stay visible (attention sinks)
    budget: int | None = None  # h2o: tokens kept per sequence, layer and kv head
    recent: int = 0  # h2o: of which the most recent ones, always kept

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def model_window(self) -> int | None:
        """The sliding window of the model layers in the group (compressed groups hold full-attention layers)."""
        return self.window if self.name == "sliding" else None


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int, block_size: int,
                    scale_bytes: int = 0, meta_bytes: int = 0) -> int:
    per_head_token = 2 * (head_dim * dtype_bytes + scale_bytes) + meta_bytes
    return num_layers * num_kv_heads * block_size * per_head_token


def plan_kv_groups(model: ModelConfig, config: EngineConfig, dtype_bytes: int, max_model_len: int
                   ) -> tuple[KVGroupSpec, ...]:
    """Split the model's layers into KV groups and size each group's block pool (see the module doc).
    dtype_bytes: bytes per cached element (1 for int8, whose scales are added here)."""
    n = model.num_hidden_layers
    sliding = tuple(i for i in range(n) if model.layer_is_sliding(i))
    full = tuple(i for i in range(n) if not model.layer_is_sliding(i))
    bs = config.block_size
    scale_bytes = 4 if config.kv_cache_dtype == "int8" else 0
    meta = H2O_META_BYTES if config.kv_compression == "h2o" else 0
    per_block = {name: bytes_per_block(len(layers), model.num_key_value_heads, model.head_dim, dtype_bytes, bs,
                                       scale_bytes, meta if name == "full" else 0)
                 for name, layers in (("full", full), ("sliding", sliding)) if layers}
    bounded = math.ceil(config.max_num_batched_tokens / bs) + 1  # the chunks of one step, plus the null block
    need_full = need_all = config.max_num_seqs * math.ceil(max_model_len / bs) + 1
    if config.compressed:  # sequences are unbounded, their caches are not
        need_full = config.max_num_seqs * (_compressed_blocks(config) + 1) + bounded
    window = model.sliding_window
    need_sliding = need_full
    if sliding:
        per_request = math.ceil(window / bs) + 2
        need_sliding = config.max_num_seqs * per_request + bounded
        need_sliding = need_sliding if config.compressed else min(need_all, need_sliding)
    if config.num_blocks is not None:
        counts = {name: config.num_blocks for name in per_block}
    else:
        budget = config.kv_memory_bytes or DEFAULT_KV_MEMORY_BYTES
        counts = _split_budget(budget, per_block, need_sliding)
        if config.kv_memory_bytes is None:  # the default budget: no more than the requests can use
            counts = {name: min(c, need_full if name == "full" else need_sliding) for name, c in counts.items()}
        for name, c in counts.items():
            if c < 2:
                raise EngineConfigError(
                    f"kv_memory_bytes={budget} holds fewer than 2 KV blocks of {per_block[name]} bytes for the "
                    f"{name}-attention layers; raise kv_memory_bytes or lower block_size")
    groups = []
    if full:
        groups.append(_full_group(config, full, counts["full"], per_block["full"]))
    if sliding:
        groups.append(KVGroupSpec("sliding", sliding, window, counts["sliding"], per_block["sliding"]))
    return tuple(groups)


def _split_budget(budget: int, per_block: dict[str, int], sliding_cap: int) -> dict[str, int]:
    """Equal block counts for both groups until the sliding group has all it can use; the rest goes to full."""
    if len(per_block) == 1:
        (name, size), = per_block.items()
        return {name: budget // size}
    full, sliding = per_block["full"], per_block["sliding"]
    both = budget // (full + sliding)
    if both <= sliding_cap:
        return {"full": both, "sliding": both}
    return {"full": (budget - sliding_cap * sliding) // full, "sliding": sliding_cap}


def _compressed_blocks(config: EngineConfig) -> int:
    """Blocks one sequence keeps between steps in a compressed full-attention group."""
    bs = config.block_size
    if config.kv_compression == "streaming":
        return math.ceil(config.kv_sink_tokens / bs) + math.ceil((config.budget - config.kv_sink_tokens) / bs) + 1
    return math.ceil(config.budget / bs) + 1


def _full_group(config: EngineConfig, layers: tuple[int, ...], num_blocks: int, block_bytes: int) -> KVGroupSpec:
    if config.kv_compression == "streaming":
        sinks = config.kv_sink_tokens
        return KVGroupSpec("streaming", layers, config.budget - sinks, num_blocks, block_bytes, sinks=sinks)
    if config.kv_compression == "h2o":
        return KVGroupSpec("h2o", layers, None, num_blocks, block_bytes, budget=config.budget,
                           recent=config.recent_tokens)
    return KVGroupSpec("full", layers, None, num_blocks, block_bytes)
