"""ModelConfig: the one description of a decoder that every family, loader and tool reads.

Field names follow Hugging Face's config.json where one exists, so the HF adapter in
`leanfm.checkpoint.hf` stays a thin table; everything is validated on construction.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` (Llama 3.1+), `linear` (Gemma 3 4B+) or none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported; use 'default', 'linear' or 'llama3'"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen 2)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen 3, Gemma 3)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer; empty means all full attention
    # Gemma specifics
    rope_local_base_freq: float | None = None  # RoPE base for sliding layers (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (Gemma)
    attn_logit_softcapping: float | None = None  # Gemma 2
    final_logit_softcapping: float | None = None  # Gemma 2
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; use one of {ACTIVATIONS}")
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
                )
            bad = set(self.layer_types) - set(LAYER_TYPES)
            if bad:
                raise ValueError(f"unknown layer types {sorted(bad)}; use {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need sliding_window > 0")
        if isinstance(self.eos_token_id, int):  # tolerate a bare int
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))

    # --- derived -----------------------------------------------------------------------
    @property
    def is_gemma(self) -> bool:
        return self.family.startswith("gemma")

    def layer_is_sliding(self, i: int) -> bool:
        """Sliding-window attention on layer i: per `layer_types`, or on every layer when the config
        gives a window but no per-layer types (Mistral v0.1 style)."""
        if not self.layer_types:
            return bool(self.sliding_window)
        return self.layer_types[i] == "sliding_attention"

    def layer_rope_theta(self, i: int) -> float:
        if self.layer_is_sliding(i) and self.rope_local_base_freq is not None:
            return self.rope_local_base_freq
        return self.rope_theta

    @property
    def attn_scale(self) -> float:
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(scalar) ** -0.5

    # --- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rs) if isinstance(rs, dict) else rs
        d["layer_types"] = tuple(d.get("layer_types") or ())
        eos = d.get("eos_token_id") or ()
        d["eos_token_id"] = (eos,) if isinstance(eos, int) else tuple(eos)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
