"""QLoRA's frozen base: leanfm's packed int4/int8 QuantLinear, trainable through (not into) it.

QuantLinear's own forward dequantizes W for prefill-sized inputs; under autograd, F.linear would then
keep that float W alive for the backward pass, one full-precision copy of every layer: the memory QLoRA
exists to save. TrainableQuantLinear computes the same forward without recording it, and its backward
dequantizes W again, a block of rows at a time, to form dL/dx = dL/dy @ W. The weights stay packed;
no gradient is ever computed for them.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor, nn

from leanfm.models.layers import FastLinear
from leanfm.models.quant_layers import QuantLinear
from leanfm.ops.quant import dequantize, unpack_bits

__all__ = ["TrainableQuantLinear", "dequantized_rows", "make_trainable_quant", "quantize_base_"]

_ROW_BLOCK_WEIGHTS = 1 << 21  # dequantize at most ~2M weights (8 MB fp32) at a time in backward


def dequantized_rows(layer: QuantLinear, start: int, end: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rows [start, end) of the layer's dequantized weight (end - start, in_features)."""
    codes = unpack_bits(layer.qweight[start:end], layer.bits, layer.in_features)
    return dequantize(codes, layer.scales[start:end], layer.zeros[start:end], dtype)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return QuantLinear.forward(layer, x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        layer = ctx.layer
        n = layer.out_features
        step = max(1, _ROW_BLOCK_WEIGHTS // layer.in_features)
        g = grad_out.float()
        grad_x = None
        for i in range(0, n, step):
            j = min(n, i + step)
            part = g[..., i:j] @ dequantized_rows(layer, i, j)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(grad_out.dtype), None


class TrainableQuantLinear(QuantLinear):
    """A QuantLinear whose input gradient is computed without storing the dequantized weight."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuantMatmul.apply(x, self)
        return super().forward(x)


def make_trainable_quant(model: nn.Module) -> int:
    """Switch every plain QuantLinear in `model` to TrainableQuantLinear in place; returns the count."""
    n = 0
    for module in model.modules():
        if type(module) is QuantLinear:
            module.__class__ = TrainableQuantLinear
            n += 1
    return n


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_base_(model: nn.Module, bits: int, group_size: int | None, patterns: tuple[str, ...],
                   head_bits: int | None = None) -> dict[str, int]:
    """Round-to-nearest quantize every nn.Linear whose name matches `patterns` (symmetric, group-wise),
    and the LM head (with its tied embedding) at `head_bits`, into TrainableQuantLinear. Returns counts."""
    names = [n for n, m in model.named_modules() if type(m) in (nn.Linear, FastLinear)]
    count = 0
    for name in names:
        if name != "lm_head" and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            _set_module(model, name, TrainableQuantLinear.from_linear(model.get_submodule(name), bits, group_size))
            count += 1
    head = getattr(model, "lm_head", None)
    if head_bits is not None and isinstance(head, nn.Linear):
        q = TrainableQuantLinear.from_linear(head, head_bits, group_size)
        model.lm_head = q
        if getattr(model.config, "tie_word_embeddings", False):
            q.retie(model)
    return {"quantized_linears": count, "head_bits": head_bits or 0}
