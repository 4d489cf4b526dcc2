"""Hugging Face model directories in and out: config.json <-> ModelConfig, safetensors <-> state dicts.

    config, state = load_hf_dir("path/to/dir")          # any supported family, sharded or not
    model = load_model_from_hf_dir("path/to/dir")       # a ready leanfm model (tied heads re-tied)
    save_hf_dir(model, "out/", tokenizer=tok)           # transformers loads it into *ForCausalLM

Parameter names already match HF (see models/base.py), so weights need no renaming beyond dropping
the multimodal Gemma 3 wrapper prefixes. Reads both the transformers 5 config layout
(`rope_parameters`, per layer type for Gemma 3) and the 4.x one (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`); writes the 5.x layout plus the legacy keys older readers need.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from leanfm.models import build_model
from leanfm.models.base import DecoderForCausalLM
from leanfm.models.config import FAMILIES, ModelConfig, RopeScaling
from leanfm.utils.errors import CheckpointError

# HF model_type -> leanfm family
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
HF_MODEL_TYPE = {f: ("gemma3_text" if f == "gemma3" else f) for f in FAMILIES}
# each transformers config class's defaults, for keys a config.json leaves out (Gemma 3 multimodal
# configs give only a handful of text_config keys and rely on these)
_COMMON = dict(rms_norm_eps=1e-6, hidden_act="silu", sliding_window=None, bos_token_id=None, eos_token_id=None,
               pad_token_id=None, tie_word_embeddings=False, rope_theta=10000.0, head_dim=None)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  sliding_window=4096),
    "gemma2": dict(_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=4096,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
_DEFAULTS["qwen3"] = dict(_DEFAULTS["qwen2"], head_dim=128)
_DEFAULTS["gemma3"] = dict(_DEFAULTS["gemma2"], vocab_size=262208, max_position_embeddings=131072,
                           rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                           attn_logit_softcapping=None, final_logit_softcapping=None)
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
# multimodal Gemma 3 wrappers: transformers 5 (`model.language_model.`) and 4.x (`language_model.model.`)
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
_SKIP_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


# --- config ---------------------------------------------------------------------------------
def _family(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type is None:
        for arch in hf.get("architectures") or ():
            for fam, name in ARCHITECTURES.items():
                if arch == name or (fam == "gemma3" and arch == "Gemma3ForConditionalGeneration"):
                    return fam
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    what = f"model_type {model_type!r}" if model_type else f"architectures {hf.get('architectures')}"
    raise CheckpointError(
        f"unsupported {what} in config.json; leanfm supports model_type {', '.join(sorted(MODEL_TYPES))}"
    )


def _rope(hf: dict, family: str, defaults: dict) -> tuple[float, float | None, RopeScaling | None]:
    """(rope_theta, rope_local_base_freq, scaling) from 5.x `rope_parameters` or 4.x keys."""
    params = hf.get("rope_parameters") or {}
    if family == "gemma3":
        glob = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if hf.get("rope_scaling"):
            glob.update(hf["rope_scaling"])
        theta = glob.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", defaults["rope_local_base_freq"]))
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise CheckpointError("Gemma 3 local (sliding) RoPE scaling is not supported; use rope_type 'default'")
        scaling = glob
    else:
        scaling = dict(hf.get("rope_scaling") or params)
        theta = scaling.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
        local_theta = None
    if (scaling.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise CheckpointError("partial_rotary_factor != 1 is not supported by leanfm; use a full-rotary model")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), local_theta, None
    if rope_type not in ("linear", "llama3"):
        raise CheckpointError(f"rope scaling type {rope_type!r} is not supported; leanfm supports linear and llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    kw = {k: scaling[k] for k in keys if scaling.get(k) is not None}
    if rope_type == "llama3":
        kw.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
    return float(theta), local_theta, RopeScaling(rope_type=rope_type, **kw)


# keys whose explicit null means "off" rather than "use the class default"
_NULLABLE = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "bos_token_id",
             "eos_token_id", "pad_token_id")


def _layer_types(hf: dict, family: str, n: int, window: int | None) -> tuple[tuple[str, ...], int | None]:
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            return ("full_attention",) * n, None  # HF ignores sliding_window unless it is switched on
        if not hf.get("layer_types"):
            first = hf.get("max_window_layers", 28)
            return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n)), window
    if hf.get("layer_types"):
        return tuple(hf["layer_types"]), window
    if family == "llama":
        return ("full_attention",) * n, None
    if family == "mistral":
        return (("sliding_attention" if window else "full_attention"),) * n, window
    if family == "gemma2":
        return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)), window
    if family == "gemma3":
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)), window
    return ("full_attention",) * n, None


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a config.json dict (Gemma 3 multimodal configs: their `text_config`)."""
    if isinstance(hf.get("text_config"), dict):
        outer, hf = hf, dict(hf["text_config"])
        if "model_type" not in hf:
            hf["model_type"] = "gemma3_text" if outer.get("model_type") == "gemma3" else outer.get("model_type")
        for key in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in outer:
                hf.setdefault(key, outer[key])
    family = _family(hf)
    if hf.get("mlp_bias") or (hf.get("attention_bias") and family != "qwen2"):
        raise CheckpointError(f"{family} with attention_bias/mlp_bias=true is not supported by leanfm")
    hf = {**_DEFAULTS[family], **{k: v for k, v in hf.items() if v is not None or k in _NULLABLE}}
    theta, local_theta, scaling = _rope(hf, family, _DEFAULTS[family])
    n, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    window = None if family == "llama" else hf["sliding_window"]
    layer_types, window = _layer_types(hf, family, n, window)
    if "sliding_attention" not in layer_types:
        layer_types, window = (), None  # ModelConfig's spelling of "all layers attend globally"
    gemma = family.startswith("gemma")
    eos = hf["eos_token_id"]
    try:
        return ModelConfig(
            family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=hf["num_key_value_heads"] or heads,
            head_dim=hf["head_dim"] or hf["hidden_size"] // heads,
            max_position_embeddings=hf["max_position_embeddings"], rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=theta, rope_scaling=scaling,
            hidden_act=(hf.get("hidden_activation") or "gelu_pytorch_tanh") if gemma else hf["hidden_act"],
            tie_word_embeddings=hf["tie_word_embeddings"],
            attention_bias=family == "qwen2", qk_norm=family in ("qwen3", "gemma3"),
            sliding_window=window, layer_types=layer_types, rope_local_base_freq=local_theta,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            attn_logit_softcapping=hf.get("attn_logit_softcapping"),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            bos_token_id=hf["bos_token_id"], pad_token_id=hf["pad_token_id"],
            eos_token_id=(eos,) if isinstance(eos, int) else tuple(eos or ()),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"invalid config.json: {e}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A config.json dict transformers 5.x loads into the family's *ForCausalLM (4.x reads it too)."""
    c, fam = config, config.family
    types = list(c.layer_types) or ["sliding_attention" if c.sliding_window else "full_attention"] * c.num_hidden_layers
    sliding = [t == "sliding_attention" for t in types]
    if fam in ("llama", "mistral") and len(set(sliding)) > 1:
        raise CheckpointError(f"{fam} cannot mix sliding and full layers in config.json; use gemma2/gemma3/qwen")
    if fam == "llama" and any(sliding):
        raise CheckpointError("llama has no sliding window in transformers; save it as family 'mistral'")
    if c.attention_bias != (fam == "qwen2"):
        raise CheckpointError(f"{fam} with attention_bias={c.attention_bias} does not match transformers' {fam}")
    scaling: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None and c.rope_scaling.rope_type != "default":
        rs = c.rope_scaling
        scaling.update(rope_type=rs.rope_type, factor=rs.factor)
        if rs.rope_type == "llama3":
            scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                           original_max_position_embeddings=rs.original_max_position_embeddings)
    eos = list(c.eos_token_id)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[fam]], "model_type": HF_MODEL_TYPE[fam],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": c.pad_token_id, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }
    if dtype is not None:
        hf["dtype"] = hf["torch_dtype"] = _dtype_name(dtype)
    if scaling["rope_type"] != "default":  # 4.x reads this; 5.x folds it into rope_parameters identically
        hf["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if fam.startswith("gemma"):
        hf.update(hidden_activation=c.hidden_act, hidden_act=c.hidden_act, attention_bias=False,
                  query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.head_dim), layer_types=types,
                  sliding_window=c.sliding_window, attn_logit_softcapping=c.attn_logit_softcapping,
                  final_logit_softcapping=c.final_logit_softcapping)
    else:
        hf["hidden_act"] = c.hidden_act
    if fam == "gemma3":
        local = c.rope_local_base_freq if c.rope_local_base_freq is not None else c.rope_theta
        hf["rope_parameters"] = {"full_attention": scaling,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        hf["rope_local_base_freq"] = local
        hf["use_bidirectional_attention"] = False
    else:
        hf["rope_parameters"] = scaling
    if fam == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if fam == "mistral":
        hf["sliding_window"] = c.sliding_window if any(sliding) else None
    if fam in ("qwen2", "qwen3"):
        first = sliding.index(True) if any(sliding) else c.num_hidden_layers
        hf.update(use_sliding_window=any(sliding), sliding_window=c.sliding_window if any(sliding) else None,
                  max_window_layers=first, layer_types=types)
        if fam == "qwen3":
            hf["attention_bias"] = False
    return hf


# --- weights --------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e}); re-create it") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{path}: shards {absent} listed in {INDEX_NAME} are missing; copy them in")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    other = sorted(p.name for p in path.glob("*.safetensors"))
    if other:
        return [path / n for n in other]
    hint = " (found pytorch .bin weights: convert them to safetensors)" if any(path.glob("*.bin")) else ""
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}{hint}; add the model's weights")


