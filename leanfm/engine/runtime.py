"""Put a loaded model in its fastest inference form on this machine."""

from __future__ import annotations

import os

from torch import nn


def prepare_for_inference(model: nn.Module, fast_kernels: bool | None = None) -> nn.Module:
    """eval mode, no grads, leanfm's CPU GEMV kernels on every plain Linear and the fused decode paths
    of the blocks (leanfm.models.fusion.use_fused), unless disabled.

    Compressed module forms (QuantLinear, LowRankLinear, ...: leanfm.models.forms) are left as they
    are: they run their own kernels. Plain linears inside them (low-rank factors) are not nn.Linear.

    `fast_kernels=None` follows $LEANFM_KERNELS (on unless "0"). The kernels fall back to
    torch.nn.functional.linear whenever they do not apply, so this never changes results beyond
    float rounding.
    """
    model.eval()
    model.requires_grad_(False)
    if fast_kernels is None:
        fast_kernels = os.environ.get("LEANFM_KERNELS", "1") != "0"
    if fast_kernels:
        from leanfm.models.fusion import use_fused
        from leanfm.models.layers import use_fast_linear

        use_fast_linear(model)
        use_fused(model)
    return model
