import pytest

from leanfm.models import ModelConfig, build_model
from leanfm.models.cost import flops_per_token, kv_bytes, kv_bytes_per_token, param_breakdown
from leanfm.models.report import format_info

GEMMA3_270M = ModelConfig(
    family="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
    layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)),
    qk_norm=True, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", rope_theta=1e6,
    rope_local_base_freq=1e4, query_pre_attn_scalar=256, max_position_embeddings=32768,
)


def tiny(family, **kw):
    base = dict(family=family, vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("cfg", [
    tiny("llama"), tiny("llama", tie_word_embeddings=True), tiny("qwen2", attention_bias=True),
    tiny("qwen3", qk_norm=True), tiny("gemma3", qk_norm=True, tie_word_embeddings=True),
    tiny("gemma2", tie_word_embeddings=True),
])
def test_breakdown_equals_real_parameter_count(cfg):
    model = build_model(cfg, device="meta")
    assert param_breakdown(cfg).total == sum(p.numel() for p in model.parameters())


def test_gemma3_270m_known_figures():
    p = param_breakdown(GEMMA3_270M)
    assert p.embedding == 167_772_160  # 168M of the 268M are the embedding / head
    assert 268_000_000 < p.total < 268_200_000
    assert p.head == 0
    # 18 layers x 1 KV head x 256 dims x (k, v) x 4 bytes
    assert kv_bytes_per_token(GEMMA3_270M, 4) == 18 * 256 * 2 * 4
    # at 1k context: 3 global layers keep 1024 tokens, 15 sliding layers keep 512
    assert kv_bytes(GEMMA3_270M, 1024, 4) == (3 * 1024 + 15 * 512) * 256 * 2 * 4
    # the serving engine's chunked prefill: a sliding layer also holds the chunk (window - 1 + chunk keys)
    assert kv_bytes(GEMMA3_270M, 4096, 4, chunk=512) == (3 * 4096 + 15 * 1023) * 256 * 2 * 4
    assert kv_bytes(GEMMA3_270M, 600, 4, chunk=512) == 18 * 600 * 256 * 2 * 4
    assert flops_per_token(GEMMA3_270M, 1024) > flops_per_token(GEMMA3_270M, 0)


def test_format_info_mentions_components():
    text = format_info(GEMMA3_270M, "float32", "gemma-3-270m")
    for word in ("embedding", "attention", "ffn", "norms", "head", "FLOPs/token", "KV cache", "per 1k"):
        assert word in text


def test_format_info_engine_kv_line():
    plain = format_info(GEMMA3_270M, "float32", "gemma-3-270m")
    text = format_info(GEMMA3_270M, "float32", "gemma-3-270m", engine_chunk=512)
    assert "serving engine" not in plain and "prefill chunks of 512 tokens" in text
    expected = (3 * 8192 + 15 * 1023) * 256 * 2 * 4
    assert f"{expected / 2**20:.1f} MiB per 8k" in text
