"""Adapters on disk in the Hugging Face PEFT layout, both ways.

    save_adapter(model, "out/lora")     # adapter_config.json + adapter_model.safetensors (+ leanfm_adapter.json)
    load_adapter(model, "out/lora")     # also reads adapters made by the peft library on a transformers model

Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (DoRA), `.ia3_l` ((out, 1), or (1, in) for feed-forward layers) and
`prompt_embeddings` (prompt and prefix tuning). A PiSSA adapter is saved as the plain LoRA of rank 2r
that gives the same model on the original base (PEFT's conversion). Methods PEFT lacks (bottleneck,
BitFit) use the same layout with their own tensor names and peft_type "LEANFM_<METHOD>".

leanfm_adapter.json records the leanfm config and the base model's shape, so loading onto another base
fails with a clear message. Saving is atomic: a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from leanfm.tune import api
from leanfm.tune.config import AdapterConfig, AdapterError, config_from_dict
from leanfm.tune.layers import LoraBranch
from leanfm.tune.methods import DoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

__all__ = ["load_adapter", "read_adapter_config", "save_adapter"]

CONFIG_NAME, WEIGHTS_NAME, LEANFM_NAME = "adapter_config.json", "adapter_model.safetensors", "leanfm_adapter.json"
PREFIX = "base_model.model."
_LOCAL_TO_PEFT = {"lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight",
                  "magnitude": "lora_magnitude_vector", "ia3_l": "ia3_l"}
_BASE_KEYS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim")


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    c = model.config
    return {k: getattr(c, k) for k in _BASE_KEYS}


# --- save ------------------------------------------------------------------------------------------
def _saved_config(model: nn.Module, name: str) -> AdapterConfig:
    """The config the saved tensors follow: PiSSA becomes plain LoRA of rank 2r, QLoRA plain LoRA."""
    config = api.adapter_configs(model)[name]
    if hasattr(config, "as_lora"):
        config = config.as_lora()
    if getattr(config, "init", None) == "pissa":
        alpha = config.alpha * (math.sqrt(2) if config.rslora else 2)
        config = config.replace(r=2 * config.r, alpha=alpha, init="default")
    return config


def _peft_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    mark = f".adapters.{name}."
    for module_name, module in model.named_modules():
        branches = getattr(module, "adapters", None)
        if branches is None or name not in branches or not isinstance(branches, nn.ModuleDict):
            continue
        branch = branches[name]
        if isinstance(branch, LoraBranch) and branch.init == "pissa":  # s(BA - B0A0) as one LoRA
            out[f"{PREFIX}{module_name}.lora_A.weight"] = torch.cat([branch.lora_A.weight, branch.init_A])
            out[f"{PREFIX}{module_name}.lora_B.weight"] = torch.cat([branch.lora_B.weight, -branch.init_B], 1)
            if hasattr(branch, "magnitude"):
                out[f"{PREFIX}{module_name}.lora_magnitude_vector"] = branch.magnitude
            continue
        for local, p in branch.named_parameters():
            key = _LOCAL_TO_PEFT.get(local, local)
            if local == "ia3_l":
                p = p.reshape(1, -1) if branch.feedforward else p.reshape(-1, 1)
            out[f"{PREFIX}{module_name}.{key}"] = p
    for full, p in api.adapter_parameters(model, name):
        if full.startswith("virtual_tokens."):
            out["prompt_embeddings"] = p
        elif mark not in full:
            raise AdapterError(f"cannot place adapter tensor {full} in the PEFT layout")
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def _peft_config(model: nn.Module, config: AdapterConfig, targets: list[str], base_model: str | None) -> dict:
    c = model.config
    d: dict[str, Any] = {"peft_type": getattr(config, "peft_type", None) or f"LEANFM_{config.method.upper()}",
                         "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
                         "modules_to_save": None}
    if isinstance(config, LoraConfig):
        d.update(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, use_rslora=config.rslora,
                 use_dora=isinstance(config, DoraConfig), target_modules=targets, bias="none",
                 fan_in_fan_out=False, init_lora_weights=True)
    elif isinstance(config, IA3Config):
        d.update(target_modules=targets, feedforward_modules=[t for t in targets if config.is_feedforward(t)],
                 fan_in_fan_out=False, init_ia3_weights=True)
    elif isinstance(config, PromptTuningConfig):
        d.update(num_virtual_tokens=config.num_virtual_tokens, token_dim=c.hidden_size, num_layers=c.num_hidden_layers,
                 num_attention_heads=c.num_attention_heads, num_transformer_submodules=1,
                 prompt_tuning_init="RANDOM")
    elif isinstance(config, PrefixTuningConfig):
        kv = c.num_key_value_heads * c.head_dim
        d.update(num_virtual_tokens=config.num_virtual_tokens, token_dim=kv, encoder_hidden_size=kv,
                 num_layers=c.num_hidden_layers, num_attention_heads=c.num_key_value_heads,
                 num_transformer_submodules=1, prefix_projection=False)
    else:
        d.update(target_modules=targets)
    return d


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 base_model: str | None = None, extra: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Write adapter `name` (default: the active one) to directory `path` in PEFT's layout, atomically."""
    name = name or api.active_adapter(model)
    if name is None or name not in api.adapter_configs(model):
        raise AdapterError(f"no adapter {name!r} to save; the model has {sorted(api.adapter_configs(model)) or 'none'}")
    trained = api.adapter_configs(model)[name]
    config = _saved_config(model, name)
    tensors = _peft_tensors(model, name)
    targets = sorted({_module_of(k) for k in tensors if k.startswith(PREFIX)})
    meta = {"format": 1, "name": name, "config": config.to_dict(), "trained_config": trained.to_dict(),
            "base": base_fingerprint(model), "base_model": base_model, **(extra or {})}
    files = {CONFIG_NAME: _peft_config(model, config, targets, base_model), LEANFM_NAME: meta}
    return _write_atomic(Path(path), tensors, files, overwrite)


