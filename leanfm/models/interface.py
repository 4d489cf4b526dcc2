"""The narrow model interface the engine, the generator and the measuring tools see.

    hidden = model(input_ids, positions, attn_meta)   # (B, T) ints -> (B, T, hidden)
    logits = model.compute_logits(hidden)             # (B, T, vocab)

`attn_meta=None` is plain causal attention over `input_ids` alone (training, calibration,
perplexity). A `KVCacheMeta` makes each attention layer write its new keys/values into a cache
owned by the caller and attend over everything cached so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from leanfm.models.config import ModelConfig


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig

    def forward(self, input_ids: Tensor, positions: Tensor, attn_meta: object | None = None) -> Tensor: ...

    def compute_logits(self, hidden: Tensor) -> Tensor: ...


class ContiguousKVCache:
    """Preallocated per-layer key/value buffers of shape (B, Hkv, max_len, D).

    The plain generation path's cache: every sequence of the batch shares the same positions.
    Sliding-window layers keep the full length here and read only their window.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class KVCacheMeta:
    """Write the step's keys/values at [start, start + T) and attend over [0, start + T).

    `virtual_tokens`: the caller put that many placeholder ids at positions 0.. for the model's prompt or
    prefix tuning adapter (leanfm.tune.prompt), which fills those positions with its virtual tokens; a
    model with such an adapter refuses a cache whose count differs from its own."""

    cache: ContiguousKVCache
    start: int
    virtual_tokens: int = 0

    def write_and_read(self, layer: int, k: Tensor, v: Tensor, window: int | None) -> tuple[Tensor, Tensor, int]:
        """Store k, v (B, Hkv, T, D); return the cached keys/values to attend over and their first position."""
        end = self.start + k.shape[2]
        if end > self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions; step needs {end}")
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        t = k.shape[2]
        kc.narrow(2, self.start, t).copy_(k)  # = kc[:, :, start:end] = k, in 2 ops instead of ~5
        vc.narrow(2, self.start, t).copy_(v)
        first = 0
        if window is not None:
            # keys older than the window of the step's first query are never visible
            first = max(0, self.start - window + 1)
        return kc.narrow(2, first, end - first), vc.narrow(2, first, end - first), first
