"""Running a model with an adapter: what `leanfm generate / chat / eval --adapter DIR` call after loading.

    apply_adapter(loaded.model, "out/lora", for_generation=True)

A mergeable adapter (LoRA, DoRA, IA3, BitFit) is loaded, folded into the weights and dropped, so the
model runs at the base model's speed with its own kernels. Others stay attached: bottleneck adapters
run as extra layers; prompt and prefix tuning run their virtual tokens at KV-cache positions 0..n-1
in front of every prompt, which the generation paths (leanfm.engine's Generator and serving engine)
make room for (leanfm.tune.prompt); the engine refuses them with KV compression or layer-skip drafts.
"""

from __future__ import annotations

import os

from torch import nn

from leanfm.tune.api import merge_and_unload_
from leanfm.tune.peft_format import load_adapter

__all__ = ["apply_adapter"]


def apply_adapter(model: nn.Module, path: str | os.PathLike, *, for_generation: bool = False,
                  merge: bool = True) -> str:
    """Load the adapter at `path` onto `model` (in place); merge it when it can be. Returns what was done.
    `for_generation` is kept for callers; every adapter kind now runs in generation."""
    config = load_adapter(model, path, name="default")
    if merge and config.mergeable:
        merge_and_unload_(model)
        return f"{config.method} adapter merged into the weights"
    return f"{config.method} adapter attached"
