"""Rotary position embeddings (the rotate-half / NeoX convention HF checkpoints use)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_inv_freq(
    head_dim: int,
    theta: float,
    scaling_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_positions: int = 8192,
) -> Tensor:
    """Inverse frequencies (head_dim // 2,), float32, with optional linear or Llama-3 scaling."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # always a real CPU tensor, even under a meta device context
    if scaling_type == "linear":
        return inv_freq / factor
    if scaling_type == "llama3":
        low_wavelen = original_max_positions / low_freq_factor
        high_wavelen = original_max_positions / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape positions.shape + (head_dim,), computed in float32 then cast."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)  # (..., D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D). Rotates the two halves of the head dimension."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
