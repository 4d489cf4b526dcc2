"""Scaled dot-product attention with GQA, causal / sliding-window masks and logit soft-capping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(q_pos: Tensor, k_pos: Tensor, window: int | None = None) -> Tensor:
    """Boolean mask (B, 1, T, L): True where query at q_pos (B, T) may attend key at k_pos (B, L) or (L,).

    A key is visible when it is not in the future and, with a sliding window, when fewer than
    `window` positions lie between them (HF / llama.cpp convention: q - k < window).
    """
    if k_pos.dim() == 1:
        k_pos = k_pos.unsqueeze(0)
    diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)  # (B, T, L)
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    return visible.unsqueeze(1)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    mask: Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """q: (B, Hq, T, D); k, v: (B, Hkv, L, D); mask: bool (B, 1, T, L) or None. Returns (B, Hq, T, D)."""
    n_rep = q.shape[1] // k.shape[1]
    if softcap is None:
        if n_rep > 1 and q.shape[2] == 1:
            return _decode_gqa(q, k, v, scale, mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=n_rep > 1
        )
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and is_causal:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _decode_gqa(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """One query token per sequence: fold the query heads of a group into the row dimension, so the
    kv heads are read once and no repeat is materialised."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # (B, Hkv, G, D): the G query heads sharing one kv head
    if mask is not None:
        mask = mask.expand(b, 1, 1, k.shape[2])
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, 1, d)
