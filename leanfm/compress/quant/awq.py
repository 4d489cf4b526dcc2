"""AWQ: activation-aware weight quantization (Lin et al. 2023), with its clipping search.

Per decoder layer, for each group of linears sharing an input (leanfm.compress.quant.layer_groups:
q/k/v after the attention norm, gate/up after the MLP norm, down after up_proj, o after v_proj when
the attention has as many KV heads as query heads):

1. Scale search: s = mean|x|^alpha per input channel (normalised by sqrt(max s * min s)), alpha on a
   grid of `n_grid` values in [0, 1); keep the alpha whose fake-quantized group Q(W diag s) diag(1/s)
   has the smallest output error on the calibration inputs. alpha = 0 is plain RTN, so the search
   never does worse than RTN on its objective.
2. Fold: 1/s into the previous op (RMSNorm weight, Gemma's (1 + w) form included, or the previous
   linear's rows), s into the linears' columns. The float model is unchanged.
3. Clipping search (`clip_search`): per output row and group, shrink the quantization range by
   1 - i / n_grid (i < max_shrink * n_grid) to minimise that group's output error. Skipped for q and
   k (their error is seen through the softmax, as llm-awq does).
4. Quantize to QuantLinear.

The output error of a weight change D on inputs X is ||X D^T||^2 = tr(D G D^T), G = X^T X, so every
search runs on the Gram matrix of all calibration tokens (accumulated once, as GPTQ's Hessian) rather
than on a subsample of activations. The LM head, when targeted, gets the clipping search only (a tied
head cannot take a column scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, register, set_module
from leanfm.compress.calibrate import LayerwiseCalibration
from leanfm.compress.quant.layer_groups import (
    InputStats,
    ScaleGroup,
    collect_input_stats,
    fold_scales,
    layerwise_targets,
    scale_groups,
)
from leanfm.compress.quant.rtn import WeightQuantConfig
from leanfm.models.quant_layers import QuantLinear
from leanfm.ops.quant import check_group_size, fake_quantize, quantize_to_codes, scales_zeros_from_range

__all__ = ["AWQConfig", "apply_awq", "awq_clip_ratios", "awq_search_scale", "output_error", "quantize_clipped"]

_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
_ROW_CHUNK = 4096


@dataclass(frozen=True)
class AWQConfig(WeightQuantConfig):
    method = "awq"
    needs_calibration = True

    n_grid: int = 20  # points of the alpha grid and of the clipping grid
    clip_search: bool = True
    max_shrink: float = 0.5  # the clipping search shrinks a group's range by at most this fraction

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_grid < 1:
            self._fail(f"n_grid must be a positive number of grid points, got {self.n_grid}; try 20")
        if not 0 <= self.max_shrink < 1:
            self._fail(f"max_shrink must be in [0, 1), got {self.max_shrink}; try 0.5")


def output_error(delta: Tensor, gram: Tensor) -> Tensor:
    """Summed squared output error tr(D G D^T) of a weight change D [N, K] under G = X^T X [K, K]."""
    return ((delta @ gram) * delta).sum()


def awq_search_scale(w: Tensor, gram: Tensor, x_abs_mean: Tensor, bits: int, group_size: int | None,
                     symmetric: bool, n_grid: int = 20) -> tuple[Tensor, float, list[float]]:
    """Best per-input-channel scale s [K] for w [N, K] (a group's concatenated weights): returns
    (s, alpha, the error of each alpha on the grid)."""
    w, gram = w.float(), gram.float()
    x = x_abs_mean.float()
    best, losses = None, []
    for i in range(n_grid):
        alpha = i / n_grid
        s = x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        delta = fake_quantize(w * s, bits, group_size, symmetric) / s - w
        loss = float(output_error(delta, gram))
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1], losses


def _group_ranges(w: Tensor, ratio: Tensor | float, gs: int) -> tuple[Tensor, Tensor]:
    g = w.reshape(w.shape[0], -1, gs)
    m = g.abs().amax(-1) * ratio
    return torch.maximum(g.amin(-1), -m), torch.minimum(g.amax(-1), m)


def quantize_clipped(w: Tensor, ratio: Tensor | float, bits: int, group_size: int | None, symmetric: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize w [N, K] with each group's range clipped to +-ratio * max|w_group| (ratio [N, G] or a float;
    1.0 is plain RTN) -> (codes, scales, zeros)."""
    w = w.float()
    gs = check_group_size(w.shape[1], group_size)
    wmin, wmax = _group_ranges(w, ratio, gs)
    scales, zeros = scales_zeros_from_range(wmin, wmax, bits, symmetric)
    return quantize_to_codes(w, scales, zeros, bits, gs), scales, zeros


def _group_errors(delta: Tensor, blocks: Tensor) -> Tensor:
    """Per row and group, the squared output error of that group's part: D_g G_gg D_g^T -> [N, G]."""
    n, k = delta.shape
    g, gs = blocks.shape[0], blocks.shape[1]
    d = delta.reshape(n, g, gs)
    return (torch.einsum("ngk,gkl->ngl", d, blocks) * d).sum(-1)


def awq_clip_ratios(w: Tensor, gram: Tensor, bits: int, group_size: int | None, symmetric: bool,
                    n_grid: int = 20, max_shrink: float = 0.5) -> Tensor:
    """Per row and group, the range ratio in {1 - i / n_grid : i < max_shrink * n_grid} whose quantized
    group has the smallest output error on its own inputs -> ratios [N, G]."""
    w = w.float()
    n, k = w.shape
    gs = check_group_size(k, group_size)
    idx = torch.arange(k // gs)
    blocks = gram.float().reshape(k // gs, gs, k // gs, gs)[idx, :, idx, :]  # [G, gs, gs] diagonal blocks
    candidates = [1 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]
    out = torch.empty(n, k // gs)
    for r in range(0, n, _ROW_CHUNK):
        wr = w[r:r + _ROW_CHUNK]
        best_err = best = None
        for ratio in candidates:
            codes, s, z = quantize_clipped(wr, ratio, bits, gs, symmetric)
            deq = ((codes.float().reshape(wr.shape[0], -1, gs) - z[..., None]) * s[..., None]).reshape(wr.shape)
            err = _group_errors(deq - wr, blocks)
            if best is None:
                best_err, best = err, torch.full_like(err, ratio)
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, torch.full_like(best, ratio), best)
        out[r:r + _ROW_CHUNK] = best
    return out


def _search_layer(layer: nn.Module, groups: list[ScaleGroup], stats: dict[str, InputStats],
                  configs: dict[str, AWQConfig]) -> dict[str, Tensor]:
    """Search every group's scale on the unfolded layer, then fold them all; returns rel name -> input scale.
    configs: the targeted linears' (relative names) configs; a group searches with its first member's."""
    found = {}
    for g in groups:
        members = [n for n in g.linears if n in configs]
        cfg = configs[members[0]]
        w = torch.cat([layer.get_submodule(n).weight.detach().float() for n in members])
        st = stats[g.linears[0]]
        s, _, _ = awq_search_scale(w, st.gram, st.abs_mean, cfg.bits, cfg.effective_group, cfg.symmetric,
                                   cfg.n_grid)
        found[g] = s
    input_scale = {}
    for g, s in found.items():
        fold_scales(layer, g, s)
        input_scale.update({n: s for n in g.linears})
    return input_scale


def _quantize_module(model: nn.Module, full: str, rel: str, module: nn.Linear, gram: Tensor, cfg: AWQConfig
                     ) -> QuantLinear:
    w = module.weight.detach()
    ratio = 1.0
    if cfg.clip_search and cfg.max_shrink > 0 and rel not in _NO_CLIP:
        ratio = awq_clip_ratios(w, gram, cfg.bits, cfg.effective_group, cfg.symmetric, cfg.n_grid, cfg.max_shrink)
    new = QuantLinear.from_codes(*quantize_clipped(w, ratio, cfg.bits, cfg.effective_group, cfg.symmetric),
                                 cfg.bits, module.bias)
    set_module(model, full, new)
    return new


@register(AWQConfig)
def apply_awq(model: nn.Module, config: AWQConfig, ctx: CompressContext) -> dict:
    """Scale search + folding + clipping search + quantization, layer by layer on the calibration tokens."""
    targets = {name: (module, cfg) for name, module, cfg in ctx.targets((nn.Linear,))}
    n_layers = len(model.model.layers)
    by_step = layerwise_targets("awq", targets, n_layers)
    tokens = ctx.require_calibration()
    walk = LayerwiseCalibration(model, tokens, include_head=n_layers in by_step)
    bits_total = weights = folded = 0
    last = max(by_step, default=-1)
    for step in ctx.bar(walk, "awq"):
        names = by_step.get(step.index, [])
        if names:
            targeted = set(names)
            groups = [] if step.is_head else [g for g in scale_groups(step.module) if targeted & set(g.linears)]
            needed = sorted(targeted | {n for g in groups for n in g.linears})
            stats = collect_input_stats(step, needed)
            configs = {rel: targets[f"{step.prefix}.{rel}"][1] for rel in names} if groups else {}
            input_scale = _search_layer(step.module, groups, stats, configs) if groups else {}
            folded += len(groups)
            for rel in names:
                full = rel if step.is_head else f"{step.prefix}.{rel}"
                module, cfg = targets[full]
                gram = stats[rel].gram
                if rel in input_scale:  # the inputs are now x / s
                    s = input_scale[rel]
                    gram = gram / (s[:, None] * s[None, :])
                new = _quantize_module(model, full, rel, module, gram, cfg)
                bits_total += new.weight_bits * module.weight.numel()
                weights += module.weight.numel()
            del stats
        if step.index >= last:
            break
    return {"modules": len(targets), "scale_groups": folded,
            "bits_per_weight": round(bits_total / max(weights, 1), 3), "calibration_tokens": int(tokens.numel())}
