"""Write a ModelConfig + HF-named state dict as a GGUF file llama.cpp (and gguf_reader) can load.

The inverse of gguf_reader: names through gguf_names, q/k rows permuted for arch `llama`, Gemma norm
weights stored as (w + 1), Llama-3 RoPE scaling as a `rope_freqs` tensor. Matrices are stored as
`qtype`; vectors (norms, biases) always as F32, as convert_hf_to_gguf does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanfm.checkpoint import gguf_names as N
from leanfm.models.config import ModelConfig
from leanfm.utils.errors import CheckpointError

QTYPES = ("F32", "F16", "Q8_0", "Q4_0")
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}  # llama.cpp's LlamaFileType
_GLOBAL_INVERSE = {hf: g for g, hf in N.GLOBAL_NAMES.items()}
_BLOCK_INVERSE = {arch: {hf: g for g, hf in t.items()} for arch, t in N.BLOCK_NAMES.items()}


def gguf_tensor_name(hf_name: str, arch: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (KeyError if unknown)."""
    base, _, suffix = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, idx, rest = base.split(".", 3)
        return f"blk.{int(idx)}.{_BLOCK_INVERSE[arch][rest]}.{suffix}"
    return f"{_GLOBAL_INVERSE[base]}.{suffix}"


def _metadata(c: ModelConfig, arch: str) -> dict[str, Any]:
    m: dict[str, Any] = {
        "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "rope.freq_base": float(c.rope_theta),
        "rope.dimension_count": c.head_dim, "vocab_size": c.vocab_size,
    }
    if c.rope_scaling is not None and c.rope_scaling.rope_type == "linear":
        m.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(c.rope_scaling.factor)})
    if c.rope_scaling is not None and c.rope_scaling.rope_type == "llama3":
        m["rope.scaling.original_context_length"] = c.rope_scaling.original_max_position_embeddings
    if c.is_gemma:
        m.update(_gemma_metadata(c, arch))
    out = {f"{arch}.{k}": v for k, v in m.items() if v is not None}
    out["general.name"] = c.name
    eos = dict(zip(("eos", "eot", "eom"), c.eos_token_id, strict=False))  # llama.cpp: 3 end ids
    if len(c.eos_token_id) > 3:
        raise CheckpointError(f"GGUF holds at most 3 eos ids, config has {c.eos_token_id}; drop some")
    for key, v in {"bos": c.bos_token_id, **eos, "padding": c.pad_token_id}.items():
        if v is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(v)
    return out


def _gemma_metadata(c: ModelConfig, arch: str) -> dict[str, Any]:
    big = c.num_hidden_layers == N.GEMMA_27B_LAYERS[arch]
    if c.query_pre_attn_scalar not in (None, c.hidden_size // c.num_attention_heads if big else c.head_dim):
        raise CheckpointError(f"query_pre_attn_scalar {c.query_pre_attn_scalar} cannot be expressed in GGUF "
                              "(llama.cpp derives it from head_dim); use head_dim")
    p = N.GEMMA3_SLIDING_PATTERN if arch == "gemma3" else N.GEMMA2_SLIDING_PATTERN
    default = tuple("full_attention" if (i + 1) % p == 0 else "sliding_attention"
                    for i in range(c.num_hidden_layers))
    m: dict[str, Any] = {"attention.sliding_window": c.sliding_window}
    if c.layer_types != default:
        m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]
    if arch == "gemma2":
        m.update(attn_logit_softcapping=c.attn_logit_softcapping,
                 final_logit_softcapping=c.final_logit_softcapping)
    elif c.rope_local_base_freq not in (None, N.GEMMA3_LOCAL_ROPE_BASE):
        m["rope.freq_base_swa"] = float(c.rope_local_base_freq)
    return m


def _llama3_rope_freqs(c: ModelConfig) -> np.ndarray:
    """convert_hf_to_gguf's per-frequency divisors for Llama-3 RoPE scaling."""
    from leanfm.ops.rope import rope_inv_freq

    rs = c.rope_scaling
    plain = rope_inv_freq(c.head_dim, c.rope_theta).double()
    scaled = rope_inv_freq(c.head_dim, c.rope_theta, scaling_type="llama3", factor=rs.factor,
                           low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                           original_max_positions=rs.original_max_position_embeddings).double()
    return (plain / scaled).float().numpy()


def _encode(name: str, w: torch.Tensor, arch: str, c: ModelConfig, qtype: str) -> tuple[np.ndarray, Any]:
    """GGUF-side array and raw type for one tensor: permute / shift, then quantize."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    a = w.detach().to(torch.float32).cpu().numpy()
    base = name.rpartition(".")[0].rpartition(".")[2]
    if arch in N.PERMUTE_QK_ARCHS and base in ("attn_q", "attn_k"):
        n = c.num_attention_heads if base == "attn_q" else c.num_key_value_heads
        a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    if arch in N.NORM_SHIFT and base.endswith("norm"):
        a = a + np.float32(N.NORM_SHIFT[arch])
    q = GGMLQuantizationType[qtype] if a.ndim == 2 else GGMLQuantizationType.F32
    if a.shape[-1] % GGML_QUANT_SIZES[q][0]:
        q = GGMLQuantizationType.F16
    data = quantize(np.ascontiguousarray(a), q)
    return data, (q if data.dtype == np.uint8 else None)


def _add_value(w, key: str, v: Any) -> None:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v) if 0 <= v < 2**32 else w.add_int64(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, list | tuple):
        w.add_array(key, list(v))
    else:
        raise CheckpointError(f"cannot write metadata {key}={v!r} to GGUF; use str, int, float, bool or lists")


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer_fields: dict[str, Any] | None = None,
    qtype: str = "F16",
) -> Path:
    """Write atomically (temp file + os.replace). `tokenizer_fields`: extra `tokenizer.ggml.*` keys."""
    import gguf

    if qtype not in QTYPES:
        raise CheckpointError(f"GGUF qtype {qtype!r} is not supported for writing; use one of {QTYPES}")
    arch, out = N.FAMILY_ARCH[config.family], Path(path)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write(w, config, arch, state_dict, tokenizer_fields, qtype)
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    return out


def _write(w, config: ModelConfig, arch: str, state_dict: dict[str, torch.Tensor],
           tokenizer_fields: dict[str, Any] | None, qtype: str) -> None:
    """Metadata, then tensors; GGUFWriter keeps tensors in memory until write_tensors_to_file."""
    for key, v in {**_metadata(config, arch), **(tokenizer_fields or {})}.items():
        _add_value(w, key, v)
    w.add_file_type(_FILE_TYPE[qtype])
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(config))
    for hf_name, t in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        try:
            name = gguf_tensor_name(hf_name, arch)
        except (KeyError, ValueError):
            raise CheckpointError(f"tensor {hf_name!r} has no GGUF name for arch {arch}") from None
        data, raw_type = _encode(name, t, arch, config, qtype)
        w.add_tensor(name, data, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()


