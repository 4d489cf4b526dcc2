"""Module surgery for module-level adapters: a linear layer hosts named branches.

Adding an adapter to a layer changes the layer's class in place to `Adapted<Class>` (AdapterHost in
front of the original class) and gives it an `adapters` ModuleDict. The layer keeps its own parameter
names (`q_proj.weight`), so the base state dict is unchanged; a branch's parameters live under
`q_proj.adapters.<name>.` (e.g. `lora_A.weight`). The host's forward is explicit:

    y = branch.post(x, base_forward(branch.pre(x)))      # the active branch, unless merged

A branch never edits the base except in merge / unmerge, which fold it in and out of the weights.
The numerics are in leanfm.tune.functional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.models.quant_layers import QuantLinear
from leanfm.tune import functional as fn
from leanfm.tune.config import AdapterError

__all__ = ["AdapterHost", "Branch", "attach", "base_weight", "detach", "hosts", "with_mixin"]


def base_weight(layer: nn.Module) -> Tensor:
    """The layer's dense weight (out, in): the parameter itself, or a dequantized copy."""
    if isinstance(layer, QuantLinear):
        return layer.dequantized_weight()
    return layer.weight


class Branch(nn.Module):
    """One adapter on one layer. `pre` may change the input, `post` the output (x is the original input)."""

    mergeable = True

    def pre(self, x: Tensor, layer: nn.Module) -> Tensor:
        return x

    def post(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
        return out

    def merge(self, layer: nn.Module) -> None:
        raise AdapterError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self, layer: nn.Module) -> None:
        raise AdapterError(f"{type(self).__name__} cannot be unmerged")

    def release(self, layer: nn.Module) -> None:
        """Undo any change to the base made at creation (PiSSA); called when the adapter is deleted."""


class AdapterHost:
    """Mixin placed before a linear layer's class: routes forward through the active branch."""

    adapters: nn.ModuleDict
    active_adapter: str | None = None
    merged_adapter: str | None = None

    def active_branch(self) -> Branch | None:
        name = self.active_adapter
        if name is None or name == self.merged_adapter or name not in self.adapters:
            return None
        return self.adapters[name]

    def forward(self, x: Tensor) -> Tensor:
        branch = self.active_branch()
        if branch is None:
            return super().forward(x)
        return branch.post(x, super().forward(branch.pre(x, self)), self)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", active_adapter={self.active_adapter!r}"


_MIXED: dict[tuple[type, type], type] = {}


def with_mixin(mixin: type, cls: type) -> type:
    """The class `Adapted<cls>` with bases (mixin, cls), made once per pair."""
    if issubclass(cls, mixin):
        return cls
    if (mixin, cls) not in _MIXED:
        _MIXED[(mixin, cls)] = type(f"Adapted{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})
    return _MIXED[(mixin, cls)]


def attach(layer: nn.Module, name: str, branch: Branch) -> None:
    """Make `layer` a host (class swap in place) and add `branch` under `name`."""
    if not isinstance(layer, AdapterHost):
        layer.__class__ = with_mixin(AdapterHost, type(layer))
        layer.adapters = nn.ModuleDict()
    layer.adapters[name] = branch


def detach(layer: nn.Module, name: str, restore_base: bool = True) -> None:
    """Remove branch `name`; a layer left with no branch gets its original class back.
    restore_base=False leaves the base weights as they are (merged, or holding a PiSSA residual)."""
    if layer.merged_adapter == name:
        if restore_base:
            layer.adapters[name].unmerge(layer)
        layer.merged_adapter = None
    if restore_base:
        layer.adapters[name].release(layer)
    del layer.adapters[name]
    if layer.active_adapter == name:
        layer.active_adapter = None
    if not len(layer.adapters):
        del layer.adapters
        for attr in ("active_adapter", "merged_adapter"):
            layer.__dict__.pop(attr, None)
        layer.__class__ = type(layer).__bases__[1]  # Adapted<X> has bases (AdapterHost, X)


def hosts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterHost)]


# --- branches ----------------------------------------------------------------------------------------
def _features(layer: nn.Module) -> tuple[int, int]:
    return layer.in_features, layer.out_features