def _hf_name(key: str) -> str | None:
    if key.startswith(_SKIP_PREFIXES):
        return None
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict in leanfm/HF names, floating tensors cast to `dtype`) from an HF directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory; give a directory with config.json and safetensors")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; copy the model's config.json into the directory")
    try:
        config = config_from_hf(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e}); fix or re-create the file") from None
    if not config.name:
        config = config.replace(name=path.name)
    state: dict[str, Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = _hf_name(key)
                    if name is not None:
                        t = f.get_tensor(key)
                        state[name] = t.to(dtype) if t.is_floating_point() else t
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors ({e}); re-download or re-save it") from None
    return config, state


def load_model_from_hf_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> DecoderForCausalLM:
    """A leanfm model holding the directory's weights (built on meta, tensors adopted without a copy)."""
    config, state = load_hf_dir(path, dtype)
    model = build_model(config, device="meta")
    tied = config.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = [f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}" if missing else "",
                 f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}" if unexpected else ""]
        raise CheckpointError(f"{path}: weights do not match a {config.family} model "
                              f"({'; '.join(p for p in parts if p)}); check config.json against the weights")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        msg = str(e).replace("\n", " ").strip()
        raise CheckpointError(f"{path}: weight shapes do not match config.json ({msg[:300]})") from None
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


