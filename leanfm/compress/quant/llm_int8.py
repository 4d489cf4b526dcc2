"""LLM.int8() (Dettmers et al. 2022): int8 weights with a floating-point path for outlier features.

Every targeted linear becomes an Int8OutlierLinear (leanfm.models.int8_layers): int8 weights with one
absmax scale per output row; at run time, the input columns in which some token's |x| exceeds
`threshold` are multiplied in floating point with the dequantized weight columns (bitsandbytes'
mixed-precision decomposition, so only the int8 weight is stored), the rest as int8 x int8 with
per-token activation scales. No calibration data: the outliers are found on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from leanfm.compress.api import CompressContext, MethodConfig, register, set_module
from leanfm.models.int8_layers import Int8OutlierLinear

__all__ = ["LLMInt8Config", "apply_llm_int8"]


@dataclass(frozen=True)
class LLMInt8Config(MethodConfig):
    method = "llm_int8"

    threshold: float = 6.0  # |activation| above which an input column takes the floating-point path

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            self._fail(f"threshold must be a positive activation magnitude, got {self.threshold}; "
                       "6.0 is the paper's value (use a very large value for pure int8)")


@register(LLMInt8Config)
def apply_llm_int8(model: nn.Module, config: LLMInt8Config, ctx: CompressContext) -> dict:
    """Replace every targeted nn.Linear by an Int8OutlierLinear."""
    targets = ctx.targets((nn.Linear,))
    for name, module, cfg in ctx.bar(targets, "llm_int8"):
        set_module(model, name, Int8OutlierLinear.from_linear(module, threshold=cfg.threshold))
    return {"modules": len(targets), "bits_per_weight": 8}
