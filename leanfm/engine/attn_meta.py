"""PagedAttentionMeta: the attention hook the model's layers call for one engine step, and its planning.

    meta = plan_step(chunks, positions, row_req, cache, groups, block_size, rope)   # once per step
    out = meta.attend(layer_idx, q, k, v, scale, window, softcap)                   # every layer

Per KV group one PagedAttentionPlan (leanfm.ops.paged_attention). Compressed groups add:
  * streaming (StreamingLLM): the sink keys are scored as if they sat just before the recent window
    (the paper's positions within the cache). Keys stay rotated by their real positions; a query at
    real position P scores the sinks with its copy rotated back by delta = max(0, P - window + 1 - sinks)
    - q . R(delta) k_sink = R(-delta) q . k_sink - so the query-to-sink distance is the cache distance
    while distances inside the window, which are real, stay real.
  * h2o: the group's keys live in slot space (min(computed, budget) resident slots, then the new
    tokens); the plan sees slot indices as positions (all resident slots precede the new tokens), the
    model real positions. Each layer writes its new tokens' positions, accumulates attention
    probabilities (the kernel's `score`) and then evicts back to the budget (kv_cache.evict_h2o).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leanfm.engine.kv.groups import KVGroupSpec
from leanfm.engine.kv_cache import KVCacheTensors, LayerCache, evict_h2o
from leanfm.engine.messages import ScheduledChunk
from leanfm.ops.paged_attention import (
    PagedAttentionPlan,
    pad_tables,
    paged_attention,
    plan_decodes,
    plan_paged_attention,
    write_kv,
)
from leanfm.ops.rope import apply_rope, rope_cos_sin


@dataclass
class CompressedStep:
    """A compressed group's extras for one step."""

    positions: Tensor  # (T,) real positions of the step's tokens
    sink_rope: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # streaming: layer -> cos, sin
    evictions: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # h2o: (slots (E, S), newest (E,))
    budget: int = 0
    recent: int = 0

    def before(self, lc: LayerCache, plan: PagedAttentionPlan) -> None:
        if lc.pos is not None:  # h2o: the new tokens' positions, no attention yet
            hkv = lc.pos.shape[-1]
            lc.pos.view(-1, hkv)[plan.slot_mapping] = self.positions.to(torch.int32)[:, None]
            lc.score.view(-1, hkv)[plan.slot_mapping] = 0.0

    def after(self, lc: LayerCache) -> None:
        for slots, newest in self.evictions:
            evict_h2o(lc, slots, newest, self.budget, self.recent)


class PagedAttentionMeta:
    """The attention hook the model's layers call (leanfm.models.blocks.Attention) for one step."""

    __slots__ = ("caches", "extras", "layer_group", "plans", "virtual_tokens")

    def __init__(self, caches: list[LayerCache], layer_group: list[int], plans: list[PagedAttentionPlan],
                 extras: list[CompressedStep | None] | None = None, virtual_tokens: int = 0):
        self.caches, self.layer_group, self.plans = caches, layer_group, plans
        self.extras = extras or [None] * len(plans)
        self.virtual_tokens = virtual_tokens  # placeholder positions 0.. of a prompt/prefix adapter (KVCacheMeta)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
               softcap: float | None) -> Tensor:
        """q (1, H, T, D), k/v (1, Hkv, T, D) of the flattened step -> (1, H, T, D). The window is the
        layer's; the group plan was built with the same one (checked when the runner is built)."""
        lc = self.caches[layer_idx]
        gi = self.layer_group[layer_idx]
        plan, extra = self.plans[gi], self.extras[gi]
        write_kv(lc.k, lc.v, k, v, plan.slot_mapping, lc.k_scale, lc.v_scale)
        q_sink = None
        if extra is not None:
            extra.before(lc, plan)
            rope = extra.sink_rope.get(layer_idx)
            q_sink = None if rope is None else apply_rope(q, *rope)
        out = paged_attention(q, k, v, lc.k, lc.v, plan, scale, softcap, k_scale=lc.k_scale, v_scale=lc.v_scale,
                              q_sink=q_sink, score=lc.score)
        if extra is not None:
            extra.after(lc)
        return out

    def paged_decode_args(self, layer_idx: int) -> tuple[Tensor, ...] | None:
        """(k_cache, v_cache, slots, table, lo, hi) for the one-call decoder block (leanfm.models.decode_plan,
        torch.ops.leanfm_kernels.paged_decode_layer), or None when the layer must run its module path: the
        step has a chunk of several tokens, the layer's cache is not plain float32 (int8 codes, bf16), or its
        group is compressed (StreamingLLM sinks, H2O scores and evictions)."""
        lc = self.caches[layer_idx]
        gi = self.layer_group[layer_idx]
        plan = self.plans[gi]
        if (plan.chunks or not plan.num_decode or plan.sinks or self.extras[gi] is not None
                or lc.k_scale is not None or lc.score is not None or lc.k.dtype != torch.float32):
            return None
        return lc.k, lc.v, plan.slot_mapping, plan.decode_table, plan.decode_lo, plan.decode_hi


