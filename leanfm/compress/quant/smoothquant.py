"""SmoothQuant W8A8 (Xiao et al. 2023): migrate activation outliers into the weights, then int8 x int8.

Per decoder layer, for each group of linears after an RMSNorm (q/k/v after the attention norm, gate/up
after the MLP norm), a per-input-channel smoothing factor

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (max|W_j| over all the group's weights)

is folded into the norm (1/s, Gemma's (1 + w) form included) and into the linears' columns (s), which
leaves the float model unchanged but flattens the activations' outlier channels. Every targeted linear
then becomes a W8A8Linear: int8 per-row weights, dynamic per-token int8 activations, an exact integer
matmul (leanfm.models.int8_layers). `alpha` is the migration strength (0.5 in the paper; larger moves
more of the difficulty into the weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, MethodConfig, register, set_module
from leanfm.compress.calibrate import CalibrationStep, LayerwiseCalibration
from leanfm.compress.quant.layer_groups import (
    collect_input_stats,
    fold_scales,
    layerwise_targets,
    scale_groups,
)
from leanfm.models.blocks import RMSNorm
from leanfm.models.int8_layers import W8A8Linear

__all__ = ["SmoothQuantConfig", "apply_smoothquant", "smoothquant_scales"]


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    method = "smoothquant"
    needs_calibration = True

    alpha: float = 0.5  # migration strength in [0, 1]

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            self._fail(f"alpha must be in [0, 1], got {self.alpha}; 0.5 is the paper's default")


def smoothquant_scales(act_max: Tensor, weights: Sequence[Tensor], alpha: float) -> Tensor:
    """s [K] = max|X_j|^alpha / max|W_j|^(1 - alpha) for the weights [N_i, K] sharing the input."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _smooth_layer(step: CalibrationStep, configs: dict[str, SmoothQuantConfig]) -> int:
    """Fold SmoothQuant's factors into the layer's norm groups (each with its first targeted member's alpha);
    configs: the targeted linears' (relative names) configs. Returns how many groups were smoothed."""
    layer = step.module
    groups = [g for g in scale_groups(layer)
              if isinstance(layer.get_submodule(g.prev), RMSNorm) and set(configs) & set(g.linears)]
    if not groups:
        return 0
    stats = collect_input_stats(step, [g.linears[0] for g in groups], gram=False)
    for g in groups:
        alpha = configs[next(n for n in g.linears if n in configs)].alpha
        weights = [layer.get_submodule(n).weight for n in g.linears]
        fold_scales(layer, g, smoothquant_scales(stats[g.linears[0]].abs_max, weights, alpha))
    return len(groups)


@register(SmoothQuantConfig)
def apply_smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: CompressContext) -> dict:
    """Smooth and replace every targeted linear by a W8A8Linear, layer by layer on the calibration tokens."""
    targets = {name: (module, cfg) for name, module, cfg in ctx.targets((nn.Linear,))}
    n_layers = len(model.model.layers)
    by_step = layerwise_targets("smoothquant", targets, n_layers)
    tokens = ctx.require_calibration()
    walk = LayerwiseCalibration(model, tokens, include_head=False)
    smoothed = 0
    last = max((i for i in by_step if i < n_layers), default=-1)
    for step in ctx.bar(walk, "smoothquant"):
        names = by_step.get(step.index, [])
        if names:
            smoothed += _smooth_layer(step, {n: targets[f"{step.prefix}.{n}"][1] for n in names})
            for rel in names:
                full = f"{step.prefix}.{rel}"
                set_module(model, full, W8A8Linear.from_linear(targets[full][0]))
        if step.index >= last:
            break
    if "lm_head" in targets:  # no smoothing: a tied head cannot take a column scale
        set_module(model, "lm_head", W8A8Linear.from_linear(targets["lm_head"][0]))
    return {"modules": len(targets), "smoothed_groups": smoothed, "bits_per_weight": 8,
            "calibration_tokens": int(tokens.numel())}
