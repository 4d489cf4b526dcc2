"""Module forms of linear layers shared by every model family.

FastLinear: an nn.Linear whose forward runs leanfm's C++ skinny-GEMM kernels in the decode regime
(few rows, no autograd) and F.linear otherwise. Same parameters, same state-dict names, so a model
can be switched in place after loading and switched back before saving or training:

    n = use_fast_linear(model)     # every plain nn.Linear -> FastLinear, returns how many
    use_plain_linear(model)        # and back
"""

from __future__ import annotations

from torch import Tensor, nn

from leanfm.ops.kernels import linear as _fast_linear


class FastLinear(nn.Linear):
    """nn.Linear computed by leanfm.ops.kernels.linear (falls back to F.linear when grad is needed)."""

    def forward(self, x: Tensor) -> Tensor:
        return _fast_linear(x, self.weight, self.bias)


def _swap(model: nn.Module, src: type[nn.Module], dst: type[nn.Module]) -> int:
    n = 0
    for module in model.modules():
        if type(module) is src:  # exact type: subclasses (quantized, LoRA...) keep their forward
            module.__class__ = dst
            n += 1
    return n


def use_fast_linear(model: nn.Module) -> int:
    """Switch every plain nn.Linear in `model` (itself included) to FastLinear in place; returns the count."""
    return _swap(model, nn.Linear, FastLinear)


def use_plain_linear(model: nn.Module) -> int:
    """Undo use_fast_linear: every FastLinear back to nn.Linear in place; returns the count."""
    return _swap(model, FastLinear, nn.Linear)


__all__ = ["FastLinear", "use_fast_linear", "use_plain_linear"]