# --- save -----------------------------------------------------------------------------------
def _generation_config(config: ModelConfig) -> dict[str, Any]:
    eos = list(config.eos_token_id)
    out: dict[str, Any] = {"_from_model_config": True}
    for key, value in (("bos_token_id", config.bos_token_id), ("pad_token_id", config.pad_token_id),
                       ("eos_token_id", eos[0] if len(eos) == 1 else (eos or None))):
        if value is not None:
            out[key] = value
    return out


def _write_dir(model: DecoderForCausalLM, tmp: Path, tokenizer: Any, dtype: torch.dtype | None) -> None:
    config = model.config
    state = {}
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.to("cpu").contiguous()
    if any(t.is_meta for t in state.values()):
        raise CheckpointError("model has weights on the meta device; load its weights before saving")
    out_dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    (tmp / "config.json").write_text(json.dumps(config_to_hf(config, out_dtype), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
    save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_hf_dir(tmp)


def save_hf_dir(model: DecoderForCausalLM, path: str | os.PathLike, tokenizer: Any = None,
                dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write an HF directory (config, generation config, safetensors, tokenizer files) atomically.

    Everything goes to a temporary directory beside `path` that is renamed into place at the end, so
    `path` is either absent/untouched or complete. An existing non-empty `path` needs overwrite=True.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; choose another output path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty; choose a new path or pass overwrite=True (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_dir(model, tmp, tokenizer, dtype)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old is not None:
                old.rename(path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _int_if_whole(x: float) -> float | int:
    """transformers' strict config classes want an int where the value is whole (query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else x
