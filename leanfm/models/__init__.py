"""Model families and the registry that builds one from a ModelConfig."""

from __future__ import annotations

import torch

from leanfm.models.base import DecoderForCausalLM
from leanfm.models.config import FAMILIES, ModelConfig, RopeScaling
from leanfm.models.gemma import GemmaForCausalLM
from leanfm.models.interface import CausalLM, ContiguousKVCache, KVCacheMeta
from leanfm.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3": GemmaForCausalLM,
}
assert set(MODEL_CLASSES) == set(FAMILIES)


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> DecoderForCausalLM:
    """A model with uninitialised (meta) or freshly initialised weights, per `device`."""
    with torch.device(device):
        model = MODEL_CLASSES[config.family](config)
    return model.to(dtype) if device != "meta" else model


__all__ = [
    "CausalLM", "ContiguousKVCache", "DecoderForCausalLM", "KVCacheMeta", "ModelConfig", "RopeScaling",
    "build_model", "MODEL_CLASSES",
]
