"""DecoderForCausalLM: embeddings -> blocks -> final norm -> LM head, shared by every family.

A family supplies its block class and a few switches (norm flavour, embedding scale, logit
soft-capping). Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`), so an
HF state dict loads without translation and a saved directory loads in transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from leanfm.models.blocks import RMSNorm
from leanfm.models.config import ModelConfig
from leanfm.models.decode_plan import run_layers
from leanfm.ops.kernels import fused as fused_ops
from leanfm.ops.rope import rope_cos_sin, rope_inv_freq


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, block_cls: type[nn.Module]):
        super().__init__()
        # initialised by hand: nn.Embedding's own normal_() on the meta device (how loaders build a
        # model) goes through torch._refs, whose import pulls in torch._dynamo (+1.7 s per load)
        weight = torch.empty(config.vocab_size, config.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(block_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=config.is_gemma)


class DecoderForCausalLM(nn.Module):
    block_cls: type[nn.Module]
    fused = False  # leanfm.models.fusion.use_fused

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config, self.block_cls)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.embed_scale = config.hidden_size**0.5 if config.is_gemma else None
        self._embed_scale_t: dict[torch.dtype, Tensor] = {}
        # one inverse-frequency table per distinct (RoPE base, scaled) pair. Gemma 3 scales only its
        # global layers; the local (sliding) base is never scaled. Built on the CPU explicitly: under
        # `torch.device("meta")` (how loaders build models) a meta table could never be computed.
        rs = config.rope_scaling
        self._layer_rope = [self._rope_key(config, i) for i in range(config.num_hidden_layers)]
        self._inv_freq: dict[tuple[float, bool], Tensor] = {}
        with torch.device("cpu"):
            for theta, scaled in sorted(set(self._layer_rope)):
                self._inv_freq[(theta, scaled)] = rope_inv_freq(
                    config.head_dim, theta,
                    scaling_type=rs.rope_type if scaled else "default",
                    factor=rs.factor if scaled else 1.0,
                    low_freq_factor=rs.low_freq_factor if scaled else 1.0,
                    high_freq_factor=rs.high_freq_factor if scaled else 4.0,
                    original_max_positions=rs.original_max_position_embeddings if scaled else 8192,
                )

    @staticmethod
    def _rope_key(config: ModelConfig, i: int) -> tuple[float, bool]:
        local = config.is_gemma and config.layer_is_sliding(i) and config.rope_local_base_freq is not None
        scaled = config.rope_scaling is not None and config.rope_scaling.rope_type != "default" and not local
        return config.layer_rope_theta(i), scaled

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:
            scale = self._embed_scale_t.get(h.dtype)
            if scale is None:  # a 0-d tensor per dtype: the product rounds like HF's (scale cast first)
                scale = self._embed_scale_t[h.dtype] = torch.tensor(self.embed_scale, dtype=h.dtype)
            h = h * scale
        return h

    def forward(self, input_ids: Tensor, positions: Tensor, attn_meta: object | None = None) -> Tensor:
        """input_ids, positions: (B, T) (positions may be (T,)). Returns hidden states (B, T, hidden)."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        h = self.embed(input_ids)
        cos_sin = fused_ops.rope_cos_sin if self.fused else rope_cos_sin
        rope = {key: cos_sin(positions, f, h.dtype) for key, f in self._inv_freq.items()}
        if self.fused:  # decode steps: one kernel call per block where it applies
            h = run_layers(self.model.layers, self._layer_rope, rope, h, positions, attn_meta)
        else:
            for layer, key in zip(self.model.layers, self._layer_rope, strict=False):
                cos, sin = rope[key]
                h = layer(h, cos, sin, positions, attn_meta)
        return self.model.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def remove_layers(self, indices: Iterable[int]) -> None:
        """Drop decoder layers in place (layer removal, e.g. ShortGPT). The remaining layers keep their
        weights, sliding windows and RoPE tables; their attention's KV-cache index (`layer_idx`) is
        renumbered, and the config shrinks (num_hidden_layers, layer_types), so the result equals a model
        built from the new config with the remaining layers' weights."""
        n = len(self.model.layers)
        drop = set(indices)
        if not drop <= set(range(n)) or len(drop) >= n:
            raise ValueError(f"cannot remove layers {sorted(drop)} of {n}: give distinct indices in [0, {n}) "
                             "and keep at least one layer")
        keep = [i for i in range(n) if i not in drop]
        self.model.layers = nn.ModuleList(self.model.layers[i] for i in keep)
        self._layer_rope = [self._layer_rope[i] for i in keep]
        self._inv_freq = {k: f for k, f in self._inv_freq.items() if k in self._layer_rope}
        for j, layer in enumerate(self.model.layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = j
        types = tuple(self.config.layer_types[i] for i in keep) if self.config.layer_types else ()
        self.config = self.config.replace(num_hidden_layers=len(keep), layer_types=types)

    def layer_subset(self, keep: Iterable[int]) -> DecoderForCausalLM:
        """A view that runs only the decoder layers `keep`, sharing every module and weight with this model:
        the draft of self-speculative decoding (layer skipping, as in Draft & Verify). Unlike remove_layers,
        nothing is renumbered: each layer keeps its `layer_idx`, so a KV cache for the view is indexed like
        one for the whole model, and `config` stays the whole model's."""
        n = len(self.model.layers)
        keep = sorted(set(keep))
        if not keep or not set(keep) <= set(range(n)):
            raise ValueError(f"layer_subset needs layer indices in [0, {n}), at least one, got {keep}")
        backbone = object.__new__(type(self.model))
        backbone.__dict__.update(self.model.__dict__)
        backbone._modules = type(self.model._modules)(self.model._modules)  # its own module table
        backbone.layers = nn.ModuleList(self.model.layers[i] for i in keep)
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._modules = type(self._modules)(self._modules)
        view.model = backbone
        view._layer_rope = [self._layer_rope[i] for i in keep]
        return view

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared tensors are counted once
