"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

The input norms come from calibration: the model is walked layer by layer (LayerwiseCalibration), so
each layer's statistics are taken on the outputs of the layers already pruned. Unstructured: exactly
round(sparsity * K) weights of every row; N:M: the M - N lowest scores of every M consecutive inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from leanfm.compress.api import CompressContext, register
from leanfm.compress.prune.common import (
    ColumnNorms,
    InputStats,
    PruneConfig,
    PruneTally,
    apply_mask_,
    calibrated_layers,
    layer_of,
)
from leanfm.ops.sparsity import wanda_scores

__all__ = ["WandaConfig", "apply_wanda", "wanda_mask"]


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    method = "wanda"
    needs_calibration = True

    def check_module(self, name: str, module: nn.Module) -> None:
        super().check_module(name, module)
        layer_of(name)


def wanda_mask(w: Tensor, act_norm: Tensor, config: PruneConfig) -> Tensor:
    """Keep-mask of `w` [N, K] from the input feature norms act_norm [K] (per output row)."""
    return config.keep_mask(wanda_scores(w.detach(), act_norm), per_row=True)


@register(WandaConfig)
def apply_wanda(model: nn.Module, config: WandaConfig, ctx: CompressContext) -> dict:
    tally = PruneTally()
    for step, targets in calibrated_layers(model, ctx, "wanda"):
        stats = InputStats(ColumnNorms)
        step.feed(stats.hooks([sub for sub, *_ in targets]))
        stats.done()
        for sub, name, module, cfg in targets:
            keep = wanda_mask(module.weight, stats[sub].norms(), cfg)
            apply_mask_(module, keep)
            tally.add(name, keep, cfg)
    return tally.summary(model, config)
