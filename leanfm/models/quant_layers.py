"""Weight-only quantized layers: QuantLinear and QuantEmbedding (2, 3, 4 or 8 bits, group-wise).

The weight is stored packed (leanfm.ops.quant: codes in [0, 2**bits), fp32 scales and zeros per group):

    W = (codes - zeros) * scales              # per group of `group_size` input columns

QuantLinear's forward runs leanfm's int8 / int4 kernels (leanfm.ops.kernels.quant) at decode time
and dequantizes once per call for prefill; 2- and 3-bit weights always take the dequantize path.
QuantEmbedding looks rows up in the same packed form; a tied embedding/head shares one QuantLinear's
buffers (`QuantLinear.retie`), so the pair is stored once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.models.forms import register_form
from leanfm.ops.kernels.quant import linear_quant
from leanfm.ops.quant import check_group_size, dequantize, pack_bits, packed_shape, quantize, unpack_bits

__all__ = ["QuantEmbedding", "QuantLinear"]


def _empty_quant_buffers(n: int, k: int, bits: int, group_size: int, device=None) -> dict[str, Tensor]:
    g = k // group_size
    return {"qweight": torch.empty(packed_shape(n, k, bits), dtype=torch.uint8, device=device),
            "scales": torch.empty(n, g, device=device), "zeros": torch.empty(n, g, device=device)}


@register_form("quant_linear")
class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + b with W packed at `bits` bits in groups of `group_size` input columns."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = check_group_size(in_features, group_size)
        for name, t in _empty_quant_buffers(out_features, in_features, bits, self.group_size, device).items():
            self.register_buffer(name, t)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, bits: int, bias: Tensor | None = None
                   ) -> QuantLinear:
        """From unpacked codes uint8 [N, K] and per-group scales/zeros [N, G] (group size K // G)."""
        n, k = codes.shape
        layer = cls(k, n, bits, k // scales.shape[1], bias=bias is not None,
                    dtype=bias.dtype if bias is not None else torch.float32)
        layer.qweight = pack_bits(codes, bits)
        layer.scales = scales.float().contiguous()
        layer.zeros = zeros.float().contiguous()
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None, symmetric: bool = True,
                    clip_ratio: float = 1.0) -> QuantLinear:
        """Round-to-nearest quantization of a float nn.Linear."""
        q, s, z = quantize(linear.weight.detach(), bits, group_size, symmetric, clip_ratio)
        return cls.from_codes(q, s, z, bits, linear.bias)

    def codes(self) -> Tensor:
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits in (4, 8):
            return linear_quant(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    @property
    def weight_bits(self) -> float:
        """Storage bits per weight, scales and zeros included."""
        return (self.qweight.numel() * 8 + (self.scales.numel() + self.zeros.numel()) * 32) / (
            self.in_features * self.out_features)

    def form_spec(self) -> dict[str, Any]:
        return {"form": self.form, "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "group_size": self.group_size, "bias": self.bias is not None}

    @classmethod
    def from_form_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> QuantLinear:
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                   bias=spec["bias"], device="meta", dtype=dtype)

    def retie(self, model: nn.Module) -> None:
        """Make model's input embedding share this (LM head) layer's packed weight."""
        model.model.embed_tokens = QuantEmbedding.tied_to(self, model.model.norm.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


@register_form("quant_embedding")
class QuantEmbedding(nn.Module):
    """An embedding table stored like QuantLinear's weight ([vocab, dim] codes); rows dequantized on lookup.

    `dtype` is the dtype of the vectors it returns (the model's compute dtype).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int | None = None,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.group_size = check_group_size(embedding_dim, group_size)
        self.dtype = dtype
        for name, t in _empty_quant_buffers(num_embeddings, embedding_dim, bits, self.group_size, device).items():
            self.register_buffer(name, t)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int | None = None,
                       symmetric: bool = True) -> QuantEmbedding:
        w = emb.weight.detach()
        q, s, z = quantize(w, bits, group_size, symmetric)
        out = cls(w.shape[0], w.shape[1], bits, group_size, dtype=w.dtype)
        out.qweight, out.scales, out.zeros = pack_bits(q, bits), s, z
        return out

    @classmethod
    def tied_to(cls, head: QuantLinear, dtype: torch.dtype = torch.float32) -> QuantEmbedding:
        """An embedding whose buffers are `head`'s own tensors (no copy), returning `dtype` vectors."""
        out = cls(head.out_features, head.in_features, head.bits, head.group_size, device="meta", dtype=dtype)
        out.qweight, out.scales, out.zeros = head.qweight, head.scales, head.zeros
        out.tied = True
        return out

    tied = False

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        codes = unpack_bits(self.qweight[flat], self.bits, self.embedding_dim)
        rows = dequantize(codes, self.scales[flat], self.zeros[flat], self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> Tensor:
        """The dequantized table (for code that reads embed_tokens.weight, e.g. to export)."""
        return dequantize(unpack_bits(self.qweight, self.bits, self.embedding_dim), self.scales, self.zeros,
                          self.dtype)

    def form_spec(self) -> dict[str, Any]:
        return {"form": self.form, "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "bits": self.bits, "group_size": self.group_size, "tied": self.tied}

    @classmethod
    def from_form_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> QuantEmbedding:
        out = cls(spec["num_embeddings"], spec["embedding_dim"], spec["bits"], spec["group_size"], device="meta",
                  dtype=dtype)
        out.tied = spec.get("tied", False)
        return out
