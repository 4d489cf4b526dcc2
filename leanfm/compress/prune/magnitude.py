"""Magnitude pruning: zero the weights of smallest |W| (the baseline every other pruner must beat).

Unstructured: exactly round(sparsity * numel) weights of each matrix (layer-wise, as in the SparseGPT
and Wanda papers' baseline). N:M ("2:4", "4:8"): the M - N smallest of every M consecutive input
weights of each row. No calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from leanfm.compress.api import CompressContext, register
from leanfm.compress.prune.common import PruneConfig, PruneTally, apply_mask_

__all__ = ["MagnitudeConfig", "apply_magnitude", "magnitude_mask"]


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    method = "magnitude"


def magnitude_mask(w: Tensor, config: PruneConfig) -> Tensor:
    """Keep-mask of `w` [N, K] under the config's sparsity / pattern, by |W| (whole matrix if unstructured)."""
    return config.keep_mask(w.detach().abs().float(), per_row=False)


@register(MagnitudeConfig)
def apply_magnitude(model: nn.Module, config: MagnitudeConfig, ctx: CompressContext) -> dict:
    tally = PruneTally()
    for name, module, cfg in ctx.bar(ctx.targets(), "magnitude"):
        keep = magnitude_mask(module.weight, cfg)
        apply_mask_(module, keep)
        tally.add(name, keep, cfg)
    return tally.summary(model, config)
