"""int8 KV-cache quantization: symmetric, one fp32 scale per token and kv head (KIVI's per-token form).

    q, scale = quantize_kv(x)          # x (..., D) float -> q (..., D) int8, scale (...) fp32
    x_hat = dequantize_kv(q, scale)    # (..., D) fp32; |x - x_hat| <= scale / 2 per element

scale = max|x| / 127 over the head dimension, so a token's largest element is exact and the others
are rounded to the nearest multiple of scale. K and V use the same form; the attention kernel folds
the scales into the dot product (K) and the probability (V) instead of dequantizing rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

QMAX = 127
_TINY = 1e-30  # an all-zero row gets this scale (and codes 0) instead of a division by zero


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., D) -> (int8 codes (..., D), fp32 scales (...))."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / QMAX).clamp_min(_TINY)
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """int8 codes (..., D) and scales (...) -> values (..., D) in `dtype`."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)
