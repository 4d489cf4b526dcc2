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
    num_generated_tokens: int  # tokens sampled over all steps (accepted draft tokens included)
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens verified
    spec_accepted_tokens: int = 0  # of which accepted
    spec_verify_steps: int = 0  # request-steps that verified at least one draft
    spec_off_steps: int = 0  # steps the off-switch turned speculation off (batch too large)
    spec_draft_kv_bytes: int = 0  # the draft model's own KV cache (draft / layer_skip)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted over verified draft tokens (0 without speculation)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens per verify step: accepted drafts plus the target's own token."""
        return 1.0 + self.spec_accepted_tokens / self.spec_verify_steps if self.spec_verify_steps else 0.0

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV blocks in use, over all groups."""
        total = sum(self.kv_blocks_total)
        return (total - sum(self.kv_blocks_free)) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        d["kv_usage"] = self.kv_usage
        d["spec_acceptance_rate"] = self.spec_acceptance_rate
        d["spec_mean_accepted_length"] = self.spec_mean_accepted_length
        return d
