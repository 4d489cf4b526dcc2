"""Llama 2/3, Mistral, SmolLM, Qwen 2/2.5 (qkv bias) and Qwen 3 (QK-norm): pre-norm decoder blocks."""

from __future__ import annotations

from torch import Tensor, nn

from leanfm.models import fusion
from leanfm.models.base import DecoderForCausalLM
from leanfm.models.blocks import Attention, GatedMLP, RMSNorm
from leanfm.models.config import ModelConfig
from leanfm.models.decode_plan import decode_block


class LlamaBlock(nn.Module):
    fused = False

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, attn_meta=None) -> Tensor:
        if self.fused:  # a decode step in one kernel call when it applies (leanfm.models.decode_plan)
            y = decode_block(self, x, cos, sin, attn_meta)
            if y is not None:
                return y
        a = self.self_attn(self.input_layernorm(x), cos, sin, positions, attn_meta)
        if self.fused:  # the residual add fused with the next norm
            h, n = fusion.add_norm(x, a, None, self.post_attention_layernorm)
            return h + self.mlp(n)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(DecoderForCausalLM):
    block_cls = LlamaBlock
