"""Pure-PyTorch paged attention with everything the fast paths support: the reference the C++ decode
kernel is tested against, and the fallback for what plain SDPA cannot do (attention sinks scored with
their own query, int8 caches, attention probabilities for H2O).

    out = decode_reference(q, k_cache, v_cache, table, lo, hi, scale, ...)    # one query per request
    out, probs = explicit_attention(q, k, v, scale, mask, softcap, q_sink, is_sink, want_probs)  # any shape

Key j of request r sits in block table[r, j // bs] at offset j % bs; visible keys are [lo, hi) and
the sinks [0, min(sinks, lo)). `score` (num_blocks, bs, Hkv) fp32 gets each visible key's probability
summed over the query heads of its kv head (H2O's accumulated attention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leanfm.ops.kv_quant import dequantize_kv


def gather_keys(cache: Tensor, blocks: Tensor, scale: Tensor | None = None) -> Tensor:
    """cache (NB, bs, Hkv, D), blocks (R, MB) -> (R, Hkv, MB * bs, D), dequantized to fp32 when int8."""
    r, mb = blocks.shape
    _, bs, hkv, d = cache.shape
    flat = blocks.reshape(-1)
    x = cache.index_select(0, flat)
    if scale is not None:
        x = dequantize_kv(x, scale.index_select(0, flat))
    return x.reshape(r, mb * bs, hkv, d).transpose(1, 2)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None,
                       softcap: float | None = None, q_sink: Tensor | None = None, is_sink: Tensor | None = None,
                       want_probs: bool = False) -> tuple[Tensor, Tensor | None]:
    """q (B, H, T, D), k/v (B, Hkv, L, D), mask bool (B or 1, 1, T, L) or None (all visible).
    Keys where is_sink (B or 1, L) bool are scored with q_sink (shaped like q). fp32 scores and softmax.
    Returns out (B, H, T, D) in q's dtype and, with want_probs, the probabilities (B, Hkv, G, T, L)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qf = q.float().reshape(b, hkv, g, t, d)
    kf, vf = k.float(), v.float()
    s = torch.einsum("bhgtd,bhld->bhgtl", qf, kf) * scale
    if q_sink is not None and is_sink is not None and bool(is_sink.any()):
        qs = q_sink.float().reshape(b, hkv, g, t, d)
        s_sink = torch.einsum("bhgtd,bhld->bhgtl", qs, kf) * scale
        s = torch.where(is_sink[:, None, None, None, :], s_sink, s)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a row with no visible key gives zeros
    out = torch.einsum("bhgtl,bhld->bhgtd", p, vf).reshape(b, h, t, d).to(q.dtype)
    return out, (p if want_probs else None)


def add_scores(score: Tensor, probs: Tensor, slots: Tensor) -> None:
    """score (NB, bs, Hkv) += probs (B, Hkv, G, T, L) summed over G and T, at flat key slots (B, L)."""
    hkv = score.shape[-1]
    per_key = probs.sum(dim=(2, 3))  # (B, Hkv, L)
    heads = torch.arange(hkv).view(1, hkv, 1).expand_as(per_key)
    score.view(-1, hkv).index_put_((slots[:, None, :].expand_as(per_key), heads), per_key, accumulate=True)


def decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, lo: Tensor, hi: Tensor,
                     scale: float, softcap: float | None = None, sinks: int = 0, q_sink: Tensor | None = None,
                     k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                     score: Tensor | None = None) -> Tensor:
    """q (R, H, D) -> (R, H, D): each request's one query over its visible paged keys (module doc)."""
    bs = k_cache.shape[1]
    kpos = torch.arange(table.shape[1] * bs)
    n_sink = torch.minimum(torch.full_like(lo, sinks), lo)
    visible = ((kpos >= lo[:, None]) & (kpos < hi[:, None])) | (kpos < n_sink[:, None])  # (R, L)
    keys, values = gather_keys(k_cache, table, k_scale), gather_keys(v_cache, table, v_scale)
    qs = None if q_sink is None else q_sink.unsqueeze(2)
    out, p = explicit_attention(q.unsqueeze(2), keys, values, scale, visible[:, None, None, :], softcap, qs,
                                kpos < n_sink[:, None], want_probs=score is not None)
    if score is not None:
        slots = table[:, kpos // bs] * bs + kpos % bs
        add_scores(score, p * visible[:, None, None, None, :], slots)
    return out.squeeze(2)