class LoraBranch(Branch):
    """y += s * B(A(dropout(x))). init: "default" (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r),
    B = 0) or "pissa" (principal singular vectors; the base keeps the residual)."""

    def __init__(self, layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default"):
        super().__init__()
        k, n = _features(layer)
        self.r, self.scaling, self.init = r, fn.lora_scaling(r, alpha, rslora), init
        self.lora_A = nn.Linear(k, r, bias=False)
        self.lora_B = nn.Linear(r, n, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_factors(layer)

    @torch.no_grad()
    def _init_factors(self, layer: nn.Module) -> None:
        nn.init.zeros_(self.lora_B.weight)
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        elif self.init == "pissa":
            a, b = fn.pissa_factors(layer.weight, self.r, self.scaling)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            self.register_buffer("init_A", a.clone(), persistent=False)  # to restore the base and to
            self.register_buffer("init_B", b.clone(), persistent=False)  # export as plain LoRA
            layer.weight.sub_(self.delta().to(layer.weight.dtype))
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))

    def delta(self) -> Tensor:
        return fn.lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def lora_out(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))

    def post(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
        return out + (self.lora_out(x) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self, layer: nn.Module) -> None:
        _dense_only(layer, "merge")
        layer.weight.add_(self.delta().to(layer.weight.dtype))

    @torch.no_grad()
    def unmerge(self, layer: nn.Module) -> None:
        layer.weight.sub_(self.delta().to(layer.weight.dtype))

    @torch.no_grad()
    def release(self, layer: nn.Module) -> None:
        if self.init == "pissa":
            layer.weight.add_(fn.lora_delta(self.init_A, self.init_B, self.scaling).to(layer.weight.dtype))


def _dense_only(layer: nn.Module, what: str) -> None:
    if isinstance(layer, QuantLinear):
        raise AdapterError(f"cannot {what} an adapter into a quantized base layer (its weights are packed "
                           "integers); load the float base model, add the adapter there, then merge")


class DoraBranch(LoraBranch):
    """DoRA: LoRA on the direction, a trained magnitude per output row (Liu et al. 2024)."""

    def __init__(self, layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "default"):
        super().__init__(layer, r, alpha, dropout, rslora, init)
        self.magnitude = nn.Parameter(fn.dora_magnitude(base_weight(layer).detach(), self.delta()))

    def post(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
        w = base_weight(layer).detach()
        scale = fn.dora_scale(self.magnitude, w, self.delta())
        xd = self.dropout(x)
        if xd is x:
            base = out if getattr(layer, "bias", None) is None else out - layer.bias
        else:  # the base term must see the same dropped-out input as the LoRA term
            base = F.linear(xd, w.to(xd.dtype))
        return out + fn.dora_output(base.float(), self.lora_out(x).float(), scale, self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self, layer: nn.Module) -> None:
        _dense_only(layer, "merge")
        delta = self.delta()
        self._merge_scale = fn.dora_scale(self.magnitude, layer.weight, delta)
        merged = self._merge_scale[:, None] * (layer.weight.float() + delta)
        layer.weight.copy_(merged.to(layer.weight.dtype))

    @torch.no_grad()
    def unmerge(self, layer: nn.Module) -> None:
        w = layer.weight.float() / self._merge_scale[:, None] - self.delta()
        layer.weight.copy_(w.to(layer.weight.dtype))


class IA3Branch(Branch):
    """(IA)^3: a learned vector rescales the layer's output (attention) or its input (feed-forward)."""

    def __init__(self, layer: nn.Module, feedforward: bool):
        super().__init__()
        k, n = _features(layer)
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones(k if feedforward else n))

    def pre(self, x: Tensor, layer: nn.Module) -> Tensor:
        return x * self.ia3_l.to(x.dtype) if self.feedforward else x

    def post(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
        return out if self.feedforward else out * self.ia3_l.to(out.dtype)

    @torch.no_grad()
    def _scale(self, layer: nn.Module, power: int) -> None:
        _dense_only(layer, "merge")
        l = self.ia3_l.float() ** power  # noqa: E741
        w = layer.weight.float() * (l[None, :] if self.feedforward else l[:, None])
        layer.weight.copy_(w.to(layer.weight.dtype))
        if not self.feedforward and layer.bias is not None:
            layer.bias.copy_((layer.bias.float() * l).to(layer.bias.dtype))

    def merge(self, layer: nn.Module) -> None:
        self._scale(layer, 1)

    def unmerge(self, layer: nn.Module) -> None:
        self._scale(layer, -1)


_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckBranch(Branch):
    """A bottleneck adapter on the layer's output: y + up(act(down(y))), up zero-initialised (Houlsby-style,
    placed after the attention output and FFN down projections by default). Not mergeable."""

    mergeable = False

    def __init__(self, layer: nn.Module, size: int, activation: str = "relu"):
        super().__init__()
        n = layer.out_features
        self.down = nn.Linear(n, size)
        self.act = _ACTS[activation]()
        self.up = nn.Linear(size, n)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def post(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
        h = out.to(self.down.weight.dtype)
        return out + self.up(self.act(self.down(h))).to(out.dtype)


class BiasBranch(Branch):
    """BitFit: a trained bias on each targeted layer (zero at init; a layer without a bias gets one)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(layer.out_features))

    def post(self, x: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
        return out + self.bias.to(out.dtype)

    @torch.no_grad()
    def merge(self, layer: nn.Module) -> None:
        _dense_only(layer, "merge")
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(self.bias, dtype=layer.weight.dtype), requires_grad=False)
            self._created_bias = True
        layer.bias.add_(self.bias.to(layer.bias.dtype))

    @torch.no_grad()
    def unmerge(self, layer: nn.Module) -> None:
        if getattr(self, "_created_bias", False):
            layer.bias = None
            self._created_bias = False
        else:
            layer.bias.sub_(self.bias.to(layer.bias.dtype))
