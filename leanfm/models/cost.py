"""Analytic cost of a decoder: parameters and bytes per component, FLOPs per token, KV-cache bytes.

The survey's cost breakdown (Xu et al., section 2.1.3): where a model's weights sit (embedding,
attention, FFN, norms, LM head) and what one token of inference costs in compute and memory traffic.
Pure functions of a ModelConfig; `leanfm info` prints them and the engine's measured KV bytes are
checked against `kv_bytes_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanfm.models.config import ModelConfig


@dataclass(frozen=True)
class ParamBreakdown:
    embedding: int
    attention: int
    ffn: int
    norms: int
    head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.ffn + self.norms + self.head

    def as_dict(self) -> dict[str, int]:
        return {"embedding": self.embedding, "attention": self.attention, "ffn": self.ffn,
                "norms": self.norms, "head": self.head}


def param_breakdown(c: ModelConfig) -> ParamBreakdown:
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    attn = h * q + 2 * h * kv + q * h
    if c.attention_bias:
        attn += q + 2 * kv
    if c.qk_norm:
        attn += 2 * d
    ffn = 3 * h * c.intermediate_size
    norms_per_layer = 4 if c.is_gemma else 2
    norms = c.num_hidden_layers * norms_per_layer * h + h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return ParamBreakdown(
        embedding=c.vocab_size * h,
        attention=c.num_hidden_layers * attn,
        ffn=c.num_hidden_layers * ffn,
        norms=norms,
        head=head,
    )


def weight_bytes_read_per_token(c: ModelConfig, bytes_per_param: float) -> float:
    """Bytes of weights a batch-1 decode step reads: every matrix once (the embedding row is negligible).

    A tied LM head is read in full by the output projection even though it is stored once.
    """
    p = param_breakdown(c)
    return (p.attention + p.ffn + p.norms + c.vocab_size * c.hidden_size) * bytes_per_param


def flops_per_token(c: ModelConfig, context: int = 0) -> int:
    """Forward FLOPs for one token at a given context length: 2 per matmul weight, plus attention.

    Attention scores and the weighted sum cost 2 * 2 * heads * head_dim FLOPs per visible key;
    sliding-window layers see at most `sliding_window` keys.
    """
    p = param_breakdown(c)
    matmul = 2 * (p.attention - (2 * c.head_dim if c.qk_norm else 0) + p.ffn + c.vocab_size * c.hidden_size)
    attn = 0
    for i in range(c.num_hidden_layers):
        keys = context + 1
        if c.layer_is_sliding(i):
            keys = min(keys, c.sliding_window)
        attn += 4 * c.num_attention_heads * c.head_dim * keys
    return matmul + attn


def kv_bytes(c: ModelConfig, context: int, bytes_per_elem: int = 4, chunk: int = 0) -> int:
    """KV-cache bytes to hold `context` tokens, with sliding-window layers keeping only their window.

    chunk > 0: prefill runs in chunks of that many tokens (the serving engine), so a sliding layer also
    holds the chunk being computed: window - 1 + chunk tokens (before rounding up to whole blocks)."""
    per_layer_token = 2 * c.num_key_value_heads * c.head_dim * bytes_per_elem
    total = 0
    for i in range(c.num_hidden_layers):
        tokens = context
        if c.layer_is_sliding(i):
            tokens = min(context, c.sliding_window + max(0, chunk - 1))
        total += tokens * per_layer_token
    return total


def kv_bytes_per_token(c: ModelConfig, bytes_per_elem: int = 4) -> int:
    """KV-cache bytes one more token adds when every layer keeps it (short contexts)."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * bytes_per_elem
