"""GGUF <-> Hugging Face name tables and llama.cpp conventions, as data.

GGUF tensor names are `<base>.<suffix>` with suffix `weight` or `bias`; per-layer ones are
`blk.<i>.<base>`. The reader and writer translate names only through these tables.
"""

from __future__ import annotations

# GGUF `general.architecture` -> leanfm family. llama.cpp files Mistral under "llama".
ARCH_FAMILY: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(ARCH_FAMILY)

# leanfm family -> GGUF architecture (for writing)
FAMILY_ARCH: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
}

GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# blk.{i}.<gguf> -> model.layers.{i}.<hf>, for llama-style pre-norm blocks (Llama, Mistral, Qwen 2/3)
LLAMA_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma's sandwich norms: llama.cpp's `ffn_norm` is the *pre*-feed-forward norm here.
GEMMA_BLOCK_NAMES: dict[str, str] = {
    **LLAMA_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

BLOCK_NAMES: dict[str, dict[str, str]] = {
    "llama": LLAMA_BLOCK_NAMES,
    "qwen2": LLAMA_BLOCK_NAMES,
    "qwen3": LLAMA_BLOCK_NAMES,
    "gemma2": GEMMA_BLOCK_NAMES,
    "gemma3": GEMMA_BLOCK_NAMES,
}

# Tensors that are not weights (RoPE frequency factors, legacy rotary caches): read, never loaded.
SKIP_GLOBAL: frozenset[str] = frozenset({"rope_freqs", "rope_factors_long", "rope_factors_short"})
SKIP_BLOCK: frozenset[str] = frozenset({"attn_rot_embd"})

# convert_hf_to_gguf permutes q/k rows for llama.cpp's interleaved ("normal") RoPE on these archs;
# the others use NeoX (rotate-half) RoPE in llama.cpp and are stored unpermuted.
PERMUTE_QK_ARCHS: frozenset[str] = frozenset({"llama"})

# convert_hf_to_gguf stores Gemma RMSNorm weights as (w + 1); HF and leanfm keep w (scale is 1 + w).
# Applies to every tensor whose base name ends in "norm" (as transformers' Gemma2TensorProcessor does).
NORM_SHIFT: dict[str, float] = {"gemma2": 1.0, "gemma3": 1.0}

HIDDEN_ACT: dict[str, str] = {
    "llama": "silu",
    "qwen2": "silu",
    "qwen3": "silu",
    "gemma2": "gelu_pytorch_tanh",
    "gemma3": "gelu_pytorch_tanh",
}

# Constants llama.cpp hardcodes rather than reads from the file (src/llama-model.cpp).
GEMMA3_SLIDING_PATTERN = 6  # layer i slides unless (i + 1) % 6 == 0
GEMMA2_SLIDING_PATTERN = 2  # even layers slide
GEMMA3_LOCAL_ROPE_BASE = 10000.0
# 27B models scale attention by (hidden / heads) ** -0.5 instead of head_dim ** -0.5
GEMMA_27B_LAYERS: dict[str, int] = {"gemma2": 46, "gemma3": 62}
LLAMA3_ORIGINAL_CONTEXT = 8192  # convert_hf_to_gguf's default original_max_position_embeddings

# Token texts llama.cpp treats as end-of-generation besides tokenizer.ggml.eos_token_id.
EOG_TOKEN_TEXTS: tuple[str, ...] = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>")
