"""Building blocks shared by the decoder families: RMSNorm, gated MLP and attention with a KV cache.

Modules with a `fused` flag (False unless leanfm.models.fusion.use_fused / prepare_for_inference set
it) run their decode-time fused paths (leanfm.models.fusion) when set; unset, they are plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanfm.models import fusion
from leanfm.models.config import ModelConfig
from leanfm.models.interface import KVCacheMeta
from leanfm.ops.attention import attention, causal_mask
from leanfm.ops.kernels import fused as fused_ops
from leanfm.ops.norm import rms_norm, rms_norm_offset
from leanfm.ops.rope import apply_rope


class RMSNorm(nn.Module):
    """`offset=True` is Gemma's form: the stored weight w scales by (1 + w)."""

    fused = False

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return fused_ops.rms_norm(x, self.weight, self.eps, self.offset)
        fn = rms_norm_offset if self.offset else rms_norm
        return fn(x, self.weight, self.eps)


_ACT = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    fused = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.act_name = config.hidden_act
        self.act = _ACT[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self.down_proj(fusion.gated_mlp_hidden(self, x))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    fused = False

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.attn_scale
        self.softcap = c.attn_logit_softcapping
        self.window = c.sliding_window if c.layer_is_sliding(layer_idx) else None
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, offset=c.is_gemma)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, offset=c.is_gemma)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, attn_meta=None) -> Tensor:
        b, t, _ = x.shape
        if self.fused:
            q, k, v = fusion.linears(x, self.q_proj, self.k_proj, self.v_proj)
            q, k = fusion.norm_rope(self, q.view(b, t, self.n_heads, self.head_dim),
                                    k.view(b, t, self.n_kv, self.head_dim), cos, sin)  # (B, H, T, D)
            v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            attend = fusion.attention
        else:
            q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
            v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
            k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
            attend = attention

        if attn_meta is None:
            mask = causal_mask(positions, positions, self.window) if self.window else None
            out = attend(q, k, v, self.scale, mask, is_causal=True, softcap=self.softcap)
        elif isinstance(attn_meta, KVCacheMeta):
            k, v, first = attn_meta.write_and_read(self.layer_idx, k, v, self.window)
            mask = None
            if t > 1 or (self.window is not None and k.shape[2] > self.window):
                k_pos = torch.arange(first, first + k.shape[2], device=x.device)
                mask = causal_mask(positions, k_pos, self.window)
            out = attend(q, k, v, self.scale, mask, softcap=self.softcap)
        else:
            out = attn_meta.attend(self.layer_idx, q, k, v, self.scale, self.window, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