def _write_atomic(path: Path, tensors: dict[str, Tensor], files: dict[str, dict], overwrite: bool) -> Path:
    path = path.expanduser().absolute()
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not overwrite)):
        raise AdapterError(f"{path} exists and is not an empty directory; choose a new path or overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for file, content in files.items():
            (tmp / file).write_text(json.dumps(content, indent=2) + "\n")
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}" if path.exists() else None
        if old is not None:
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --- load ------------------------------------------------------------------------------------------
def read_adapter_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(adapter_config.json, leanfm_adapter.json or None) of an adapter directory."""
    path = Path(path).expanduser()
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{path}: not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    out = []
    for file in (CONFIG_NAME, LEANFM_NAME):
        if not (path / file).is_file():
            out.append(None)
            continue
        try:
            out.append(json.loads((path / file).read_text()))
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path / file}: invalid JSON ({e}); re-save the adapter") from None
    return out[0], out[1]


def _check_base(model: nn.Module, meta: dict[str, Any] | None, path: Path) -> None:
    want = (meta or {}).get("base")
    if not want:
        return
    have = base_fingerprint(model)
    diff = {k: (want.get(k), have[k]) for k in _BASE_KEYS if k in want and want[k] != have[k]}
    if diff:
        shown = ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in diff.items())
        raise AdapterError(f"{path}: this adapter was made for another base model ({shown}); load it onto "
                           f"{(meta or {}).get('base_model') or 'the model it was trained on'}")


_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "ia3_l", "down.weight", "down.bias",
             "up.weight", "up.bias", "bias")  # "down.bias" before "bias": first match wins


def _split(key: str) -> tuple[str, str]:
    """(module name, tensor suffix) of a PEFT key."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if body.startswith("model.language_model."):  # multimodal Gemma 3 checkpoints' text tower
        body = "model." + body[len("model.language_model."):]
    for suffix in _SUFFIXES:
        if body.endswith("." + suffix):
            return body[: -len(suffix) - 1], suffix
    module, _, local = body.rpartition(".")
    return module, local


