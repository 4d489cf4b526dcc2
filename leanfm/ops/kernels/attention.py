"""Paged decode attention in C++ (csrc/paged_decode.cpp), with leanfm.ops.paged_reference as its meaning.

    out = paged_decode(q, k_cache, v_cache, table, lo, hi, scale, softcap=None, sinks=0, q_sink=None,
                       k_scale=None, v_scale=None, score=None)   # None: the kernel cannot take these

One query token per request (R, H, D) over its keys read in place from the paged caches (no gather
copy): fp32, bf16 or int8 caches (int8 with per-token, per-head fp32 scales), GQA with up to 8 query
heads per kv head, head_dim a multiple of 8 up to 512, sliding windows (lo), attention sinks scored with
their own query (StreamingLLM), soft-capping, fp32 online softmax, and the attention probabilities
added into `score` (H2O). Parallel over (request, kv head); split-K over the keys when there are
fewer tasks than twice the threads. Same switches as the other kernels (LEANFM_KERNELS=0 disables).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leanfm.ops import kernels as _kernels
from leanfm.ops.kernels import _build

_op = None  # the torch op, False when unavailable
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def _load():
    global _op
    if _op is None:
        _op = torch.ops.leanfm_kernels.paged_decode.default if _build.load() else False
    return _op


def paged_decode_available() -> bool:
    return _kernels.kernels_enabled() and bool(_load())


def _fits(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor) -> bool:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.dtype not in _CACHE_DTYPES or v_cache.dtype != k_cache.dtype:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16) or not (q.is_cpu and k_cache.is_cpu):
        return False
    h, d, hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    if d % 8 or d > 512 or k_cache.shape[3] != d or h % hkv or h // hkv > 8:
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return False
    return not (torch.is_grad_enabled() and q.requires_grad) and table.dtype == torch.long


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, table: Tensor, lo: Tensor, hi: Tensor, scale: float,
                 softcap: float | None = None, sinks: int = 0, q_sink: Tensor | None = None,
                 k_scale: Tensor | None = None, v_scale: Tensor | None = None,
                 score: Tensor | None = None) -> Tensor | None:
    """The kernel's output (R, H, D), or None when it is disabled, unavailable or cannot take the inputs."""
    if not _kernels.kernels_enabled() or not _fits(q, k_cache, v_cache, table) or not _load():
        return None
    return _op(q, q_sink, k_cache, v_cache, k_scale, v_scale, table.contiguous(), lo.contiguous(), hi.contiguous(),
               int(sinks), float(scale), float(softcap or 0.0), score)
