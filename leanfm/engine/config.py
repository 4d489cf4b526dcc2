"""EngineConfig: how the serving engine sizes its KV cache and batches its steps. Frozen and validated.

    LLM("gemma-3-270m", max_num_seqs=16, kv_memory_bytes=512 << 20)   # options are EngineConfig fields

The KV cache is a pool of fixed-size blocks per KV group (full-attention layers, sliding-window layers).
Its size is `num_blocks` per group, or `kv_memory_bytes` split between the groups, or (neither given)
DEFAULT_KV_MEMORY_BYTES capped at what max_num_seqs requests of max_model_len tokens can use.
`speculative` (a SpeculativeConfig, a method name or a dict of its fields) turns on speculative decoding;
see leanfm.engine.spec.config. Torch-free: the scheduler reads it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from leanfm.engine.spec.config import SpeculativeConfig, SpeculativeConfigError
from leanfm.utils.errors import LeanfmError

DEFAULT_KV_MEMORY_BYTES = 1 << 30
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
