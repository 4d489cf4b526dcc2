"""ShortGPT (Men et al. 2024): remove the decoder layers that change the hidden states least.

Block Influence of layer i on the calibration tokens: BI_i = 1 - mean_t cos(h_in_t, h_out_t), where
h_in / h_out are the hidden states entering and leaving the layer. The `n_layers` (or round(fraction *
layers)) layers of lowest BI among those the step selects (include / exclude / overrides on
"model.layers.<i>") are removed with DecoderForCausalLM.remove_layers, so the model stays a plain,
smaller model: fewer layers in the config, a smaller KV cache, faster decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, ConfigError, MethodConfig, register

__all__ = ["ShortGPTConfig", "apply_shortgpt", "block_influence", "lowest_influence"]


@dataclass(frozen=True)
class ShortGPTConfig(MethodConfig):
    """Give exactly one of n_layers (how many layers to remove) or fraction (of all layers, rounded)."""

    method = "shortgpt"
    needs_calibration = True

    n_layers: int | None = None
    fraction: float | None = None
    batch_size: int = 4  # calibration samples per forward pass

    def __post_init__(self) -> None:
        if (self.n_layers is None) == (self.fraction is None):
            self._fail("give exactly one of n_layers (layers to remove) or fraction (of all layers)")
        if self.n_layers is not None and (isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int)
                                          or self.n_layers < 1):
            self._fail(f"n_layers must be a positive integer, got {self.n_layers!r}")
        if self.fraction is not None and (not isinstance(self.fraction, int | float) or not 0 < self.fraction < 1):
            self._fail(f"fraction must be in (0, 1), got {self.fraction!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            self._fail(f"batch_size must be a positive integer, got {self.batch_size!r}")

    def count(self, total: int) -> int:
        return self.n_layers if self.n_layers is not None else round(self.fraction * total)


def block_influence(h_in: Tensor, h_out: Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(h_in, h_out), number of tokens) for hidden states (..., hidden)."""
    cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return float((1.0 - cos).sum()), cos.numel()


@torch.no_grad()
def layer_influences(model: nn.Module, tokens: Tensor, batch_size: int = 4) -> list[float]:
    """BI of every decoder layer of `model` over the calibration tokens (n, seq)."""
    layers = model.model.layers
    sums, counts = [0.0] * len(layers), [0] * len(layers)

    def hook(i: int):
        def fn(_module, args, output):
            s, c = block_influence(args[0], output)
            sums[i] += s
            counts[i] += c
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for batch in tokens.split(batch_size):
            model(batch, torch.arange(batch.shape[1]))
    finally:
        for h in handles:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def lowest_influence(influence: list[float], candidates: list[int], count: int) -> list[int]:
    """The `count` candidates of lowest influence (ties: the lower index), sorted."""
    order = sorted(candidates, key=lambda i: (influence[i], i))
    return sorted(order[:count])


@register(ShortGPTConfig)
def apply_shortgpt(model: nn.Module, config: ShortGPTConfig, ctx: CompressContext) -> dict:
    tokens = ctx.require_calibration()
    layers = model.model.layers
    total = len(layers)
    candidates = [i for i, layer in enumerate(layers)
                  if ctx.selected(f"model.layers.{i}", layer) and ctx.config_for(f"model.layers.{i}") is not None]
    count = config.count(total)
    if count >= total or count > len(candidates):
        raise ConfigError(f"shortgpt: cannot remove {count} of {total} layers ({len(candidates)} selectable); "
                          "lower n_layers / fraction or widen the include patterns")
    influence = layer_influences(model, tokens, config.batch_size)
    removed = lowest_influence(influence, candidates, count) if count else []
    if removed:
        model.remove_layers(removed)
    return {"removed_layers": removed, "num_hidden_layers": len(model.model.layers),
            "block_influence": [round(b, 6) for b in influence]}
