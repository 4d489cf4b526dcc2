"""The adapters' numerics as pure functions over tensors (no module state, no surgery).

Shapes follow nn.Linear: W is (out, in), x is (..., in). LoRA's factors are A (r, in) and B (out, r):

    LoRA   y = x W^T + s * (x A^T) B^T,      s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA   W' = m * (W + s B A) / ||W + s B A||_row           (norm over the input dim, per output row)
    IA3    y = (x W^T) * l  (attention)   or   y = (x * l) W^T  (feed-forward input)
    PiSSA  A, B from W's top-r singular triplets; the base keeps the residual W - s B A
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "dequantize_blockwise", "dora_magnitude", "dora_output", "dora_scale", "lora_delta", "lora_scaling",
    "pissa_factors", "quantize_blockwise",
]


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """The weight update s * B @ A, (out, in)."""
    return (b.float() @ a.float()) * scaling


def dora_magnitude(weight: Tensor, delta: Tensor | None = None) -> Tensor:
    """||W + delta|| per output row (out,): DoRA's magnitude at init, and its normaliser."""
    w = weight.float() if delta is None else weight.float() + delta.float()
    return w.norm(p=2, dim=1)


def dora_scale(magnitude: Tensor, weight: Tensor, delta: Tensor) -> Tensor:
    """m / ||W + delta||_row, (out,). The norm is a constant in backward (DoRA §4.3): computed without
    autograd, so no weight-sized tensor is kept for the backward pass."""
    with torch.no_grad():
        norm = dora_magnitude(weight, delta)
    return magnitude / norm.to(magnitude.dtype)


def dora_output(base_no_bias: Tensor, lora_out: Tensor, scale: Tensor, scaling: float) -> Tensor:
    """What DoRA adds to the base output: (scale - 1) * x W^T + scale * s * x A^T B^T."""
    return (scale - 1) * base_no_bias + scale * (lora_out * scaling)


@torch.no_grad()
def pissa_factors(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A, B) from the top-r singular triplets of W such that s * B @ A is W's best rank-r part:
    A = sqrt(S_r / s) Vh_r, B = U_r sqrt(S_r / s). The caller keeps W - s * B @ A as the base."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


# --- 8-bit optimizer states --------------------------------------------------------------------------
def quantize_blockwise(x: Tensor, block: int, signed: bool, power: float) -> tuple[Tensor, Tensor]:
    """Blockwise companded 8-bit codes of x (flattened, zero-padded to whole blocks) and each block's
    absmax. A value u = x / absmax in [-1, 1] is stored as round(sign(u) |u|^(1/power) * qmax), so small
    values keep precision (power > 1 spreads the codes over several decades, as a dynamic map does).
    signed: int8 codes in [-127, 127]; else uint8 codes in [0, 255] for x >= 0."""
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(1).clamp_min(1e-30)
    u = (blocks / absmax[:, None]).clamp_(-1, 1)
    c = u.abs().pow_(1.0 / power)
    if signed:
        return (c.mul_(127).round_() * u.sign()).to(torch.int8).view(-1), absmax
    return c.mul_(255).round_().to(torch.uint8).view(-1), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, shape: torch.Size, block: int, signed: bool,
                         power: float) -> Tensor:
    """Inverse of quantize_blockwise: fp32 values of `shape`."""
    qmax = 127.0 if signed else 255.0
    c = codes.view(-1, block).float() / qmax
    u = c.abs().pow_(power) * (c.sign() if signed else 1.0)
    n = math.prod(shape)
    return (u * absmax[:, None]).view(-1)[:n].view(shape)
