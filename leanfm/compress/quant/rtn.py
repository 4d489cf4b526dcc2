"""RTN: round-to-nearest weight-only quantization (int8 per channel; int4/3/2 group-wise).

The baseline every other quantizer is measured against: each group of `group_size` input weights gets
its own scale (and zero, if asymmetric) from its min/max, and every weight rounds to the nearest code.
No calibration data. `include: [lm_head]` quantizes the LM head (and a tied embedding with it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leanfm.compress.api import CompressContext, MethodConfig, register, set_module
from leanfm.models.quant_layers import QuantEmbedding, QuantLinear
from leanfm.ops.quant import PACKABLE_BITS, packed_shape


@dataclass(frozen=True)
class WeightQuantConfig(MethodConfig):
    """Shared options and checks of the weight-only quantizers (RTN, GPTQ, AWQ)."""

    bits: int = 4
    group_size: int | None = 128  # None or -1: per output channel
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in PACKABLE_BITS:
            self._fail(f"bits={self.bits} cannot be stored; choose one of {PACKABLE_BITS}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            self._fail(f"group_size must be positive, -1 or null (per channel), got {self.group_size}")

    @property
    def effective_group(self) -> int | None:
        return None if self.group_size in (None, -1) else self.group_size

    def check_module(self, name: str, module: nn.Module) -> None:
        k = module.weight.shape[1]
        gs = self.effective_group
        if gs is not None and k % gs:
            self._fail(f"group_size {gs} does not divide {name}'s input width {k}; choose a divisor of {k} "
                       f"or add an override for {name!r}")
        try:
            packed_shape(module.weight.shape[0], k, self.bits)
        except ValueError as e:
            self._fail(f"{name}: {e}")


@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    method = "rtn"


@register(RTNConfig)
def apply_rtn(model: nn.Module, config: RTNConfig, ctx: CompressContext) -> dict:
    targets = ctx.targets((nn.Linear, nn.Embedding))
    bits_total = weights = 0
    for name, module, cfg in ctx.bar(targets, "rtn"):
        if isinstance(module, nn.Embedding):
            if getattr(model.config, "tie_word_embeddings", False):
                continue  # quantized through lm_head, which shares its weight
            new = QuantEmbedding.from_embedding(module, cfg.bits, cfg.effective_group, cfg.symmetric)
            set_module(model, name, new)
            continue
        new = QuantLinear.from_linear(module, cfg.bits, cfg.effective_group, cfg.symmetric)
        set_module(model, name, new)
        bits_total += new.weight_bits * module.weight.numel()
        weights += module.weight.numel()
    return {"modules": len(targets), "bits_per_weight": round(bits_total / max(weights, 1), 3)}
