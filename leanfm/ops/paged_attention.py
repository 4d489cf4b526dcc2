"""Attention over a paged KV cache: pure tensor functions, no state.

A KV cache tensor is (num_blocks, block_size, Hkv, D). Each request owns a block table: entry i is the
block holding its positions [i * block_size, (i + 1) * block_size). One step computes a flattened
batch of T new tokens from several requests; rows [0, num_decode) are requests with a single new
token (decodes), the rest are multi-token chunks (prefill / chunked prefill), one contiguous run of
rows per request.

    plan = plan_paged_attention(positions, row_req, starts, lens, table, block_size, window)  # once per step
    write_kv(k_cache, v_cache, k, v, plan.slot_mapping)                                        # every layer
    out = paged_attention(q, k, v, k_cache, v_cache, plan, scale, softcap)                    # every layer

Decodes are batched into one attention call over their gathered blocks, padded to the longest, with a
mask; each chunk gets its own call with a causal (and sliding-window) mask; a chunk starting at position
0 attends over its own new keys without reading the cache. `paged_attention` is the single entry point
a fused paged-decode kernel would replace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leanfm.ops.attention import attention, causal_mask


@dataclass
class ChunkPlan:
    begin: int  # rows [begin, end) of the flattened batch
    end: int
    blocks: Tensor | None  # (nb,) block ids to read; None = attend over the chunk's own new keys
    mask: Tensor | None  # (1, 1, n, nb * block_size) bool; None = plain causal


@dataclass
class PagedAttentionPlan:
    """One KV group's view of one step, shared by all layers of the group."""

    slot_mapping: Tensor  # (T,) int64: flat cache slot (block * block_size + offset) of each new token
    num_decode: int = 0
    decode_blocks: Tensor | None = None  # (R, MB) int64
    decode_mask: Tensor | None = None  # (R, 1, 1, MB * block_size) bool
    chunks: list[ChunkPlan] = field(default_factory=list)

    def to(self, device: torch.device) -> PagedAttentionPlan:
        """The plan with its tensors on `device` (plans are built on the CPU)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        chunks = [ChunkPlan(c.begin, c.end, move(c.blocks), move(c.mask)) for c in self.chunks]
        return PagedAttentionPlan(move(self.slot_mapping), self.num_decode, move(self.decode_blocks),
                                  move(self.decode_mask), chunks)


def pad_tables(tables: Sequence[Sequence[int]]) -> Tensor:
    """Block tables of unequal length as one (N, W) int64 tensor, padded with block 0."""
    width = max(len(t) for t in tables)
    return torch.tensor([[*t, *([0] * (width - len(t)))] for t in tables], dtype=torch.long)


def plan_paged_attention(positions: Tensor, row_req: Tensor, starts: Sequence[int], lens: Sequence[int],
                         table: Tensor, block_size: int, window: int | None) -> PagedAttentionPlan:
    """positions, row_req: (T,) position and request index of each new token; starts/lens: per request;
    table: (N, W) padded block tables. Requests with lens == 1 must come first."""
    bs = block_size
    slots = table[row_req, positions // bs] * bs + positions % bs
    plan = PagedAttentionPlan(slots)
    num_decode = next((i for i, n in enumerate(lens) if n != 1), len(lens))
    if num_decode:
        _plan_decode(plan, positions[:num_decode], starts[:num_decode], table[:num_decode], bs, window)
    begin = num_decode
    for i in range(num_decode, len(lens)):
        s, n = starts[i], lens[i]
        plan.chunks.append(_plan_chunk(begin, s, n, table[i], bs, window))
        begin += n
    return plan


def _plan_decode(plan: PagedAttentionPlan, qpos: Tensor, starts: Sequence[int], table: Tensor, bs: int,
                 window: int | None) -> None:
    lo_py = [0 if window is None else max(0, p - window + 1) // bs for p in starts]
    width = max(p // bs - lo + 1 for p, lo in zip(starts, lo_py, strict=True))
    lo = torch.tensor(lo_py, dtype=torch.long)
    idx = lo[:, None] + torch.arange(width)  # (R, MB) logical blocks to read
    plan.num_decode = len(starts)
    plan.decode_blocks = table.gather(1, idx.clamp(max=table.shape[1] - 1))
    kpos = (idx[:, :, None] * bs + torch.arange(bs)).flatten(1)  # (R, MB * bs)
    diff = qpos[:, None] - kpos
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    plan.decode_mask = visible[:, None, None, :]


def _plan_chunk(begin: int, start: int, n: int, table_row: Tensor, bs: int, window: int | None) -> ChunkPlan:
    qpos = torch.arange(start, start + n)[None]
    if start == 0:
        mask = causal_mask(qpos, qpos[0], window) if window is not None and n > window else None
        return ChunkPlan(begin, begin + n, None, mask)
    lo = 0 if window is None else max(0, start - window + 1) // bs
    hi = (start + n - 1) // bs + 1
    kpos = torch.arange(lo * bs, hi * bs)
    return ChunkPlan(begin, begin + n, table_row[lo:hi], causal_mask(qpos, kpos, window))


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store the step's keys/values k, v (1, Hkv, T, D) at their slots of caches (num_blocks, bs, Hkv, D)."""
    hkv, d = k_cache.shape[-2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k[0].transpose(0, 1))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v[0].transpose(0, 1))


def gather_blocks(cache: Tensor, blocks: Tensor) -> Tensor:
    """cache (num_blocks, bs, Hkv, D), blocks (R, MB) -> keys or values (R, Hkv, MB * bs, D)."""
    r, mb = blocks.shape
    _, bs, hkv, d = cache.shape
    # index_select on the flat ids: several times faster than advanced indexing for this gather
    return cache.index_select(0, blocks.reshape(-1)).view(r, mb * bs, hkv, d).transpose(1, 2)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedAttentionPlan,
                    scale: float, softcap: float | None = None) -> Tensor:
    """q (1, H, T, D), this step's k, v (1, Hkv, T, D) already written to the caches. Returns (1, H, T, D)."""
    outs = []
    r = plan.num_decode
    if r:
        qd = q[0, :, :r].transpose(0, 1).unsqueeze(2)  # (R, H, 1, D)
        kd, vd = gather_blocks(k_cache, plan.decode_blocks), gather_blocks(v_cache, plan.decode_blocks)
        out = attention(qd, kd, vd, scale, plan.decode_mask, softcap=softcap)  # (R, H, 1, D)
        outs.append(out.squeeze(2).transpose(0, 1).unsqueeze(0))
    for c in plan.chunks:
        if c.blocks is None:
            kc, vc = k[:, :, c.begin:c.end], v[:, :, c.begin:c.end]
        else:
            kc, vc = gather_blocks(k_cache, c.blocks[None]), gather_blocks(v_cache, c.blocks[None])
        outs.append(attention(q[:, :, c.begin:c.end], kc, vc, scale, c.mask, is_causal=c.mask is None,
                              softcap=softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
