"""Attention over a paged KV cache: pure tensor functions, no state.

A KV cache tensor is (num_blocks, block_size, Hkv, D). Each request owns a block table: entry i is the
block holding its positions [i * block_size, (i + 1) * block_size). One step computes a flattened
batch of T new tokens from several requests; rows [0, num_decode) are requests with a single new
token (decodes), the rest are multi-token chunks (prefill / chunked prefill), one contiguous run of
rows per request.

    plan = plan_paged_attention(positions, row_req, starts, lens, table, block_size, window)  # once per step
    plan = plan_decodes(starts, tables, block_size, window)    # the same, for a step of decodes only
    write_kv(k_cache, v_cache, k, v, plan.slot_mapping)                                        # every layer
    out = paged_attention(q, k, v, k_cache, v_cache, plan, scale, softcap)                    # every layer

Decodes go to the C++ paged decode kernel (leanfm.ops.kernels.attention: keys read in place, fp32 /
bf16 / int8 caches); without it, to one batched SDPA over their gathered blocks padded to the longest,
or to the explicit reference (leanfm.ops.paged_reference) for sinks, int8 caches and H2O scores. Each
chunk gets its own call with a causal (and sliding-window) mask; a chunk starting at position 0 attends
over its own new keys without reading the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from leanfm.ops.attention import attention, causal_mask
from leanfm.ops.kernels.attention import paged_decode
from leanfm.ops.kv_quant import quantize_kv
from leanfm.ops.paged_reference import add_scores, decode_reference, explicit_attention, gather_keys


@dataclass
class ChunkPlan:
    begin: int  # rows [begin, end) of the flattened batch
    end: int
    blocks: Tensor | None  # (nb,) block ids to read; None = attend over the chunk's own new keys
    mask: Tensor | None  # (1, 1, n, L) bool; None = plain causal
    is_sink: Tensor | None = None  # (1, L) bool: keys scored with the sink query (StreamingLLM)


@dataclass
class PagedAttentionPlan:
    """One KV group's view of one step, shared by all layers of the group.

    Decode row r sees its keys [decode_lo[r], decode_hi[r]) and the sinks [0, min(sinks, decode_lo[r]))."""

    slot_mapping: Tensor  # (T,) int64: flat cache slot (block * block_size + offset) of each new token
    block_size: int = 16
    num_decode: int = 0
    decode_table: Tensor | None = None  # (R, W) int64 block tables of the decode rows
    decode_lo: Tensor | None = None  # (R,) int64
    decode_hi: Tensor | None = None  # (R,) int64
    sinks: int = 0
    chunks: list[ChunkPlan] = field(default_factory=list)
    _window: tuple[Tensor, Tensor] | None = None  # (blocks, mask) for the SDPA fallback, built when needed

    def to(self, device: torch.device) -> PagedAttentionPlan:
        """The plan with its tensors on `device` (plans are built on the CPU)."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        chunks = [ChunkPlan(c.begin, c.end, move(c.blocks), move(c.mask), move(c.is_sink)) for c in self.chunks]
        return PagedAttentionPlan(move(self.slot_mapping), self.block_size, self.num_decode, move(self.decode_table),
                                  move(self.decode_lo), move(self.decode_hi), self.sinks, chunks)

    def decode_window(self) -> tuple[Tensor, Tensor]:
        """(blocks (R, MB), mask (R, 1, 1, MB * bs)): the decode rows' visible blocks for gather + SDPA."""
        if self._window is None:
            bs, lo, hi = self.block_size, self.decode_lo, self.decode_hi
            lo_blk = lo // bs
            width = int((((hi - 1) // bs) - lo_blk).max()) + 1
            idx = lo_blk[:, None] + torch.arange(width, device=lo.device)  # (R, MB) logical blocks
            blocks = self.decode_table.gather(1, idx.clamp(max=self.decode_table.shape[1] - 1))
            kpos = (idx[:, :, None] * bs + torch.arange(bs, device=lo.device)).flatten(1)
            visible = (kpos >= lo[:, None]) & (kpos < hi[:, None])
            self._window = (blocks, visible[:, None, None, :])
        return self._window


def pad_tables(tables: Sequence[Sequence[int]]) -> Tensor:
    """Block tables of unequal length as one (N, W) int64 tensor, padded with block 0."""
    width = max(len(t) for t in tables)
    return torch.tensor([[*t, *([0] * (width - len(t)))] for t in tables], dtype=torch.long)


def plan_paged_attention(positions: Tensor, row_req: Tensor, starts: Sequence[int], lens: Sequence[int],
                         table: Tensor, block_size: int, window: int | None, sinks: int = 0) -> PagedAttentionPlan:
    """positions, row_req: (T,) position and request index of each new token; starts/lens: per request;
    table: (N, W) padded block tables. Requests with lens == 1 must come first. With `sinks` (and a
    window), keys at positions < sinks stay visible however far the window has moved (StreamingLLM)."""
    bs = block_size
    slots = table[row_req, positions // bs] * bs + positions % bs
    plan = PagedAttentionPlan(slots, bs, sinks=sinks if window is not None else 0)
    num_decode = next((i for i, n in enumerate(lens) if n != 1), len(lens))
    if num_decode:
        qpos = positions[:num_decode]
        plan.num_decode = num_decode
        plan.decode_table = table[:num_decode]
        plan.decode_lo = (qpos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(qpos)
        plan.decode_hi = qpos + 1
    begin = num_decode
    for i in range(num_decode, len(lens)):
        s, n = starts[i], lens[i]
        plan.chunks.append(_plan_chunk(begin, s, n, table[i], bs, window, plan.sinks))
        begin += n
    return plan


def plan_decodes(starts: Sequence[int], tables: Sequence[Sequence[int]], block_size: int, window: int | None,
                 sinks: int = 0) -> PagedAttentionPlan:
    """plan_paged_attention for a step of decodes only (request i's one new token at position starts[i],
    its block table tables[i]), computed on Python ints: two tensors instead of ~10 small tensor ops."""
    bs = block_size
    slots = [t[s // bs] * bs + s % bs for s, t in zip(starts, tables, strict=True)]
    lo = [max(0, s - window + 1) for s in starts] if window is not None else [0] * len(starts)
    packed = torch.tensor([slots, lo, [s + 1 for s in starts]], dtype=torch.long)  # rows: contiguous views
    return PagedAttentionPlan(packed[0], bs, len(starts), pad_tables(tables), packed[1], packed[2],
                              sinks if window is not None else 0)


def _plan_chunk(begin: int, start: int, n: int, table_row: Tensor, bs: int, window: int | None,
                sinks: int) -> ChunkPlan:
    qpos = torch.arange(start, start + n)[None]
    if start == 0:
        if window is None or n <= window:
            return ChunkPlan(begin, begin + n, None, None)
        kpos = qpos[0]
        blocks = None
    else:
        lo = 0 if window is None else max(0, start - window + 1) // bs
        hi = (start + n - 1) // bs + 1
        n_sink = -(-sinks // bs)
        if sinks and lo > n_sink:  # the sink blocks, then the window's
            kpos = torch.cat([torch.arange(n_sink * bs), torch.arange(lo * bs, hi * bs)])
            blocks = torch.cat([table_row[:n_sink], table_row[lo:hi]])
        else:
            kpos, blocks = torch.arange(lo * bs, hi * bs), table_row[lo:hi]
    mask = causal_mask(qpos, kpos, window)
    is_sink = None
    if sinks:
        is_sink = (kpos < sinks)[None]
        mask = mask | (is_sink[:, None, None, :] & (kpos <= qpos[0, :, None]))
    return ChunkPlan(begin, begin + n, blocks, mask, is_sink)


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor,
             k_scale: Tensor | None = None, v_scale: Tensor | None = None) -> None:
    """Store the step's keys/values k, v (1, Hkv, T, D) at their slots of caches (num_blocks, bs, Hkv, D);
    an int8 cache (with its scales (num_blocks, bs, Hkv)) gets them quantized (leanfm.ops.kv_quant)."""
    hkv, d = k_cache.shape[-2:]
    for cache, scales, x in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        x = x[0].transpose(0, 1)  # (T, Hkv, D)
        if scales is not None:
            x, s = quantize_kv(x)
            scales.view(-1, hkv).index_copy_(0, slot_mapping, s)
        cache.view(-1, hkv, d).index_copy_(0, slot_mapping, x.to(cache.dtype))


def gather_blocks(cache: Tensor, blocks: Tensor) -> Tensor:
    """cache (num_blocks, bs, Hkv, D), blocks (R, MB) -> keys or values (R, Hkv, MB * bs, D)."""
    r, mb = blocks.shape
    _, bs, hkv, d = cache.shape
    # index_select on the flat ids: several times faster than advanced indexing for this gather
    return cache.index_select(0, blocks.reshape(-1)).view(r, mb * bs, hkv, d).transpose(1, 2)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, plan: PagedAttentionPlan,
                    scale: float, softcap: float | None = None, *, k_scale: Tensor | None = None,
                    v_scale: Tensor | None = None, q_sink: Tensor | None = None,
                    score: Tensor | None = None) -> Tensor:
    """q (1, H, T, D), this step's k, v (1, Hkv, T, D) already written to the caches. Returns (1, H, T, D).

    k_scale/v_scale: the scales of int8 caches; q_sink (1, H, T, D): the query that scores the sink keys
    (keys at positions < plan.sinks); score (num_blocks, bs, Hkv) fp32: gets every key's attention
    probability summed over the query heads of its kv head (H2O)."""
    outs = []
    if plan.num_decode:
        outs.append(_decode(q, k_cache, v_cache, plan, scale, softcap, k_scale, v_scale, q_sink, score))
    for c in plan.chunks:
        outs.append(_chunk(c, q, k, v, k_cache, v_cache, plan, scale, softcap, k_scale, v_scale, q_sink, score))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _decode(q, k_cache, v_cache, plan, scale, softcap, k_scale, v_scale, q_sink, score) -> Tensor:
    r = plan.num_decode
    qd = q[0, :, :r].transpose(0, 1)  # (R, H, D)
    qs = None if q_sink is None or not plan.sinks else q_sink[0, :, :r].transpose(0, 1)
    args = (plan.decode_table, plan.decode_lo, plan.decode_hi, scale, softcap, plan.sinks, qs, k_scale, v_scale, score)
    out = paged_decode(qd, k_cache, v_cache, *args)
    if out is None:
        if plan.sinks or k_scale is not None or score is not None:
            out = decode_reference(qd, k_cache, v_cache, *args)
        else:  # gather the visible blocks, one batched SDPA
            blocks, mask = plan.decode_window()
            kd, vd = gather_blocks(k_cache, blocks).to(qd.dtype), gather_blocks(v_cache, blocks).to(qd.dtype)
            out = attention(qd.unsqueeze(2), kd, vd, scale, mask, softcap=softcap).squeeze(2)
    return out.transpose(0, 1).unsqueeze(0)


def _chunk(c, q, k, v, k_cache, v_cache, plan, scale, softcap, k_scale, v_scale, q_sink, score) -> Tensor:
    qc = q[:, :, c.begin:c.end]
    if c.blocks is None:
        kc, vc = k[:, :, c.begin:c.end], v[:, :, c.begin:c.end]
        slots = plan.slot_mapping[c.begin:c.end]
    else:
        kc = gather_keys(k_cache, c.blocks[None], k_scale).to(q.dtype)
        vc = gather_keys(v_cache, c.blocks[None], v_scale).to(q.dtype)
        slots = (c.blocks[:, None] * plan.block_size + torch.arange(plan.block_size, device=q.device)).flatten()
    qs = None if q_sink is None or c.is_sink is None else q_sink[:, :, c.begin:c.end]
    if qs is None and score is None:
        return attention(qc, kc, vc, scale, c.mask, is_causal=c.mask is None, softcap=softcap)
    mask = c.mask
    if mask is None:
        pos = torch.arange(c.end - c.begin, device=q.device)[None]
        mask = causal_mask(pos, pos[0])
    out, p = explicit_attention(qc, kc, vc, scale, mask, softcap, qs, c.is_sink, want_probs=score is not None)
    if score is not None:
        add_scores(score, p, slots[None])
    return out
