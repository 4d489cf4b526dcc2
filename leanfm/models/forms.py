"""Module forms: the layer types a compressed model may contain, and how a saved artifact names them.

Every compressed layer type (QuantLinear, LowRankLinear, W8A8Linear...) registers here under a short
name and implements two methods, so that an artifact can say what each module is and be rebuilt
without any compress code:

    spec = module.form_spec()           # {"form": "quant_linear", "bits": 4, ...}: JSON-able, shapes included
    empty = FORMS[spec["form"]].from_form_spec(spec, dtype)   # same structure, uninitialised tensors

A plain nn.Linear whose shape differs from the base config (channel pruning) uses the form "linear".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FORMS", "form_spec", "module_from_spec", "register_form"]

FORMS: dict[str, type[nn.Module]] = {}


def register_form(name: str):
    """Class decorator: register a module form under `name` (sets cls.form = name)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        cls.form = name
        FORMS[name] = cls
        return cls

    return deco


def form_spec(module: nn.Module) -> dict[str, Any] | None:
    """The module's spec if it is a registered form, {"form": "linear", ...} for nn.Linear, else None."""
    fn = getattr(module, "form_spec", None)
    if fn is not None:
        return fn()
    if isinstance(module, nn.Linear):
        return {"form": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return None


def module_from_spec(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """An uninitialised module (meta tensors) of the form and shapes `spec` describes."""
    _load_forms()
    form = spec.get("form")
    if form == "linear":
        with torch.device("meta"):
            return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype)
    if form not in FORMS:
        raise KeyError(f"unknown module form {form!r}; known: {['linear', *sorted(FORMS)]}")
    return FORMS[form].from_form_spec(spec, dtype)


FORM_MODULES = ("leanfm.models.quant_layers", "leanfm.models.int8_layers", "leanfm.models.lowrank_layers",
                "leanfm.models.sparse_layers")


def _load_forms() -> None:
    """Import the modules that define forms (each registers its classes on import)."""
    import importlib

    for name in FORM_MODULES:
        importlib.import_module(name)
