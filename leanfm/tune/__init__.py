"""Parameter-efficient fine-tuning: adapters (LoRA, DoRA, QLoRA, IA3, prompt/prefix tuning, bottleneck,
BitFit), a trainer, a memory planner, 8-bit optimizer states, MeZO, PEFT-format files, and data-parallel,
sharded and federated drivers.

    from leanfm.tune import add_adapter, LoraConfig
    add_adapter(model, LoraConfig(r=16))

Names are imported on first use, so `import leanfm.tune` stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    **{n: "leanfm.tune.api" for n in (
        "active_adapter", "adapter_configs", "adapter_parameters", "adapter_state_dict", "add_adapter",
        "delete_adapter", "find_targets", "load_adapter_state_dict", "merge_", "merge_and_unload_",
        "set_adapter", "trainable_parameters", "unmerge_")},
    **{n: "leanfm.tune.methods" for n in (
        "BitFitConfig", "BottleneckConfig", "DoraConfig", "IA3Config", "LoraConfig", "PrefixTuningConfig",
        "PromptTuningConfig", "QLoraConfig")},
    **{n: "leanfm.tune.config" for n in ("AdapterConfig", "AdapterError", "config_from_dict", "method_names")},
    **{n: "leanfm.tune.peft_format" for n in ("load_adapter", "read_adapter_config", "save_adapter")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leanfm.tune' has no attribute {name!r}")
