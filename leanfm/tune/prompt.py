"""Model-level adapters: prompt tuning and prefix tuning (virtual tokens in front of the input).

Prompt tuning (Lester et al. 2021) prepends n trained vectors to the token embeddings; prefix tuning
(Li & Liang 2021) prepends n trained key/value pairs to every attention layer. In both the real tokens
sit at positions n.., as in the PEFT library (so its adapters load here with the same logits), and
the model still returns hidden states for the real tokens only.

Adding one swaps the model's class in place to `Adapted<Class>` (VirtualTokenHost in front) and
stores the trained tensors under `virtual_tokens.<name>.embedding`, in PEFT's layout:
prompt (n, hidden); prefix (n, layers * 2 * kv_heads * head_dim), i.e. per token, for each layer,
the key then the value, heads then head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leanfm.ops.attention import attention, causal_mask
from leanfm.tune.config import AdapterError
from leanfm.tune.layers import with_mixin

__all__ = ["PrefixEncoder", "PromptEncoder", "VirtualTokenHost", "attach_virtual", "detach_virtual"]


class PromptEncoder(nn.Module):
    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.num_virtual_tokens = n
        self.embedding = nn.Parameter(torch.zeros(n, hidden))


class PrefixEncoder(nn.Module):
    def __init__(self, n: int, layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.num_virtual_tokens, self.shape = n, (layers, kv_heads, head_dim)
        self.embedding = nn.Parameter(torch.zeros(n, layers * 2 * kv_heads * head_dim))

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per layer (keys, values), each (B, kv_heads, n, head_dim)."""
        layers, heads, d = self.shape
        n = self.num_virtual_tokens
        kv = self.embedding.to(dtype).view(n, 2 * layers, heads, d).permute(1, 2, 0, 3)  # (2L, H, n, D)
        return [(kv[2 * i].expand(batch, -1, -1, -1), kv[2 * i + 1].expand(batch, -1, -1, -1))
                for i in range(layers)]


class PrefixAttention:
    """attn_meta for prefix tuning: each layer attends over its prefix keys/values, then the causal input."""

    def __init__(self, kv: list[tuple[Tensor, Tensor]], positions: Tensor):
        self.kv, self.positions = kv, positions  # positions (B, T), already shifted past the prefix

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
               softcap: float | None) -> Tensor:
        pk, pv = self.kv[layer]
        n = pk.shape[2]
        k_pos = torch.cat([torch.arange(n, device=q.device).expand(q.shape[0], n), self.positions], dim=1)
        mask = causal_mask(self.positions, k_pos, window)
        k = torch.cat([pk.to(k.dtype), k], dim=2)
        v = torch.cat([pv.to(v.dtype), v], dim=2)
        return attention(q, k, v, scale, mask, softcap=softcap)


class VirtualTokenHost:
    """Mixin placed before the model's class: runs the active prompt/prefix adapter, if any."""

    virtual_tokens: nn.ModuleDict
    active_adapter: str | None = None
    _prompt_rows: Tensor | None = None

    def active_encoder(self) -> nn.Module | None:
        name = self.active_adapter
        return self.virtual_tokens[name] if name is not None and name in self.virtual_tokens else None

    def forward(self, input_ids: Tensor, positions: Tensor, attn_meta: object | None = None) -> Tensor:
        enc = self.active_encoder()
        if enc is None:
            return super().forward(input_ids, positions, attn_meta)
        if attn_meta is not None:
            raise AdapterError(f"adapter {self.active_adapter!r} ({type(enc).__name__}) cannot run with a KV "
                               "cache yet; score or train with attn_meta=None")
        b, n = input_ids.shape[0], enc.num_virtual_tokens
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(b, -1)
        shifted = positions + n
        if isinstance(enc, PrefixEncoder):
            kv = enc.key_values(b, self.model.norm.weight.dtype)
            return super().forward(input_ids, shifted, PrefixAttention(kv, shifted))
        virtual = torch.arange(n, device=positions.device).expand(b, n)
        self.__dict__["_prompt_rows"] = enc.embedding  # read by embed() during this call only
        try:
            hidden = super().forward(input_ids, torch.cat([virtual, shifted], dim=1))
        finally:
            self.__dict__["_prompt_rows"] = None
        return hidden[:, n:]

    def embed(self, input_ids: Tensor) -> Tensor:
        h = super().embed(input_ids)
        if self._prompt_rows is None:
            return h
        prompt = self._prompt_rows.to(h.dtype).expand(h.shape[0], -1, -1)
        return torch.cat([prompt, h], dim=1)


def attach_virtual(model: nn.Module, name: str, encoder: nn.Module) -> None:
    if not isinstance(model, VirtualTokenHost):
        model.__class__ = with_mixin(VirtualTokenHost, type(model))
        model.virtual_tokens = nn.ModuleDict()
    model.virtual_tokens[name] = encoder


def detach_virtual(model: nn.Module, name: str) -> None:
    del model.virtual_tokens[name]
    if model.active_adapter == name:
        model.active_adapter = None
    if not len(model.virtual_tokens):
        del model.virtual_tokens
        model.__dict__.pop("active_adapter", None)
        model.__class__ = type(model).__bases__[1]
