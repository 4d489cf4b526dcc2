"""leanfm: make foundation models cheap to run and adapt.

`import leanfm` stays light: the public names below are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "leanfm.checkpoint.loader",
    "LoadedModel": "leanfm.checkpoint.loader",
    "Tokenizer": "leanfm.checkpoint.tokenizer",
    "ModelConfig": "leanfm.models.config",
    "build_model": "leanfm.models",
    "Generator": "leanfm.engine.generate",
    "SamplingParams": "leanfm.engine.params",
    "LLM": "leanfm.engine.llm",
    "AsyncLLM": "leanfm.engine.async_llm",
    "EngineConfig": "leanfm.engine.config",
    "RequestOutput": "leanfm.engine.request",
    "LeanfmError": "leanfm.utils.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leanfm' has no attribute {name!r}")
