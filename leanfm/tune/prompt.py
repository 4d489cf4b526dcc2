"""Model-level adapters: prompt tuning and prefix tuning (virtual tokens in front of the input).

Prompt tuning (Lester et al. 2021) prepends n trained vectors to the token embeddings; prefix tuning
(Li & Liang 2021) prepends n trained key/value pairs to every attention layer. In both the real tokens
sit at positions n.., as in the PEFT library (so its adapters load here with the same logits), and
the model still returns hidden states for the real tokens only.

Adding one swaps the model's class in place to `Adapted<Class>` (VirtualTokenHost in front) and
stores the trained tensors under `virtual_tokens.<name>.embedding`, in PEFT's layout:
prompt (n, hidden); prefix (n, layers * 2 * kv_heads * head_dim), i.e. per token, for each layer,
the key then the value, heads then head_dim.

With a KV cache (generation: leanfm.engine's Generator and serving engine) the virtual tokens hold real
cache positions 0..n-1: the caller puts n placeholder ids there (and says so with the attention meta's
`virtual_tokens = n`), and the model fills those rows by position. Prompt tuning embeds a row at
position p < n as the virtual vector p (unscaled, as in scoring); prefix tuning replaces, in every
attention layer, the keys/values of such rows by the prefix's before they are cached (the rows' own
outputs are never read). Rows at positions >= n run the plain model, so decode steps are unchanged
and a prefix cache shares the virtual tokens' KV between requests.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from leanfm.models.interface import KVCacheMeta
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


class VirtualPrefixMeta:
    """Wraps a step's cache meta (KVCacheMeta or the engine's paged meta) for prefix tuning: the keys/values
    of the rows at positions < n become the prefix's for the layer, then the wrapped meta caches and attends."""

    def __init__(self, inner: object, encoder: PrefixEncoder, virtual: Tensor, index: Tensor, positions: Tensor):
        self.inner, self.virtual, self.index, self.positions = inner, virtual, index, positions  # (B, T) each
        layers, heads, d = encoder.shape
        n = encoder.num_virtual_tokens
        self.kv = encoder.embedding.view(n, 2 * layers, heads, d).permute(1, 2, 0, 3)  # (2L, Hkv, n, D)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
               softcap: float | None) -> Tensor:
        rows = self.virtual[:, None, :, None]  # (B, 1, T, 1) against k, v (B, Hkv, T, D)
        k = torch.where(rows, self.kv[2 * layer].to(k.dtype)[:, self.index].transpose(0, 1), k)
        v = torch.where(rows, self.kv[2 * layer + 1].to(v.dtype)[:, self.index].transpose(0, 1), v)
        if not isinstance(self.inner, KVCacheMeta):
            return self.inner.attend(layer, q, k, v, scale, window, softcap)
        k, v, first = self.inner.write_and_read(layer, k, v, window)  # as blocks.Attention does
        k_pos = torch.arange(first, first + k.shape[2], device=q.device)
        return attention(q, k, v, scale, causal_mask(self.positions, k_pos, window), softcap=softcap)


class VirtualTokenHost:
    """Mixin placed before the model's class: runs the active prompt/prefix adapter, if any."""

    virtual_tokens: nn.ModuleDict
    active_adapter: str | None = None
    _prompt_rows: Tensor | None = None
    _virtual_rows: tuple[Tensor, Tensor, Tensor] | None = None  # cached path: (vectors, rows (B, T), index)

    def active_encoder(self) -> nn.Module | None:
        name = self.active_adapter
        return self.virtual_tokens[name] if name is not None and name in self.virtual_tokens else None

    @property
    def num_virtual_tokens(self) -> int:
        """The placeholder positions a KV cache must hold in front of every prompt (0: no adapter active)."""
        enc = self.active_encoder()
        return 0 if enc is None else enc.num_virtual_tokens

    def forward(self, input_ids: Tensor, positions: Tensor, attn_meta: object | None = None) -> Tensor:
        enc = self.active_encoder()
        if enc is None:
            return super().forward(input_ids, positions, attn_meta)
        if attn_meta is not None:
            return self._forward_cached(enc, input_ids, positions, attn_meta)
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

    def _forward_cached(self, enc: nn.Module, input_ids: Tensor, positions: Tensor, attn_meta: object) -> Tensor:
        n = enc.num_virtual_tokens
        held = getattr(attn_meta, "virtual_tokens", 0)
        if held != n:
            raise AdapterError(f"adapter {self.active_adapter!r} ({type(enc).__name__}) needs its {n} virtual tokens "
                               f"at KV-cache positions 0..{n - 1} but this cache has {held}; generate with "
                               "leanfm.engine (LLM, Generator), or score with attn_meta=None")
        pos = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        virtual = pos < n
        if not bool(virtual.any()):  # decode steps and the rest of a prompt: the plain model
            return super().forward(input_ids, positions, attn_meta)
        index = pos.clamp(max=n - 1)
        if isinstance(enc, PrefixEncoder):
            return super().forward(input_ids, positions, VirtualPrefixMeta(attn_meta, enc, virtual, index, pos))
        self.__dict__["_virtual_rows"] = (enc.embedding, virtual, index)  # read by embed() during this call only
        try:
            return super().forward(input_ids, positions, attn_meta)
        finally:
            self.__dict__["_virtual_rows"] = None

    def embed(self, input_ids: Tensor) -> Tensor:
        h = super().embed(input_ids)
        if self._virtual_rows is not None:
            vectors, rows, index = self._virtual_rows
            return torch.where(rows.unsqueeze(-1), vectors.to(h.dtype)[index], h)
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
