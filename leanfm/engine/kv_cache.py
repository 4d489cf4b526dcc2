"""The runner's KV-cache tensors, one set per KV group, and the per-layer views attention reads.

    cache = KVCacheTensors(groups, block_size, model_config, dtype)   # dtype: a float dtype or torch.int8
    lc = cache.layers[i]      # LayerCache: k, v (num_blocks, bs, Hkv, D) [+ int8 scales] [+ h2o score, pos]
    cache.nbytes              # every byte the cache holds

An int8 cache (leanfm.ops.kv_quant) stores codes plus one fp32 scale per token, kv head and K/V. An h2o
group also keeps, per slot, layer and kv head, the token's real position (int32) and its accumulated
attention (fp32): H2O decides per layer and kv head which tokens stay (`evict_h2o`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leanfm.engine.kv.groups import KVGroupSpec


@dataclass
class LayerCache:
    k: Tensor  # (num_blocks, bs, Hkv, D)
    v: Tensor
    k_scale: Tensor | None = None  # int8: (num_blocks, bs, Hkv) fp32
    v_scale: Tensor | None = None
    score: Tensor | None = None  # h2o: (num_blocks, bs, Hkv) fp32 accumulated attention
    pos: Tensor | None = None  # h2o: (num_blocks, bs, Hkv) int32 position of the token in the slot

    def per_slot(self) -> list[Tensor]:
        """Every tensor indexed by (slot, kv head), flattened to (num_blocks * bs, Hkv, ...)."""
        hkv = self.k.shape[2]
        out = [self.k.view(-1, hkv, self.k.shape[3]), self.v.view(-1, hkv, self.v.shape[3])]
        out += [t.view(-1, hkv) for t in (self.k_scale, self.v_scale, self.score, self.pos) if t is not None]
        return out


class KVCacheTensors:
    def __init__(self, groups: Sequence[KVGroupSpec], block_size: int, config, dtype: torch.dtype,
                 device: torch.device | None = None):
        hkv, d, n = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
        self.tensors: list[Tensor] = []
        self.layers: list[LayerCache] = [None] * n  # type: ignore[list-item]
        self.layer_group = [0] * n
        quantized = dtype == torch.int8
        for gi, g in enumerate(groups):
            shape = (len(g.layers), g.num_blocks, block_size, hkv)
            kv = self._new((2, *shape, d), dtype, device)
            scales = self._new((2, *shape), torch.float32, device) if quantized else None
            score = self._new(shape, torch.float32, device) if g.budget is not None else None
            pos = self._new(shape, torch.int32, device) if g.budget is not None else None
            for j, layer in enumerate(g.layers):
                self.layers[layer] = LayerCache(
                    kv[0, j], kv[1, j], None if scales is None else scales[0, j], None if scales is None else scales[1, j],
                    None if score is None else score[j], None if pos is None else pos[j])
                self.layer_group[layer] = gi

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        t = torch.zeros(shape, dtype=dtype, device=device)
        self.tensors.append(t)
        return t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def evict_h2o(lc: LayerCache, slots: Tensor, newest: Tensor, budget: int, recent: int) -> None:
    """H2O eviction for E sequences of one layer, each holding S > budget tokens in its slots (E, S):
    slots [0, budget) are resident, [budget, S) this step's new tokens. Per kv head, keep the `recent`
    tokens with the largest positions (newest: (E,) the newest position) and the budget - recent others
    with the largest accumulated attention; then move the kept new tokens into the resident slots of
    the dropped ones, so that slots [0, budget) again hold exactly the kept tokens."""
    e, s = slots.shape
    hkv = lc.k.shape[2]
    flat = lc.per_slot()
    score, pos = flat[-2][slots], flat[-1][slots]  # (E, S, Hkv)
    protected = pos > (newest.view(e, 1, 1) - recent)
    key = score.masked_fill(protected, float("inf"))
    kept = torch.zeros(e, s, hkv, dtype=torch.bool, device=slots.device)
    kept.scatter_(1, key.topk(budget, dim=1).indices, True)
    m = min(s - budget, budget)  # most new tokens that can move in
    dst = torch.argsort(kept[:, :budget].to(torch.int8), dim=1, stable=True)[:, :m]  # dropped resident first
    src = budget + torch.argsort((~kept[:, budget:]).to(torch.int8), dim=1, stable=True)[:, :m]  # kept new first
    moving = torch.arange(m, device=slots.device).view(1, m, 1) < kept[:, budget:].sum(1, keepdim=True)
    src = torch.where(moving, src, dst)  # nothing to move: copy a slot onto itself
    slot3 = slots[:, :, None].expand(e, s, hkv)
    dst_slot, src_slot = slot3.gather(1, dst), slot3.gather(1, src)
    heads = torch.arange(hkv, device=slots.device).view(1, 1, hkv).expand_as(dst_slot)
    for t in flat:
        t[dst_slot, heads] = t[src_slot, heads]
