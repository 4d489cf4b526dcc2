"""Shared fixtures: tiny configs of every supported family and tiny random-weight leanfm models.

    def test_x(tiny_config, tiny_model):
        cfg = tiny_config("gemma3")                 # a ModelConfig; overrides: tiny_config("llama", num_hidden_layers=3)
        model = tiny_model("qwen3", seed=1)         # a leanfm model in eval mode, random weights
        oracle = hf_model("qwen3", seed=1)          # its transformers twin (skips without transformers)

Variants (TINY_VARIANTS) are the family names plus `llama3_rope` (Llama 3 rope_scaling) and
`gemma3_scaled` (linear RoPE scaling on Gemma 3's global layers). Each has GQA (4 query heads, 2 kv
heads), hidden 64, vocab 128; the sliding-window ones use a window of 8 so a 24-token input crosses it.
`randomize_weights(module, seed, offset_norms)` also works on a transformers model (same names).
Plain functions (make_tiny_config, make_tiny_model, make_hf_model) serve module-scoped fixtures:
`from conftest import make_hf_model` works because the tests directories have no __init__.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leanfm.models import ModelConfig, RopeScaling, build_model
from leanfm.ops import kernels

WINDOW = 8
_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=(2,),
             pad_token_id=0)
_GEMMA = dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=WINDOW)
_GEMMA3_LAYERS = ("sliding_attention",) * 5 + ("full_attention",)
TINY_VARIANTS: dict[str, dict] = {
    "llama": dict(family="llama"),
    "llama3_rope": dict(family="llama", rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)),
    "mistral": dict(family="mistral", sliding_window=WINDOW, layer_types=("sliding_attention",) * 2),
    "qwen2": dict(family="qwen2", attention_bias=True, tie_word_embeddings=True, num_hidden_layers=3,
                  sliding_window=WINDOW, layer_types=("full_attention",) * 2 + ("sliding_attention",)),
    "qwen3": dict(family="qwen3", qk_norm=True, head_dim=32, rope_theta=1_000_000.0),
    "gemma2": dict(family="gemma2", **_GEMMA, layer_types=("sliding_attention", "full_attention"),
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=15.0),
    "gemma3": dict(family="gemma3", **_GEMMA, num_hidden_layers=6, layer_types=_GEMMA3_LAYERS, qk_norm=True,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=32),
    "gemma3_scaled": dict(family="gemma3", **_GEMMA, num_hidden_layers=6, layer_types=_GEMMA3_LAYERS,
                          qk_norm=True, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                          query_pre_attn_scalar=16, rope_scaling=RopeScaling("linear", factor=8.0)),
}


# the same variants as transformers configs, written the way hub configs spell them (legacy rope_theta /
# rope_scaling / rope_local_base_freq keys, derived layer_types), independent of leanfm's converter
_HF_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
_HF_GEMMA = dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=WINDOW)
HF_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True,
                                  sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1_000_000.0)),
    "gemma2": ("Gemma2Config", dict(**_HF_GEMMA, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=15.0)),
    "gemma3": ("Gemma3TextConfig", dict(**_HF_GEMMA, num_hidden_layers=6, query_pre_attn_scalar=32,
                                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)),
    "gemma3_scaled": ("Gemma3TextConfig", dict(**_HF_GEMMA, num_hidden_layers=6, query_pre_attn_scalar=16,
                                               rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                                               rope_scaling=dict(rope_type="linear", factor=8.0))),
}
assert set(HF_CONFIGS) == set(TINY_VARIANTS)


def make_tiny_config(variant: str = "llama", **overrides) -> ModelConfig:
    if variant not in TINY_VARIANTS:
        raise KeyError(f"unknown tiny variant {variant!r}; use one of {sorted(TINY_VARIANTS)}")
    return ModelConfig(**{**_BASE, **TINY_VARIANTS[variant], **overrides})


@torch.no_grad()
def randomize_weights(module: nn.Module, seed: int = 0, offset_norms: bool = False) -> nn.Module:
    """Random weights that exercise every code path: norms away from their init (w ~ 1 + 0.3 N, or
    0.3 N for Gemma's (1 + w) norms), unit-variance embeddings, fan-in-scaled projections, biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            r = (0.0 if offset_norms else 1.0) + 0.3 * r
        elif name.endswith("bias"):
            r = 0.3 * r
        elif "embed_tokens" not in name and p.dim() == 2:
            r = r / math.sqrt(p.shape[1])
        p.copy_(r.to(p.dtype))
    return module


def make_tiny_model(variant: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    config = make_tiny_config(variant, **overrides)
    model = randomize_weights(build_model(config), seed, offset_norms=config.is_gemma)
    return model.to(dtype).eval()


def make_hf_model(variant: str = "llama", seed: int = 0, **overrides):
    """The transformers twin of make_tiny_model (eager attention, fp32, random weights): the oracle.
    `overrides` are transformers config kwargs."""
    transformers = pytest.importorskip("transformers")
    cls_name, kw = HF_CONFIGS[variant]
    cfg = getattr(transformers, cls_name)(**{**_HF_COMMON, **kw, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return randomize_weights(model, seed, offset_norms=variant.startswith("gemma")).eval()


@pytest.fixture
def tiny_config():
    """Factory: tiny_config(variant="llama", **overrides) -> ModelConfig."""
    return make_tiny_config


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(variant="llama", seed=0, dtype=torch.float32, **overrides) -> leanfm model."""
    return make_tiny_model


@pytest.fixture
def hf_model():
    """Factory: hf_model(variant="llama", seed=0, **hf_overrides) -> transformers *ForCausalLM (eager, fp32)."""
    return make_hf_model


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module: tiny models gain nothing from intra-op threads, and on a busy
    2-core machine OpenMP contention makes them 5-10x slower. Use: pytestmark = usefixtures(...)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_variant(request) -> str:
    """Parametrizes a test over every tiny variant name."""
    return request.param


def make_byte_tokenizer():
    """A leanfm Tokenizer over bytes: 256 byte-level tokens + <pad> <bos> <eos> <end_of_turn>, BOS prepended,
    a ChatML-like template. Vocab 260; pair it with make_tiny_model(..., **BYTE_VOCAB)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors

    from leanfm.checkpoint.gguf_tokenizer import byte_level_alphabet
    from leanfm.checkpoint.tokenizer import Tokenizer

    alphabet = sorted(byte_level_alphabet().values())
    specials = ["<pad>", "<bos>", "<eos>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<end_of_turn>"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    return Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, template)


BYTE_VOCAB = dict(vocab_size=260, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An HF directory holding a tiny random gemma3 model with the byte tokenizer (what `--model` takes)."""
    from leanfm.checkpoint.hf import save_hf_dir

    model = make_tiny_model("gemma3", seed=0, **BYTE_VOCAB)
    return save_hf_dir(model, tmp_path_factory.mktemp("models") / "tiny-gemma3", tokenizer=make_byte_tokenizer())


@pytest.fixture(scope="module")
def built():
    """torch.ops.leanfm_kernels, built on first use; the test is skipped (with the reason) where the C++
    kernels are disabled or cannot be built. tests/ops modules with their own availability test
    (sparse, paged decode) override it."""
    if not kernels.kernels_enabled():
        pytest.skip("leanfm C++ kernels disabled by LEANFM_KERNELS=0")
    if not kernels.kernels_available():
        pytest.skip(f"leanfm C++ kernels unavailable: {kernels.status().get('error')}")
    return torch.ops.leanfm_kernels


@pytest.fixture
def env_settings(monkeypatch):
    """Set LEANFM_KERNELS* for one test; settings are re-read before and after."""

    def set_env(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        kernels.reload_settings()

    yield set_env
    monkeypatch.undo()
    kernels.reload_settings()
