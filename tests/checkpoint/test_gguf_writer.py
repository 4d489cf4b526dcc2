"""GGUF writer (leanfm.checkpoint.gguf_writer): round trips through leanfm's reader, bit-equality with the
llama.cpp-style oracle writer of gguf_model_helpers.py, tokenizer fields and errors, and (integration) a written
SmolLM2 file read back by transformers' own GGUF loader.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf_model_helpers import (
    compare_with_transformers,
    random_hf_state_dict,
    small_config,
    smollm2_path,
    tokens_for,
    write_gguf_like_llamacpp,
)

from leanfm.checkpoint.gguf_reader import gguf_metadata, load_gguf_state_dict, read_gguf_config
from leanfm.checkpoint.gguf_writer import write_gguf
from leanfm.models.config import RopeScaling
from leanfm.utils.errors import CheckpointError

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


# --- integration: a written file read back by transformers' own GGUF loader ----------------
@pytest.mark.integration
def test_written_gguf_loads_in_transformers(tmp_path):
    """Our writer's output, read by transformers' GGUF loader, gives back the same (F16-rounded) weights."""
    path = smollm2_path()
    c = read_gguf_config(path)
    sd = load_gguf_state_dict(path)
    out = write_gguf(tmp_path / "smol-f16.gguf", c, sd, qtype="F16")
    rounded = {k: v.half().float() if v.dim() == 2 else v for k, v in sd.items()}
    compare_with_transformers(out, rounded)
