"""KV groups: the layers that share one block table, and how many blocks each group gets.

Like vLLM's hybrid allocator, full-attention layers form one group and sliding-window layers another.
A request holds one block table per group; the sliding group drops blocks that fall out of its window,
so it needs at most ceil((window + chunk) / block_size) + 1 blocks per request however long the
sequence grows. Block 0 of every group is the null block (never handed out; stands in for dropped blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from leanfm.engine.config import DEFAULT_KV_MEMORY_BYTES, EngineConfig, EngineConfigError

if TYPE_CHECKING:
    from leanfm.models.config import ModelConfig


@dataclass(frozen=True)
class KVGroupSpec:
    name: str  # "full" or "sliding"
    layers: tuple[int, ...]  # model layer indices in this group
    window: int | None  # sliding window in tokens (None = full attention)
    num_blocks: int  # including the null block 0
    bytes_per_block: int  # K and V of every layer in the group, for one block

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int, block_size: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes * block_size


def plan_kv_groups(model: ModelConfig, config: EngineConfig, dtype_bytes: int, max_model_len: int
                   ) -> tuple[KVGroupSpec, ...]:
    """Split the model's layers into KV groups and size each group's block pool (see the module doc)."""
    n = model.num_hidden_layers
    sliding = tuple(i for i in range(n) if model.layer_is_sliding(i))
    full = tuple(i for i in range(n) if not model.layer_is_sliding(i))
    bs = config.block_size
    per_block = {name: bytes_per_block(len(layers), model.num_key_value_heads, model.head_dim, dtype_bytes, bs)
                 for name, layers in (("full", full), ("sliding", sliding)) if layers}
    need_full = config.max_num_seqs * math.ceil(max_model_len / bs) + 1
    window = model.sliding_window
    need_sliding = need_full
    if sliding:
        per_request = math.ceil(window / bs) + 2
        need_sliding = min(need_full, config.max_num_seqs * per_request + math.ceil(config.max_num_batched_tokens / bs) + 1)
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
        groups.append(KVGroupSpec("full", full, None, counts["full"], per_block["full"]))
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
