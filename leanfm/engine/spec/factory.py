"""Build the runner's SpecDecoder from a SpeculativeConfig: the proposer, and the draft model with its KV cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from leanfm.engine.config import EngineConfig, EngineConfigError
from leanfm.engine.kv.groups import KVGroupSpec, plan_kv_groups
from leanfm.engine.spec.config import SpeculativeConfig
from leanfm.engine.spec.decoder import SpecDecoder
from leanfm.engine.spec.draft import DraftProposer, default_skip_layers, subset_groups
from leanfm.engine.spec.ngram import NgramProposer


def build_spec_decoder(spec: SpeculativeConfig, model: nn.Module, groups: Sequence[KVGroupSpec],
                       config: EngineConfig, max_model_len: int) -> SpecDecoder:
    if spec.method == "ngram":
        return SpecDecoder(NgramProposer(spec.num_speculative_tokens, spec.ngram_min, spec.ngram_max))
    if spec.method == "layer_skip":
        draft, draft_groups = layer_skip_draft(model, groups, config.block_size, spec.skip_layers)
    else:
        draft = load_draft_model(spec.draft_model, model)
        dtype = next(draft.parameters()).dtype
        blocks = max(g.num_blocks for g in groups)  # as many tokens as the target's cache holds
        sizing = dataclasses.replace(config, num_blocks=blocks, kv_memory_bytes=None, speculative=None)
        draft_groups = plan_kv_groups(draft.config, sizing, dtype.itemsize, max_model_len)
    try:
        proposer = DraftProposer(draft, draft_groups, config.block_size, config.max_num_batched_tokens,
                                 spec.draft_vocab)
    except ValueError as e:
        raise EngineConfigError(f"speculative: {e}") from None
    return SpecDecoder(proposer)


def layer_skip_draft(model: nn.Module, groups: Sequence[KVGroupSpec], block_size: int,
                     skip: Sequence[int] | None) -> tuple[nn.Module, tuple[KVGroupSpec, ...]]:
    """The target without the `skip` layers (weights shared) and the KV groups of the layers it keeps."""
    n = model.config.num_hidden_layers
    skip = tuple(skip) if skip is not None else default_skip_layers(n)
    if not skip or any(i >= n for i in skip) or len(set(skip)) >= n:
        raise EngineConfigError(f"speculative: skip_layers {list(skip)} must name some but not all of the "
                                f"model's {n} layers (indices 0..{n - 1})")
    keep = [i for i in range(n) if i not in set(skip)]
    cfg = model.config
    dtype = next(model.parameters()).dtype
    draft = model.layer_subset(keep)
    return draft, subset_groups(groups, keep, cfg.num_key_value_heads, cfg.head_dim, dtype.itemsize, block_size)


def load_draft_model(ref: Any, target: nn.Module) -> nn.Module:
    """The draft model from an alias / path (loaded in the target's dtype), a LoadedModel or a module;
    prepared for inference and checked to share the target's vocabulary."""
    if isinstance(ref, str):
        from leanfm.checkpoint.loader import load_model

        ref = load_model(ref, dtype=next(target.parameters()).dtype, progress=False)
    if hasattr(ref, "model") and hasattr(ref, "tokenizer"):  # a LoadedModel
        from leanfm.engine.runtime import prepare_for_inference

        ref = prepare_for_inference(ref.model)
    if not isinstance(ref, nn.Module) or not hasattr(ref, "compute_logits"):
        raise EngineConfigError(f"speculative: draft_model must be a model reference or a loaded model, got "
                                f"{type(ref).__name__}")
    vd, vt = ref.config.vocab_size, target.config.vocab_size
    if vd != vt:
        raise EngineConfigError(f"speculative: the draft model's vocabulary has {vd} tokens, the target's {vt}; "
                                "a draft needs the target's tokenizer")
    ref.eval()
    ref.requires_grad_(False)
    return ref
