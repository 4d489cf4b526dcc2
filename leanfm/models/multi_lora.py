"""Serving many LoRA adapters over one base model at once: the linear layers' multi-adapter form.

    install_lora(model, 1, {"model.layers.0.self_attn.q_proj": LoraFactors(a, b, 2.0), ...})
    state = lora_state(model)
    state.groups = (RowGroup(1, 0, 5), RowGroup(2, index=rows))   # the engine's runner, once per step
    hidden = model(input_ids, positions, attn_meta)                # each row gets its own adapter's delta
    state.groups = ()
    remove_lora(model, 1)

A targeted layer changes class in place to `MultiLora<Class>` (MultiLoraHost in front of the original
class, which may be nn.Linear, FastLinear, QuantLinear or any other linear form): its forward is the
base forward plus each row's own adapter's delta: all of the layer's adapters stacked side by side and
masked per row (leanfm.ops.lora.stacked_lora_add_; the stack is rebuilt when an adapter is installed or
removed, the step's masks are made once per stack layout and shared by the layers that have it).
The factors are plain attributes, not parameters or buffers: the
state dict, the base weights and the module names stay as they were. A layer that no adapter targets
any more gets its class back (and with it the fused decode kernels, which only take the plain forms).

All host layers of a model share one MultiLoraState (kept in the model's __dict__, so views such as
layer_subset share it too); with no groups set, the model is the base model.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from leanfm.ops.lora import (
    LoraFactors,
    RowGroup,
    StackedLora,
    row_lora_ids,
    rows_mask,
    stack_lora,
    stacked_lora_add_,
)

__all__ = ["LoraFactors", "MultiLoraHost", "MultiLoraState", "RowGroup", "install_lora", "linear_shapes",
           "lora_ids", "lora_state", "remove_lora"]

_STATE = "_multi_lora_state"


class MultiLoraState:
    """The current step's row groups, shared by every host layer of one model, and the step's per-row
    masks (made on first use, dropped when the groups change)."""

    def __init__(self) -> None:
        self._groups: tuple[RowGroup, ...] = ()
        self._row_ids: Tensor | None = None
        self._masks: dict[tuple, Tensor] = {}
        self.last_id = 0  # ids are handed out per model (several engines may share one model)

    @property
    def groups(self) -> tuple[RowGroup, ...]:
        return self._groups

    @groups.setter
    def groups(self, groups: tuple[RowGroup, ...]) -> None:
        self._groups, self._row_ids, self._masks = tuple(groups), None, {}

    def mask(self, stacked: StackedLora, n_rows: int, device) -> Tensor:
        """rows_mask of this step's rows for `stacked` (layers with the same adapters in the same order and
        ranks share one mask: the key is the column layout)."""
        if self._row_ids is None or self._row_ids.shape[0] != n_rows:
            self._row_ids, self._masks = row_lora_ids(self._groups, n_rows, device), {}
        key = stacked.layout
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = rows_mask(self._row_ids, stacked)
        return mask

    def new_id(self) -> int:
        self.last_id += 1
        return self.last_id


class MultiLoraHost:
    """Mixin placed before a linear layer's class: base output + each present adapter's delta on its rows."""

    lora_factors: dict[int, LoraFactors]
    lora_state: MultiLoraState

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.lora_idle():
            return out
        stacked = self.__dict__.get("_lora_stacked")
        if stacked is None:
            stacked = self.__dict__["_lora_stacked"] = stack_lora(self.lora_factors)
        x2, out2 = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        stacked_lora_add_(out2, x2, stacked, self.lora_state.mask(stacked, x2.shape[0], x2.device))
        return out2.view(out.shape)

    def lora_idle(self) -> bool:
        """True when this step adds nothing here (the base forward alone is the output)."""
        return not any(g.lora_id in self.lora_factors for g in self.lora_state.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora_ids={sorted(self.lora_factors)}"


_HOSTS: dict[type, type] = {}


def _host_class(cls: type) -> type:
    if issubclass(cls, MultiLoraHost):
        return cls
    if cls not in _HOSTS:
        _HOSTS[cls] = type(f"MultiLora{cls.__name__}", (MultiLoraHost, cls), {"__module__": __name__})
    return _HOSTS[cls]


def lora_state(model: nn.Module) -> MultiLoraState:
    """The model's shared state (made on first use)."""
    state = model.__dict__.get(_STATE)
    if state is None:
        state = model.__dict__[_STATE] = MultiLoraState()
    return state


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of every linear-like layer (any module with integer
    in_features and out_features: nn.Linear and leanfm's quantized, low-rank, sparse forms)."""
    out = {}
    for name, m in model.named_modules():
        k, n = getattr(m, "in_features", None), getattr(m, "out_features", None)
        if name and isinstance(k, int) and isinstance(n, int):
            out[name] = (n, k)
    return out


def lora_ids(model: nn.Module) -> set[int]:
    """The adapter ids installed on any layer of the model."""
    return {i for m in model.modules() if isinstance(m, MultiLoraHost) for i in m.lora_factors}


def install_lora(model: nn.Module, lora_id: int, factors: Mapping[str, LoraFactors]) -> None:
    """Give adapter `lora_id` its factors on the named layers. Everything is checked before anything
    changes: ValueError when a layer is missing, is not linear, or has another shape than the factors."""
    if not isinstance(lora_id, int) or lora_id < 1:
        raise ValueError(f"lora_id must be a positive integer (0 means no adapter), got {lora_id!r}")
    if lora_id in lora_ids(model):
        raise ValueError(f"adapter id {lora_id} is already installed; remove_lora it first")
    if not factors:
        raise ValueError("an adapter needs factors on at least one layer")
    shapes = linear_shapes(model)
    for name, f in factors.items():
        if name not in shapes:
            raise ValueError(f"the model has no linear layer {name!r}")
        n, k = shapes[name]
        if f.a.shape[1] != k or f.b.shape[0] != n:
            raise ValueError(f"{name}: LoRA factors A {tuple(f.a.shape)}, B {tuple(f.b.shape)} do not fit the "
                             f"layer's {n}x{k} weight")
    state = lora_state(model)
    for name, f in factors.items():
        layer = model.get_submodule(name)
        device = _device(layer)
        if not isinstance(layer, MultiLoraHost):
            layer.__class__ = _host_class(type(layer))
            layer.lora_factors = {}
            layer.lora_state = state
        layer.lora_factors[lora_id] = LoraFactors(f.a.to(device), f.b.to(device), float(f.scaling))
        layer.__dict__.pop("_lora_stacked", None)


def remove_lora(model: nn.Module, lora_id: int) -> None:
    """Drop adapter `lora_id` from every layer; layers left without adapters get their class back."""
    for m in model.modules():
        if isinstance(m, MultiLoraHost) and lora_id in m.lora_factors:
            del m.lora_factors[lora_id]
            m.__dict__.pop("_lora_stacked", None)
            if not m.lora_factors:
                for attr in ("lora_factors", "lora_state", "_lora_stacked"):
                    m.__dict__.pop(attr, None)
                m.__class__ = type(m).__bases__[1]  # MultiLora<X> has bases (MultiLoraHost, X)


def _device(module: nn.Module):
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return t.device if t is not None else "cpu"
