"""What the calibrated quantizers (GPTQ, AWQ, SmoothQuant) know about a decoder layer's structure.

* Input statistics per linear (`collect_input_stats`): the Gram matrix X^T X (GPTQ's Hessian / 2n,
  AWQ's output-error metric), the mean and the max of |x| per input channel. Linears that read the
  same tensor (q/k/v; gate/up) share one accumulator, so the Gram is computed once per distinct input.
* Scale groups (`scale_groups`): the linears that share an input and the op producing it, into which
  a per-input-channel scale can be folded without changing the float model (AWQ, SmoothQuant):

      y = W (x)  ==  (W diag(s)) (x / s)      with x / s produced by the previous op:
      RMSNorm            w' = w / s                (Gemma's x * (1 + w):  w' = (1 + w) / s - 1)
      v_proj -> o_proj   v rows / s   (only when num_heads == num_kv_heads: o's input channels are v's outputs)
      up_proj -> down    up rows / s  (down's input is act(gate) * up, linear in up's output)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import ConfigError
from leanfm.compress.calibrate import CalibrationStep
from leanfm.models.blocks import RMSNorm

__all__ = ["SHARED_INPUTS", "InputStats", "ScaleGroup", "collect_input_stats", "fold_scales", "scale_groups",
           "layerwise_targets", "targets_by_step"]

# linears of one layer that receive the very same input tensor (relative names)
SHARED_INPUTS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


class InputStats:
    """Running statistics of the rows x (tokens, K) fed to a linear. gram: sum of x^T x (fp32)."""

    def __init__(self, k: int, gram: bool = True):
        self.n = 0
        self.gram = torch.zeros(k, k) if gram else None
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.abs_max = torch.zeros(k)

    def add(self, x: Tensor) -> None:
        x = x.detach().float()
        self.n += x.shape[0]
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        a = x.abs()
        self.abs_sum += a.sum(0, dtype=torch.float64)
        torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)

    @property
    def abs_mean(self) -> Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def hessian(self) -> Tensor:
        """GPTQ's H = 2/n sum x^T x."""
        return self.gram * (2.0 / max(self.n, 1))


def collect_input_stats(step: CalibrationStep, names: Iterable[str], gram: bool = True) -> dict[str, InputStats]:
    """Feed the calibration samples through `step` and return input statistics for each relative name
    (names sharing an input, see SHARED_INPUTS, map to the same object)."""
    names = list(names)
    owner = {n: n for n in names}
    for group in SHARED_INPUTS:
        members = [n for n in group if n in owner]
        for n in members[1:]:
            owner[n] = members[0]
    module = step.module
    stats = {n: InputStats(module.get_submodule(n).in_features, gram) for n in set(owner.values())}
    step.feed({n: s.add for n, s in stats.items()})
    return {n: stats[owner[n]] for n in names}


def targets_by_step(targets: Iterable[str], n_layers: int) -> tuple[dict[int, list[str]], list[str]]:
    """Split full module names into {layer index: [relative names]} (lm_head under index n_layers) and
    the names that belong to neither (which a layerwise method cannot calibrate)."""
    by_step: dict[int, list[str]] = {}
    other = []
    for name in targets:
        parts = name.split(".")
        if name == "lm_head":
            by_step.setdefault(n_layers, []).append("lm_head")
        elif len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            by_step.setdefault(int(parts[2]), []).append(".".join(parts[3:]))
        else:
            other.append(name)
    return by_step, other


def layerwise_targets(method: str, targets: Iterable[str], n_layers: int) -> dict[int, list[str]]:
    """`targets_by_step` for a layerwise-calibrated method: any target outside the decoder layers and the
    LM head is a ConfigError naming the method, raised before any work starts."""
    by_step, other = targets_by_step(targets, n_layers)
    if other:
        raise ConfigError(f"{method}: cannot calibrate {other[:3]} (only decoder-layer linears and lm_head); "
                          "narrow the step's include patterns")
    return by_step


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (relative names) sharing one input, produced by `prev` (an RMSNorm or a linear)."""

    prev: str
    linears: tuple[str, ...]


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The foldable groups of a decoder layer, in forward order (AWQ's order); groups whose modules are
    missing, or are not plain float nn.Linear / RMSNorm (e.g. quantized by an earlier step), are left out."""
    mlp_norm = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") \
        else "post_attention_layernorm"
    groups = [ScaleGroup("input_layernorm", SHARED_INPUTS[0])]
    attn = getattr(layer, "self_attn", None)
    if attn is not None and getattr(attn, "n_heads", None) == getattr(attn, "n_kv", -1):
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    groups += [ScaleGroup(mlp_norm, SHARED_INPUTS[1]), ScaleGroup("mlp.up_proj", ("mlp.down_proj",))]
    return [g for g in groups if _foldable(layer, g)]


def _foldable(layer: nn.Module, group: ScaleGroup) -> bool:
    try:
        prev = layer.get_submodule(group.prev)
        linears = [layer.get_submodule(n) for n in group.linears]
    except AttributeError:
        return False
    plain = all(type(m) is nn.Linear for m in linears)
    return plain and (isinstance(prev, RMSNorm) or type(prev) is nn.Linear)


@torch.no_grad()
def fold_scales(layer: nn.Module, group: ScaleGroup, s: Tensor) -> None:
    """Divide the group's input channels by s (in the previous op) and multiply the linears' columns by s:
    the float layer computes the same function (up to rounding)."""
    s = s.detach().double()
    prev = layer.get_submodule(group.prev)
    if isinstance(prev, RMSNorm):
        w = prev.weight.double()
        new = (1.0 + w) / s - 1.0 if prev.offset else w / s
        prev.weight.copy_(new.to(prev.weight.dtype))
    else:
        prev.weight.copy_((prev.weight.double() / s[:, None]).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.copy_((prev.bias.double() / s).to(prev.bias.dtype))
    for name in group.linears:
        lin = layer.get_submodule(name)
        lin.weight.copy_((lin.weight.double() * s[None, :]).to(lin.weight.dtype))
