"""Imports every built-in method module so that each registers its config and handler."""

from __future__ import annotations

import importlib

METHOD_MODULES = (
    "leanfm.compress.distill.kd",
    "leanfm.compress.lowrank.svd",
    "leanfm.compress.lowrank.asvd",
    "leanfm.compress.quant.rtn",
    "leanfm.compress.quant.gptq",
    "leanfm.compress.prune.magnitude",
    "leanfm.compress.prune.wanda",
    "leanfm.compress.prune.sparsegpt",
    "leanfm.compress.prune.shortgpt",
    "leanfm.compress.prune.channels",
    "leanfm.compress.quant.awq",
    "leanfm.compress.quant.llm_int8",
    "leanfm.compress.quant.smoothquant",
)

for _name in METHOD_MODULES:
    importlib.import_module(_name)
