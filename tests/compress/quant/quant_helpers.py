"""Helpers shared by the quantization method tests (imported by basename: pytest puts this directory on
sys.path in its prepend import mode)."""

from __future__ import annotations

import torch
from torch import nn

from leanfm.compress.api import set_module
from leanfm.models.forms import module_from_spec


def calib_tokens(n: int = 8, t: int = 32, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def with_outliers(model: nn.Module, value: float = 40.0) -> nn.Module:
    """Activation outliers like a trained LLM's: 3 hidden channels whose pre-attention / pre-MLP norm
    weights are `value` (Gemma's (1 + w) norms: about value + 1)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
                norm = getattr(layer, name, None)
                if norm is not None:
                    norm.weight[:3] = value
    return model


def rebuild(fresh: nn.Module, compressed: nn.Module) -> nn.Module:
    """`fresh` (an uncompressed model of the same config) given the compressed model's module forms
    (uninitialised, from their specs) and loaded from its state dict with assign=True."""
    for name, m in compressed.named_modules():
        if hasattr(m, "form_spec") and name.startswith("model.layers."):
            set_module(fresh, name, module_from_spec(m.form_spec(), torch.float32))
    fresh.load_state_dict(compressed.state_dict(), assign=True)
    return fresh
