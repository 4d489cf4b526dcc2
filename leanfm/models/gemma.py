"""Gemma 2 and Gemma 3: sandwich norms around attention and MLP, (1 + w) RMSNorm, scaled embeddings.

Gemma 2 adds attention and final-logit soft-capping; Gemma 3 adds QK-norm and a local RoPE base for
its sliding-window layers. Both follow `ModelConfig.layer_types` for sliding vs global layers.
"""

from __future__ import annotations

from torch import Tensor, nn

from leanfm.models import fusion
from leanfm.models.base import DecoderForCausalLM
from leanfm.models.blocks import Attention, GatedMLP, RMSNorm
from leanfm.models.config import ModelConfig
from leanfm.models.decode_plan import decode_block


class GemmaBlock(nn.Module):
    fused = False

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, offset=True)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=True)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=True)
        self.mlp = GatedMLP(config)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, attn_meta=None) -> Tensor:
        if self.fused:  # a decode step in one kernel call when it applies (leanfm.models.decode_plan)
            y = decode_block(self, x, cos, sin, attn_meta)
            if y is not None:
                return y
        a = self.self_attn(self.input_layernorm(x), cos, sin, positions, attn_meta)
        if self.fused:  # the same sums, each residual add fused with the norms around it
            h, n = fusion.add_norm(x, a, self.post_attention_layernorm, self.pre_feedforward_layernorm)
            return fusion.add_norm(h, self.mlp(n), self.post_feedforward_layernorm, None)[0]
        h = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(h))
        return h + self.post_feedforward_layernorm(m)


class GemmaForCausalLM(DecoderForCausalLM):
    block_cls = GemmaBlock
