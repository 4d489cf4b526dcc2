"""Read a LoRA adapter directory (PEFT layout, as leanfm finetune or the peft library save it) for serving.

    adapter = read_lora_adapter("out/lora")        # LoraAdapterError when it is not a plain LoRA
    factors = adapter.factors_for(model)           # {module name: LoraFactors}, checked against the model

Serving adds an adapter's low-rank delta on top of the unchanged base (leanfm.models.multi_lora), so
only adapters that are a pure delta s * B A per linear layer qualify: LoRA and rsLoRA (and what leanfm
saves for PiSSA and QLoRA, which it writes as plain LoRA over the original float base). DoRA, IA3,
prompt / prefix tuning, bottleneck and BitFit adapters change more than a low-rank delta: they are
served merged into the base (`leanfm serve --adapter DIR`, one adapter per server).

The tensor names and config keys follow leanfm.tune.peft_format (which writes them); this reader is
separate because the serving engine may not import leanfm.tune (DESIGN.md layering).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from leanfm.models.multi_lora import LoraFactors, linear_shapes
from leanfm.utils.errors import LeanfmError

__all__ = ["LoraAdapter", "LoraAdapterError", "read_lora_adapter"]

CONFIG_NAME, WEIGHTS_NAME, LEANFM_NAME = "adapter_config.json", "adapter_model.safetensors", "leanfm_adapter.json"
PREFIX = "base_model.model."
BASE_KEYS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim")
MERGED_HINT = "serve it merged into the base with `leanfm serve --adapter DIR` (or LLM on the merged model)"


class LoraAdapterError(LeanfmError, ValueError):
    """An adapter directory that cannot be served as a multi-LoRA adapter (or not onto this model)."""


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    r: int
    alpha: float
    rslora: bool
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))
    base: dict[str, Any] = field(default_factory=dict)  # the base model's fingerprint when saved by leanfm
    base_model: str | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r ** 0.5 if self.rslora else self.alpha / self.r

    @property
    def targets(self) -> list[str]:
        return sorted(self.tensors)

    def factors_for(self, model: nn.Module) -> dict[str, LoraFactors]:
        """{module: LoraFactors}; LoraAdapterError when the adapter was made for another base model."""
        self._check_base(model)
        shapes = linear_shapes(model)
        out = {}
        for name, (a, b) in self.tensors.items():
            if name == "lm_head":
                raise LoraAdapterError(f"{self.path}: the adapter targets lm_head, which multi-LoRA serving does not "
                                       f"run per request (logits are computed after the step); {MERGED_HINT}")
            if name not in shapes:
                raise LoraAdapterError(f"{self.path}: the adapter targets {name}, which this model does not have "
                                       "(as a linear layer); it was made for another base model")
            n, k = shapes[name]
            if a.shape[1] != k or b.shape[0] != n:
                raise LoraAdapterError(f"{self.path}: {name} is {n}x{k} in this model but the adapter's factors are "
                                       f"A {tuple(a.shape)}, B {tuple(b.shape)}; it was made for another base model")
            out[name] = LoraFactors(a, b, self.scaling)
        return out

    def _check_base(self, model: nn.Module) -> None:
        c = getattr(model, "config", None)
        diff = {k: (v, getattr(c, k, None)) for k, v in self.base.items()
                if k in BASE_KEYS and getattr(c, k, v) != v}
        if diff:
            shown = ", ".join(f"{k} {a} (model: {b})" for k, (a, b) in diff.items())
            raise LoraAdapterError(f"{self.path}: this adapter was made for another base model ({shown}); serve it "
                                   f"with {self.base_model or 'the model it was trained on'}")


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoraAdapterError(f"{path}: invalid JSON ({e}); re-save the adapter") from None


def _method(peft: dict[str, Any], meta: dict[str, Any] | None, path: Path) -> None:
    """Refuse what is not a pure low-rank delta, naming the method."""
    saved = ((meta or {}).get("config") or {}).get("method")
    kind = peft.get("peft_type")
    if saved is not None and saved not in ("lora", "qlora"):
        raise LoraAdapterError(f"{path}: this is a {saved} adapter, not a plain LoRA delta, so it cannot be served "
                               f"beside others; {MERGED_HINT}")
    if kind != "LORA":
        name = str(kind).removeprefix("LEANFM_").lower()
        raise LoraAdapterError(f"{path}: this is a {name} adapter (peft_type {kind}), not a plain LoRA delta, so it "
                               f"cannot be served beside others; {MERGED_HINT}")
    if peft.get("use_dora"):
        raise LoraAdapterError(f"{path}: this is a dora adapter (use_dora), not a plain LoRA delta; {MERGED_HINT}")
    for key in ("modules_to_save", "trainable_token_indices", "rank_pattern", "alpha_pattern"):
        if peft.get(key):
            raise LoraAdapterError(f"{path}: adapters with {key} are not supported for multi-LoRA serving; "
                                   f"{MERGED_HINT}")
    if peft.get("bias", "none") != "none" or peft.get("lora_bias") or peft.get("fan_in_fan_out"):
        raise LoraAdapterError(f"{path}: adapters that train biases or store transposed (fan_in_fan_out) weights "
                               f"are not supported for multi-LoRA serving; {MERGED_HINT}")


def _module(key: str) -> tuple[str, str]:
    """(module name, "A" | "B") of a PEFT tensor key; ("", "") for anything else."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if body.startswith("model.language_model."):  # multimodal Gemma 3 checkpoints' text tower
        body = "model." + body[len("model.language_model."):]
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if body.endswith(suffix):
                return body[: -len(suffix)], part
    return "", ""


def read_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """The adapter at `path` as per-module factors (float32, on the CPU)."""
    path = Path(path).expanduser()
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise LoraAdapterError(f"{path}: not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    peft, meta = _json(path / CONFIG_NAME) or {}, _json(path / LEANFM_NAME)
    _method(peft, meta, path)
    try:
        raw = load_file(str(path / WEIGHTS_NAME))
    except (OSError, SafetensorError) as e:
        raise LoraAdapterError(f"{path / WEIGHTS_NAME}: unreadable safetensors ({e}); re-save the adapter") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        name, part = _module(key)
        if not name:
            raise LoraAdapterError(f"{path}: tensor {key} is not a LoRA factor (lora_A / lora_B); {MERGED_HINT}")
        parts.setdefault(name, {})[part] = t.float()
    r = int(peft.get("r") or 0)
    tensors = {}
    for name, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise LoraAdapterError(f"{path}: {name} has lora_{'AB'.replace(next(iter(ab)), '')} missing; re-save the "
                                   "adapter")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise LoraAdapterError(f"{path}: {name}'s factors A {tuple(a.shape)}, B {tuple(b.shape)} are not of the "
                                   f"config's rank r={r}; re-save the adapter")
        tensors[name] = (a.contiguous(), b.contiguous())
    if not tensors or r < 1:
        raise LoraAdapterError(f"{path}: the adapter holds no LoRA factors (or r is missing); re-save it")
    return LoraAdapter(path, r, float(peft.get("lora_alpha", 8)), bool(peft.get("use_rslora")), tensors,
                       dict((meta or {}).get("base") or {}), (meta or {}).get("base_model") or peft.get(
                           "base_model_name_or_path"))
