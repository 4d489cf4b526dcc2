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
    "dora_magnitude", "dora_output", "dora_scale", "lora_delta", "lora_scaling", "pissa_factors",
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
    """m / ||W + delta||_row, (out,). The norm is treated as a constant in backward (DoRA §4.3)."""
    return magnitude / dora_magnitude(weight, delta).detach().to(magnitude.dtype)


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
