"""EngineConfig: how the serving engine sizes its KV cache and batches its steps. Frozen and validated.

    LLM("gemma-3-270m", max_num_seqs=16, kv_memory_bytes=512 << 20)   # options are EngineConfig fields

The KV cache is a pool of fixed-size blocks per KV group (full-attention layers, sliding-window layers).
Its size is `num_blocks` per group, or `kv_memory_bytes` split between the groups, or (neither given)
DEFAULT_KV_MEMORY_BYTES capped at what max_num_seqs requests of max_model_len tokens can use.
`speculative` (a SpeculativeConfig, a method name or a dict of its fields) turns on speculative decoding;
see leanfm.engine.spec.config. Torch-free: the scheduler reads it too.

KV-cache compression (leanfm.engine.kv.compression), per engine:
  * kv_cache_dtype="int8": K and V stored as int8 with one fp32 scale per token and kv head (also
    "bfloat16" / "float32" for a cache narrower or wider than the weights);
  * kv_compression="streaming": StreamingLLM, the first kv_sink_tokens tokens plus a recent window,
    kv_budget tokens in all, in the full-attention layers; sequences may outgrow max_model_len;
  * kv_compression="h2o": H2O, kv_budget tokens per layer and kv head: the kv_recent_tokens most recent
    (default half the budget) plus the heavy hitters with the largest accumulated attention.
Layers with their own sliding window keep it. Compression turns the prefix cache off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from leanfm.engine.spec.config import SpeculativeConfig, SpeculativeConfigError
from leanfm.utils.errors import LeanfmError

DEFAULT_KV_MEMORY_BYTES = 1 << 30
DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
KV_COMPRESSIONS = ("none", "streaming", "h2o")
DEFAULT_KV_BUDGET = 1024


class EngineConfigError(LeanfmError, ValueError):
    """An engine option out of range or inconsistent with the model."""


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks per group (exclusive with kv_memory_bytes)
    kv_memory_bytes: int | None = None  # KV cache budget in bytes, split between the groups
    max_num_seqs: int = 32  # requests running at once
    max_num_batched_tokens: int = 512  # tokens computed per step (decodes count 1, prefill chunks their length)
    max_model_len: int | None = None  # prompt + output tokens per request; None = the model's context
    enable_prefix_caching: bool = True
    dtype: str = "auto"  # weights when the model is loaded by name, and the KV cache; auto = the model's
    speculative: SpeculativeConfig | None = None  # speculative decoding (None = off)
    kv_cache_dtype: str = "auto"  # auto = the weights' dtype; int8 = quantized K/V with per-token scales
    kv_compression: str = "none"  # none | streaming (StreamingLLM) | h2o (heavy-hitter oracle)
    kv_budget: int | None = None  # tokens a sequence keeps per full-attention layer; None = DEFAULT_KV_BUDGET
    kv_sink_tokens: int = 4  # streaming: attention sinks, counted in the budget
    kv_recent_tokens: int | None = None  # h2o: most recent tokens always kept; None = half the budget

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "speculative", SpeculativeConfig.from_any(self.speculative))
        except SpeculativeConfigError as e:
            raise EngineConfigError(str(e)) from None
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, low in (("num_blocks", 2), ("kv_memory_bytes", 1), ("max_model_len", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise EngineConfigError(f"{name} must be an integer >= {low} (or None), got {value!r}")
        if self.num_blocks is not None and self.kv_memory_bytes is not None:
            raise EngineConfigError("give num_blocks or kv_memory_bytes, not both")
        if self.dtype not in DTYPES:
            raise EngineConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        spec = self.speculative
        if spec is not None and spec.num_speculative_tokens >= self.max_num_batched_tokens:
            raise EngineConfigError(f"num_speculative_tokens={spec.num_speculative_tokens} leaves no room in "
                                    f"max_num_batched_tokens={self.max_num_batched_tokens}; lower it or raise the budget")
        if spec is not None and self.kv_compression != "none":
            raise EngineConfigError("speculative decoding needs the full KV cache (a rejected draft is rolled back by "
                                    "truncation); drop kv_compression or speculative")
        self._check_kv_compression()

    def _check_kv_compression(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                                    f"got {self.kv_cache_dtype!r}")
        if self.kv_compression not in KV_COMPRESSIONS:
            raise EngineConfigError(f"kv_compression must be one of {', '.join(KV_COMPRESSIONS)}, "
                                    f"got {self.kv_compression!r}")
        for name, low in (("kv_budget", 1), ("kv_sink_tokens", 0), ("kv_recent_tokens", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise EngineConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.kv_compression == "none":
            if self.kv_budget is not None or self.kv_recent_tokens is not None:
                raise EngineConfigError("kv_budget and kv_recent_tokens need kv_compression='streaming' or 'h2o'")
            return
        if self.kv_compression == "streaming" and self.budget <= self.kv_sink_tokens:
            raise EngineConfigError(f"kv_budget ({self.budget}) must exceed kv_sink_tokens ({self.kv_sink_tokens}): "
                                    "the budget holds the sinks and the recent window")
        if self.kv_compression == "h2o" and self.recent_tokens > self.budget:
            raise EngineConfigError(f"kv_recent_tokens ({self.kv_recent_tokens}) must be at most kv_budget "
                                    f"({self.budget})")

    @property
    def budget(self) -> int:
        """Tokens a sequence keeps per full-attention layer under kv_compression."""
        return DEFAULT_KV_BUDGET if self.kv_budget is None else self.kv_budget

    @property
    def recent_tokens(self) -> int:
        """h2o: the most recent tokens always kept."""
        return self.budget // 2 if self.kv_recent_tokens is None else self.kv_recent_tokens

    @property
    def compressed(self) -> bool:
        """True when sequences keep a bounded KV cache (streaming or h2o): they may outgrow max_model_len."""
        return self.kv_compression != "none"

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from keyword options, naming the valid ones when an option is unknown."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EngineConfigError(f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["speculative"] = None if self.speculative is None else self.speculative.to_dict()
        return d
