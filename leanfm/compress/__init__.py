"""Model compression: quantization, pruning, low-rank factorization and distillation as composable recipes.

    from leanfm.compress import compress_, Recipe, Step, config_from_dict
    report = compress_(model, config_from_dict({"method": "gptq", "bits": 4}), calibration=tokens)

Every method is a config + handler registered in leanfm.compress.api (one method per file under
quant/, prune/, lowrank/, distill/); leanfm.compress.methods lists them.
"""

from leanfm.compress.api import (
    CompressContext,
    CompressReport,
    ConfigError,
    MethodConfig,
    Override,
    Recipe,
    Step,
    compress_,
    config_from_dict,
    method_names,
    register,
)

__all__ = [
    "CompressContext", "CompressReport", "ConfigError", "MethodConfig", "Override", "Recipe", "Step",
    "compress_", "config_from_dict", "method_names", "register",
]


def __getattr__(name: str):
    """Method configs by class name (`from leanfm.compress import GPTQConfig`), loaded on first use."""
    from leanfm.compress.api import _REGISTRY, _load_methods

    if name.endswith("Config"):
        _load_methods()
        for cls, _ in _REGISTRY.values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module 'leanfm.compress' has no attribute {name!r}")