InvFreq = Callable[[int], Tensor]  # layer index -> the layer's RoPE inverse frequencies


def plan_step(chunks: Sequence[ScheduledChunk], positions: Tensor, row_req: Tensor, cache: KVCacheTensors,
              groups: Sequence[KVGroupSpec], block_size: int, inv_freq: InvFreq, dtype: torch.dtype
              ) -> PagedAttentionMeta:
    """Plans for every group of one step whose chunks are flattened to positions/row_req (decodes first)."""
    starts = [c.start_pos for c in chunks]
    lens = [len(c.token_ids) for c in chunks]
    plans, extras = [], []
    decodes_only = len(positions) == len(chunks)
    for gi, g in enumerate(groups):
        if decodes_only and g.budget is None:
            plans.append(plan_decodes(starts, [c.block_tables[gi] for c in chunks], block_size, g.window, g.sinks))
            extras.append(_streaming_step(g, positions, inv_freq, dtype) if g.sinks else None)
            continue
        table = pad_tables([c.block_tables[gi] for c in chunks])
        if g.budget is not None:  # h2o: slot space
            shift = [max(0, s - g.budget) for s in starts]
            slot_pos = positions - torch.tensor(shift, dtype=torch.long)[row_req]
            starts_g = [s - d for s, d in zip(starts, shift, strict=True)]
            plans.append(plan_paged_attention(slot_pos, row_req, starts_g, lens, table, block_size, None))
            extras.append(_h2o_step(g, positions, starts, lens, table, block_size))
        else:
            plans.append(plan_paged_attention(positions, row_req, starts, lens, table, block_size, g.window,
                                              g.sinks))
            extras.append(_streaming_step(g, positions, inv_freq, dtype) if g.sinks else None)
    return PagedAttentionMeta(cache.layers, cache.layer_group, plans, extras)


def _streaming_step(g: KVGroupSpec, positions: Tensor, inv_freq: InvFreq, dtype: torch.dtype) -> CompressedStep | None:
    delta = (positions - g.window + 1 - g.sinks).clamp(min=0)
    if not bool(delta.any()):
        return None  # every query still sees the sinks at their real distance
    step = CompressedStep(positions)
    by_table: dict[int, tuple[Tensor, Tensor]] = {}
    for layer in g.layers:
        f = inv_freq(layer)
        if id(f) not in by_table:
            cos, sin = rope_cos_sin(-delta[None], f, dtype)  # (1, T, D): rotate back by delta
            by_table[id(f)] = (cos, sin)
        step.sink_rope[layer] = by_table[id(f)]
    return step


def _h2o_step(g: KVGroupSpec, positions: Tensor, starts: list[int], lens: list[int], table: Tensor,
              bs: int) -> CompressedStep:
    step = CompressedStep(positions, budget=g.budget, recent=g.recent)
    b = g.budget
    decode = [i for i, (s, n) in enumerate(zip(starts, lens, strict=True)) if n == 1 and s >= b]
    if decode:  # each holds budget + 1 tokens: evict one per layer and kv head
        idx = torch.tensor(decode, dtype=torch.long)
        j = torch.arange(b + 1)
        slots = table[idx][:, j // bs] * bs + j % bs
        step.evictions.append((slots, torch.tensor([starts[i] for i in decode], dtype=torch.long)))
    for i, (s, n) in enumerate(zip(starts, lens, strict=True)):
        held = min(s, b) + n
        if n > 1 and held > b:
            j = torch.arange(held)
            step.evictions.append(((table[i, j // bs] * bs + j % bs)[None], torch.tensor([s + n - 1])))
    return step
