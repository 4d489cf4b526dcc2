"""EngineStats: a snapshot of the engine's counters, for logs, benchmarks and Prometheus metrics. Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineStats:
    num_steps: int  # engine steps run
    num_running: int
    num_waiting: int
    num_preemptions: int  # over the engine's life
    prefix_cache_queries: int  # tokens looked up in the prefix cache (when requests get scheduled)
    prefix_cache_hits: int  # of which were cached
    kv_groups: tuple[str, ...]  # "full", "sliding"
    kv_blocks_total: tuple[int, ...]  # usable blocks per group
    kv_blocks_free: tuple[int, ...]  # free (cached-but-unused ones included) per group
    kv_cache_bytes: int
    last_step_tokens: int  # tokens computed in the last step
    num_scheduled_tokens: int  # tokens computed over all steps
    num_generated_tokens: int  # tokens sampled over all steps

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV blocks in use, over all groups."""
        total = sum(self.kv_blocks_total)
        return (total - sum(self.kv_blocks_free)) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        d["kv_usage"] = self.kv_usage
        return d