def _module_of(key: str) -> str:
    return _split(key)[0]


def _config_from_peft(peft: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> AdapterConfig:
    kind = peft.get("peft_type")
    for key in ("modules_to_save", "trainable_token_indices"):
        if peft.get(key):
            raise AdapterError(f"{path}: the adapter also trains whole modules or token rows ({key}: "
                               f"{peft[key]}), which leanfm does not load; save it without {key}")
    modules = sorted({_module_of(k) for k in tensors if k != "prompt_embeddings"})
    if kind == "LORA":
        for key in ("rank_pattern", "alpha_pattern"):
            if peft.get(key):
                raise AdapterError(f"{path}: per-module {key} is not supported; save the adapter with one rank")
        cls = DoraConfig if peft.get("use_dora") else LoraConfig
        return cls(target_modules=tuple(modules), r=int(peft["r"]), alpha=float(peft.get("lora_alpha", 8)),
                   dropout=float(peft.get("lora_dropout") or 0.0), rslora=bool(peft.get("use_rslora")))
    if kind == "IA3":
        ff = tuple(m for m in modules if tensors[f"{PREFIX}{m}.ia3_l"].shape[0] == 1) \
            if all(f"{PREFIX}{m}.ia3_l" in tensors for m in modules) else ()
        return IA3Config(target_modules=tuple(modules), feedforward_modules=ff)
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        if peft.get("prefix_projection"):
            raise AdapterError(f"{path}: prefix tuning with prefix_projection is not supported")
        cls = PromptTuningConfig if kind == "PROMPT_TUNING" else PrefixTuningConfig
        return cls(num_virtual_tokens=int(peft["num_virtual_tokens"]))
    raise AdapterError(f"{path}: PEFT method {kind!r} is not supported; leanfm loads LORA (and DoRA), IA3, "
                       "PROMPT_TUNING and PREFIX_TUNING adapters")


def _leanfm_state(model: nn.Module, tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """PEFT-named tensors -> the names adapter_state_dict uses."""
    own = dict(api.adapter_parameters(model, name))
    out = {}
    for key, t in tensors.items():
        if key == "prompt_embeddings":
            out[f"virtual_tokens.{name}.embedding"] = t
            continue
        module, local = _split(key)
        local = {v: k for k, v in _LOCAL_TO_PEFT.items()}.get(local, local)
        full = f"{module}.adapters.{name}.{local}"
        if local == "ia3_l" and full in own:
            t = t.reshape(own[full].shape)
        out[full] = t
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 activate: bool = True) -> AdapterConfig:
    """Add the adapter saved at `path` (by leanfm or by the peft library) to `model`; returns its config.
    AdapterError (before the model changes) when it does not fit this base model."""
    path = Path(path).expanduser()
    peft, meta = read_adapter_config(path)
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{path / WEIGHTS_NAME}: unreadable safetensors ({e}); re-save the adapter") from None
    _check_base(model, meta, path)
    config = config_from_dict(meta["config"]) if meta and "config" in meta else \
        _config_from_peft(peft, tensors, path)
    present = {n for n, _ in model.named_modules()}
    absent = sorted({_module_of(k) for k in tensors if k != "prompt_embeddings"} - present)
    if absent:
        raise AdapterError(f"{path}: the adapter targets {absent[0]}, which this model does not have; it was made "
                           "for another base model")
    api.add_adapter(model, config, name, activate=activate)
    try:
        api.load_adapter_state_dict(model, _leanfm_state(model, tensors, name), name)
    except AdapterError as e:
        api.delete_adapter(model, name)
        raise AdapterError(f"{path}: {e}") from None
    return config
