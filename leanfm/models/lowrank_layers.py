"""LowRankLinear: a linear layer whose weight is the product of two thin factors.

    y = (x @ A^T) @ B^T + b          A [rank, in], B [out, rank]

rank * (in + out) parameters instead of in * out. Both factors are trainable nn.Parameters, so
distillation (or LoRA-style recovery) can tune them after a factorization (leanfm.compress.lowrank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.models.forms import register_form

__all__ = ["LowRankLinear"]


@register_form("lowrank_linear")
class LowRankLinear(nn.Module):
    """y = x A^T B^T + b with A [rank, in_features] and B [out_features, rank]."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}] for a "
                             f"{out_features}x{in_features} layer, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=5**0.5)
            nn.init.zeros_(self.B)

    @classmethod
    def from_factors(cls, b: Tensor, a: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """From factors B [out, r] and A [r, in] (copied) and an optional bias [out]."""
        (out_features, rank), in_features = b.shape, a.shape[1]
        if a.shape[0] != rank:
            raise ValueError(f"factor shapes do not chain: B {tuple(b.shape)}, A {tuple(a.shape)}")
        layer = cls(in_features, out_features, rank, bias=bias is not None, device="meta", dtype=a.dtype)
        layer.A = nn.Parameter(a.detach().contiguous().clone())
        layer.B = nn.Parameter(b.detach().to(a.dtype).contiguous().clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def dense_weight(self) -> Tensor:
        """The [out, in] weight B @ A these factors represent."""
        return self.B @ self.A

    @property
    def num_parameters(self) -> int:
        """Parameters held (factors and bias)."""
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None
                                                                     else 0)

    def form_spec(self) -> dict[str, Any]:
        return {"form": self.form, "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_form_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> LowRankLinear:
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], device="meta",
                   dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
