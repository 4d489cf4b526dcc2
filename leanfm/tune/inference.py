"""Running a model with an adapter: what `leanfm generate / chat / eval --adapter DIR` call after loading.

    apply_adapter(loaded.model, "out/lora", for_generation=True)

A mergeable adapter (LoRA, DoRA, IA3, BitFit) is loaded, folded into the weights and dropped, so the
model runs at the base model's speed with its own kernels. Others stay attached: bottleneck adapters
run as extra layers; prompt and prefix tuning need positions in front of the prompt, which the
generation engine's KV cache does not make room for yet, so they are refused for generation (scoring
with attn_meta=None, as perplexity does, works).
"""

from __future__ import annotations

import os

from torch import nn

from leanfm.tune.api import merge_and_unload_
from leanfm.tune.config import AdapterError
from leanfm.tune.peft_format import load_adapter

__all__ = ["apply_adapter"]


def apply_adapter(model: nn.Module, path: str | os.PathLike, *, for_generation: bool = False,
                  merge: bool = True) -> str:
    """Load the adapter at `path` onto `model` (in place); merge it when it can be. Returns what was done."""
    config = load_adapter(model, path, name="default")
    if for_generation and config.level == "model":
        from leanfm.tune.api import delete_adapter

        delete_adapter(model, "default")
        raise AdapterError(f"{path}: {config.method} adapters cannot run in the generation engine yet (its KV cache "
                           "has no room for virtual tokens); use them for scoring (leanfm eval) or from Python")
    if merge and config.mergeable:
        merge_and_unload_(model)
        return f"{config.method} adapter merged into the weights"
    return f"{config.method} adapter attached"
