"""Int8 weight x int8 activation layers: W8A8Linear (SmoothQuant) and Int8OutlierLinear (LLM.int8()).

Both store the weight as int8 codes with one fp32 scale per output row (symmetric absmax):

    W[n, k] ~= weight[n, k] * weight_scale[n]          weight int8 in [-127, 127]

and quantize activations per token at run time (leanfm.ops.quant.quantize_per_token_int8):
x[m, k] ~= xq[m, k] * x_scale[m]. The product is an exact integer matmul rescaled by both scales:

    y[m, n] = (sum_k xq[m, k] * weight[n, k]) * x_scale[m] * weight_scale[n] + bias[n]

Int8OutlierLinear (Dettmers et al. 2022) first splits off the input columns in which any token's |x|
exceeds `threshold`: those columns are multiplied in floating point with the dequantized weight
columns (as bitsandbytes does, so only the int8 weight is stored), the rest go through the int8 path.

`int8_matmul` is exact. On this CPU build torch._int_mm is a slow reference loop (10-30x slower than
an fp32 GEMM measured at 512x640x2048), so the CPU path multiplies the int8 values as fp32 in chunks
of K <= 1024 columns: every partial sum is an integer below 127 * 127 * 1024 < 2**24, hence exact in
fp32 whatever the summation order, and the chunks add up in int32. On CUDA torch._int_mm is used when
its shape rules hold (M > 16, K and N multiples of 8).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.models.forms import register_form
from leanfm.ops.quant import quantize_per_token_int8

__all__ = ["Int8OutlierLinear", "W8A8Linear", "int8_matmul", "int8_matmul_reference", "quantize_rows_int8"]

_EXACT_K = 1024  # 127 * 127 * 1024 < 2**24: an fp32 dot product of this many int8 pairs is exact


def int8_matmul_reference(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N], by an int32 matmul (exact, slow)."""
    return a.to(torch.int32) @ b.to(torch.int32).T


def _int_mm_ok(a: Tensor, b: Tensor) -> bool:
    m, k = a.shape
    return a.is_cuda and m > 16 and k % 8 == 0 and b.shape[0] % 8 == 0


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact a [M, K] int8 @ b [N, K]^T int8 -> int32 [M, N] (see the module docstring for the paths)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_matmul: expects int8 [M, K] and [N, K], got {a.dtype} {tuple(a.shape)} and "
                         f"{b.dtype} {tuple(b.shape)}")
    if _int_mm_ok(a, b):
        return torch._int_mm(a, b.T)
    if torch.get_float32_matmul_precision() != "highest":  # fp32 GEMMs may round through bf16/tf32
        return int8_matmul_reference(a, b)
    k = a.shape[1]
    out = None
    for k0 in range(0, k, _EXACT_K):
        part = (a[:, k0:k0 + _EXACT_K].float() @ b[:, k0:k0 + _EXACT_K].float().T).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output row of w [N, K] -> (int8 [N, K], fp32 scale [N])."""
    scale = (w.detach().float().abs().amax(1) / 127.0).clamp_min(1e-12)
    q = torch.round(w.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@register_form("w8a8_linear")
class W8A8Linear(nn.Module):
    """y = x @ W^T + b with int8 per-row weights and dynamic int8 per-token activations (SmoothQuant)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> W8A8Linear:
        """Quantize a float nn.Linear's weight (absmax per output row); kwargs go to the constructor."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  dtype=linear.weight.dtype, **kwargs)
        out.weight, out.weight_scale = quantize_rows_int8(linear.weight)
        if linear.bias is not None:
            out.bias.data = linear.bias.detach().clone()
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def _int8_part(self, x2: Tensor) -> Tensor:
        """fp32 [M, N]: x2 [M, K] through the int8 path."""
        xq, xs = quantize_per_token_int8(x2)
        return int8_matmul(xq, self.weight).float() * xs * self.weight_scale

    def _finish(self, y: Tensor, x: Tensor) -> Tensor:
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self._finish(self._int8_part(x.reshape(-1, self.in_features)), x)

    @property
    def weight_bits(self) -> float:
        return 8 + 32 / self.in_features

    def form_spec(self) -> dict[str, Any]:
        return {"form": self.form, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_form_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> W8A8Linear:
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], device="meta", dtype=dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@register_form("int8_outlier_linear")
class Int8OutlierLinear(W8A8Linear):
    """LLM.int8(): input columns with any |x| > threshold in floating point, the rest in int8 x int8."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.float32, threshold: float = 6.0):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        cols = (x2.abs() > self.threshold).any(0).nonzero().flatten()
        if cols.numel() == 0:
            return self._finish(self._int8_part(x2), x)
        y = self._int8_part(x2.index_fill(1, cols, 0.0))
        w_cols = self.weight.index_select(1, cols).float() * self.weight_scale[:, None]
        return self._finish(y + F.linear(x2.index_select(1, cols), w_cols), x)

    def form_spec(self) -> dict[str, Any]:
        return {**super().form_spec(), "threshold": self.threshold}

    @classmethod
    def from_form_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> Int8OutlierLinear:
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], device="meta", dtype=dtype,
                   threshold=spec["threshold"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"
