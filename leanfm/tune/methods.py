"""The adapter methods: one config per technique, each knowing how to build its branch or encoder.

    LoraConfig        low-rank update (options: rsLoRA scaling, PiSSA / gaussian init)
    DoraConfig        LoRA on the direction + a trained magnitude
    QLoraConfig       LoRA over a frozen int4/int8 base (quantizes the base first, RTN group-wise)
    IA3Config         learned rescaling of k, v and the FFN input
    PromptTuningConfig, PrefixTuningConfig   virtual tokens / virtual keys and values
    BottleneckConfig  down-act-up residual adapters after the attention and FFN outputs
    BitFitConfig      trained biases

`peft_type` names the PEFT library's method when the adapter can be saved in its format.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanfm.tune import layers as L
from leanfm.tune.config import ALL_LINEARS, AdapterConfig, register_config
from leanfm.tune.prompt import PrefixEncoder, PromptEncoder

__all__ = ["BitFitConfig", "BottleneckConfig", "DoraConfig", "IA3Config", "LoraConfig", "PrefixTuningConfig",
           "PromptTuningConfig", "QLoraConfig"]

LORA_INITS = ("default", "gaussian", "pissa")


@register_config
@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str | None] = "LORA"
    default_targets: ClassVar[tuple[str, ...]] = ALL_LINEARS

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    init: str = "default"  # "default" (A kaiming, B = 0), "gaussian" (A ~ N(0, 1/r)), "pissa"

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            self._fail(f"r must be a positive integer, got {self.r!r}")
        self._positive(alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            self._fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in LORA_INITS:
            self._fail(f"init must be one of {LORA_INITS}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def make_branch(self, name: str, layer: nn.Module) -> L.Branch:
        return L.LoraBranch(layer, self.r, self.alpha, self.dropout, self.rslora, self.init)


@register_config
@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    method: ClassVar[str] = "dora"

    def make_branch(self, name: str, layer: nn.Module) -> L.Branch:
        return L.DoraBranch(layer, self.r, self.alpha, self.dropout, self.rslora, self.init)


@register_config
@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA over a frozen quantized base. Linear layers matching `quantize_modules` that are still float
    are quantized first (round-to-nearest, symmetric, group-wise); so is the LM head (and its tied
    embedding) at `head_bits` unless None. Layers that are already QuantLinear are used as they are."""

    method: ClassVar[str] = "qlora"
    mergeable: ClassVar[bool] = False  # the base is packed integers; merge on a float base instead
    pattern_fields: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules", "quantize_modules")

    bits: int = 4
    group_size: int | None = 64
    quantize_modules: tuple[str, ...] = ("model.layers.*",)
    head_bits: int | None = 8

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8) or self.head_bits not in (None, 4, 8):
            self._fail(f"bits and head_bits must be 4 or 8 (head_bits may be null), got {self.bits}, "
                       f"{self.head_bits}")
        if self.init == "pissa":
            self._fail("init='pissa' rewrites the base weights, which a quantized base cannot hold; "
                       "use init='default' or method lora")

    def prepare(self, model: nn.Module) -> None:
        from leanfm.tune.qlora import quantize_base_

        quantize_base_(model, self.bits, self.group_size, self.quantize_modules, self.head_bits)

    def as_lora(self) -> LoraConfig:
        """The same adapter as a plain LoRA config (what loads onto a float base)."""
        return LoraConfig(target_modules=self.target_modules, exclude_modules=self.exclude_modules, r=self.r,
                          alpha=self.alpha, dropout=self.dropout, rslora=self.rslora, init=self.init)


@register_config
@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    method: ClassVar[str] = "ia3"
    peft_type: ClassVar[str | None] = "IA3"
    default_targets: ClassVar[tuple[str, ...]] = ("model.layers.*.self_attn.k_proj",
                                                  "model.layers.*.self_attn.v_proj",
                                                  "model.layers.*.mlp.down_proj")
    pattern_fields: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules", "feedforward_modules")

    # targets whose input (not output) is rescaled; must be among the targets
    feedforward_modules: tuple[str, ...] = ("model.layers.*.mlp.down_proj",)

    def is_feedforward(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.feedforward_modules)

    def make_branch(self, name: str, layer: nn.Module) -> L.Branch:
        return L.IA3Branch(layer, self.is_feedforward(name))


@register_config
@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    method: ClassVar[str] = "bottleneck"
    mergeable: ClassVar[bool] = False
    default_targets: ClassVar[tuple[str, ...]] = ("model.layers.*.self_attn.o_proj", "model.layers.*.mlp.down_proj")

    size: int = 64
    activation: str = "relu"

    def validate(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            self._fail(f"size must be a positive integer, got {self.size!r}")
        if self.activation not in L._ACTS:
            self._fail(f"activation must be one of {sorted(L._ACTS)}, got {self.activation!r}")

    def make_branch(self, name: str, layer: nn.Module) -> L.Branch:
        return L.BottleneckBranch(layer, self.size, self.activation)


@register_config
@dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    method: ClassVar[str] = "bitfit"
    default_targets: ClassVar[tuple[str, ...]] = ALL_LINEARS

    def make_branch(self, name: str, layer: nn.Module) -> L.Branch:
        return L.BiasBranch(layer)


@dataclass(frozen=True)
class _VirtualTokensConfig(AdapterConfig):
    level: ClassVar[str] = "model"
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False  # the virtual tokens change the outputs by design
    default_targets: ClassVar[tuple[str, ...]] = ()

    num_virtual_tokens: int = 20
    init_std: float | None = None  # None: sampled vocabulary embeddings (prompt) / N(0, 1) (prefix)

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            self._fail(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.target_modules is not None or self.exclude_modules:
            self._fail("acts on the whole model; leave target_modules and exclude_modules unset")


@register_config
@dataclass(frozen=True)
class PromptTuningConfig(_VirtualTokensConfig):
    method: ClassVar[str] = "prompt"
    peft_type: ClassVar[str | None] = "PROMPT_TUNING"

    @torch.no_grad()
    def make_encoder(self, model: nn.Module, generator: torch.Generator) -> nn.Module:
        c = model.config
        enc = PromptEncoder(self.num_virtual_tokens, c.hidden_size)
        if next(model.parameters()).is_meta:  # shapes only (memory planning)
            return enc
        if self.init_std is None:  # rows of the (scaled) embedding table, as PEFT's SAMPLE_VOCAB init
            ids = torch.randint(0, c.vocab_size, (1, self.num_virtual_tokens), generator=generator)
            enc.embedding.copy_(model.embed(ids)[0].float())
        else:
            enc.embedding.normal_(0, self.init_std, generator=generator)
        return enc


@register_config
@dataclass(frozen=True)
class PrefixTuningConfig(_VirtualTokensConfig):
    method: ClassVar[str] = "prefix"
    peft_type: ClassVar[str | None] = "PREFIX_TUNING"

    @torch.no_grad()
    def make_encoder(self, model: nn.Module, generator: torch.Generator) -> nn.Module:
        c = model.config
        enc = PrefixEncoder(self.num_virtual_tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        enc.embedding.normal_(0, 1.0 if self.init_std is None else self.init_std, generator=generator)
        return enc

