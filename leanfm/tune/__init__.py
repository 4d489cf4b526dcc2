"""Parameter-efficient fine-tuning: adapters (LoRA, DoRA, QLoRA, IA3, prompt/prefix tuning, bottleneck,
BitFit), a trainer, a memory planner, 8-bit optimizer states, MeZO, PEFT-format files, and data-parallel,
sharded and federated drivers.

    from leanfm.tune import add_adapter, LoraConfig, TrainConfig, train, save_adapter
    add_adapter(model, LoraConfig(r=16))
    train(model, train_examples, held_out, TrainConfig(steps=100), pad_id=0)
    save_adapter(model, "out/lora")        # PEFT layout: loads with peft on the transformers model

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
    **{n: "leanfm.tune.trainer" for n in ("TrainConfig", "TrainResult", "evaluate", "train")},
    **{n: "leanfm.tune.memory" for n in ("MemoryPlan", "peak_rss_bytes", "plan_memory")},
    **{n: "leanfm.tune.optim" for n in ("AdamW8bit", "MeZO")},
    "apply_adapter": "leanfm.tune.inference",
    **{n: "leanfm.tune.federated" for n in ("FedConfig", "federated_finetune", "non_iid_split")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leanfm.tune' has no attribute {name!r}")
