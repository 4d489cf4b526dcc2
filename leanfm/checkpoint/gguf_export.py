"""Export any leanfm model (float, or a compressed artifact) as a dense float model or a GGUF llama.cpp runs.

    state, config = dense_state_dict(model)            # every module form dequantized to float weights
    dense = dense_model(model)                          # a plain DecoderForCausalLM (e.g. to save as HF)
    export_gguf(model, tokenizer, "out.gguf", "Q8_0")   # F32 | F16 | Q8_0 | Q4_0 (gguf_writer)

Module forms give their dense weight through `dequantized_weight()` or `dense_weight()` (QuantLinear,
W8A8Linear, LowRankLinear, SparseLinear...), a float `weight`, or, failing those, by probing the layer
with the identity matrix (exact for any linear map). Layer removal is already in the config; FFN-channel
and head pruning are written as the model's real widths when every layer has the same ones (a GGUF
holds one width per model), and refused otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leanfm.checkpoint.gguf_names import FAMILY_ARCH
from leanfm.models.config import ModelConfig
from leanfm.utils.errors import CheckpointError

GGUF_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@torch.no_grad()
def dense_weight(module: nn.Module) -> Tensor:
    """The float [out, in] weight a linear-like module (or [num, dim] table an embedding) applies."""
    for attr in ("dequantized_weight", "dense_weight"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn().float()
    w = getattr(module, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2 and w.is_floating_point():
        return w.detach().float()
    n_in = getattr(module, "in_features", None)
    if n_in is None:
        raise CheckpointError(f"cannot recover a dense weight from {type(module).__name__}; it has no "
                              "dequantized_weight(), dense_weight() or in_features")
    eye = torch.eye(n_in, dtype=torch.float32)
    y = module(eye).float() - module(torch.zeros(1, n_in)).float()  # x W^T + b - b
    return y.T.contiguous()


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """HF-named float32 tensors of `model` with every module form replaced by its dense weight (and bias)."""
    state: dict[str, Tensor] = {}
    forms: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") for f in forms):
            continue
        if hasattr(module, "form_spec"):
            forms.append(name)
            state[f"{name}.weight"] = dense_weight(module)
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                state[f"{name}.bias"] = bias.detach().float()
            continue
        for pname, p in module.named_parameters(recurse=False):
            state[f"{name}.{pname}" if name else pname] = p.detach().float()
    if getattr(model.config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _uniform(values: list[int], what: str) -> int:
    if len(set(values)) != 1:
        raise CheckpointError(f"layers have different {what} ({sorted(set(values))}); a dense export holds one "
                              f"value per model: prune every layer alike to export it")
    return values[0]


def dense_config(config: ModelConfig, state: dict[str, Tensor]) -> ModelConfig:
    """The config whose shapes match `state` (pruned FFN widths and head counts, when uniform)."""
    n, d = config.num_hidden_layers, config.head_dim
    rows = {key: [state[f"model.layers.{i}.{key}.weight"].shape[0] for i in range(n)]
            for key in ("mlp.gate_proj", "self_attn.q_proj", "self_attn.k_proj")}
    return config.replace(intermediate_size=_uniform(rows["mlp.gate_proj"], "FFN widths"),
                          num_attention_heads=_uniform(rows["self_attn.q_proj"], "query widths") // d,
                          num_key_value_heads=_uniform(rows["self_attn.k_proj"], "key/value widths") // d)


def dense_model(model: nn.Module) -> nn.Module:
    """A plain float model (fp32) equal to `model` up to its compression: no module forms left."""
    from leanfm.checkpoint.loader import model_from_state_dict

    state = dense_state_dict(model)
    return model_from_state_dict(dense_config(model.config, state), state).eval()


def export_gguf(model: nn.Module, tokenizer: Any, path: str | os.PathLike, qtype: str = "F16",
                source_gguf: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a GGUF of `qtype` with its tokenizer, atomically.

    source_gguf: the GGUF the model was read from; its tokenizer metadata is copied verbatim (otherwise it
    is rebuilt from `tokenizer`, see gguf_vocab).
    """
    from leanfm.checkpoint.gguf_vocab import gguf_tokenizer_fields, tokenizer_fields_from_gguf
    from leanfm.checkpoint.gguf_writer import write_gguf

    qtype = GGUF_TYPES.get(qtype.lower(), qtype)
    if qtype not in GGUF_TYPES.values():
        raise CheckpointError(f"unknown GGUF type {qtype!r}; use one of {', '.join(GGUF_TYPES)}")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; choose another path or pass overwrite=True (--overwrite)")
    if model.config.family not in FAMILY_ARCH:
        raise CheckpointError(f"GGUF export does not support family {model.config.family!r}")
    state = dense_state_dict(model)
    config = dense_config(model.config, state)
    if source_gguf is not None:
        fields = tokenizer_fields_from_gguf(source_gguf)
    elif tokenizer is not None:
        fields = gguf_tokenizer_fields(tokenizer, FAMILY_ARCH[config.family], config.vocab_size)
    else:
        fields = {}
    return write_gguf(out, config, state, tokenizer_fields=fields, qtype=qtype)
