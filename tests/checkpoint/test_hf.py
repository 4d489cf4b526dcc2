"""leanfm.checkpoint.hf: config conversion both ways, sharded and multimodal loads, errors, atomic saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VARIANTS, make_hf_model, make_tiny_config, make_tiny_model, randomize_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from leanfm.checkpoint.hf import (
    config_from_hf,
    config_to_hf,
    load_hf_dir,
    load_model_from_hf_dir,
    save_hf_dir,
)
from leanfm.models import RopeScaling
from leanfm.utils.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model, ids=IDS):
    return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_config_round_trip(variant):
    cfg = make_tiny_config(variant)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg, torch.bfloat16)))) == cfg


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_config_to_hf_is_what_transformers_reads(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = make_tiny_config(variant)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.float32)))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.architectures == [config_to_hf(cfg)["architectures"][0]]
    assert config_from_hf(hf.to_dict()) == cfg  # nothing lost in transformers' own normalisation


def test_legacy_4x_configs():
    """Hub configs written by transformers 4.x: rope_theta/rope_scaling/rope_local_base_freq keys."""
    gemma270m = config_from_hf({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": None, "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "hidden_activation": "gelu_pytorch_tanh", "eos_token_id": [1, 106], "torch_dtype": "bfloat16"})
    assert gemma270m.family == "gemma3" and gemma270m.qk_norm and gemma270m.tie_word_embeddings
    assert [i for i, t in enumerate(gemma270m.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert gemma270m.rope_local_base_freq == 10000.0 and gemma270m.eos_token_id == (1, 106)

    # Gemma 3 4B: multimodal, a partial text_config relying on Gemma3TextConfig defaults
    g4b = config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                          "eos_token_id": [1, 106], "text_config": {
                              "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                              "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "sliding_window": 1024}, "vision_config": {"model_type": "siglip_vision_model"}})
    assert (g4b.num_attention_heads, g4b.head_dim, g4b.vocab_size) == (8, 256, 262208)
    assert g4b.rope_scaling == RopeScaling("linear", factor=8.0) and g4b.eos_token_id == (1, 106)

    llama32 = config_from_hf({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
                              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "rope_theta": 500000.0, "tie_word_embeddings": True,
                              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
    assert llama32.head_dim == 64 and llama32.rope_scaling.rope_type == "llama3" and llama32.rope_theta == 5e5

    qwen25 = config_from_hf({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
                             "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                             "num_key_value_heads": 2, "use_sliding_window": False, "sliding_window": 32768,
                             "max_window_layers": 21, "rope_theta": 1000000.0})
    assert qwen25.sliding_window is None and qwen25.layer_types == () and qwen25.attention_bias

    mistral = config_from_hf({"architectures": ["MistralForCausalLM"], "vocab_size": 32768, "hidden_size": 4096,
                              "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "sliding_window": None, "rope_theta": 1e6})
    assert mistral.family == "mistral" and mistral.sliding_window is None  # explicit null: no window

    gemma2 = config_from_hf({"model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 4096})
    assert gemma2.layer_types[:2] == ("sliding_attention", "full_attention")
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0)


@pytest.mark.parametrize("hf, needle", [
    ({"model_type": "gpt2", "n_embd": 64}, "supported"),
    ({"architectures": ["FancyForCausalLM"]}, "supported"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}, "multiple"),
])
def test_config_errors_say_what_is_wrong(hf, needle):
    with pytest.raises(CheckpointError, match=needle) as e:
        config_from_hf(hf)
    assert "\n" not in str(e.value)
    if needle == "supported":
        assert "gemma3" in str(e.value) and "qwen3" in str(e.value)


# --- load -------------------------------------------------------------------------------------
def test_sharded_dir_loads(tmp_path):
    hf = make_hf_model("qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = load_model_from_hf_dir(tmp_path)
    with torch.no_grad():
        ref = hf(IDS).logits
    assert (logits(model) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_gemma3_text_weights_load(tmp_path, prefix):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                         query_pre_attn_scalar=16),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126)
    hf = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    hf = randomize_weights(hf, 0, offset_norms=True).eval()
    hf.save_pretrained(tmp_path)
    # re-spell the text weights with the prefix under test (transformers 5 vs 4.x layouts)
    state = load_file(tmp_path / "model.safetensors")
    state = {(prefix + k.split(".model.", 1)[1] if k.startswith("language_model.model.") else k): v
             for k, v in state.items()}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model_from_hf_dir(tmp_path)
    assert model.config.family == "gemma3" and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        ref = hf(input_ids=IDS).logits
    assert (logits(model) - ref).abs().max() <= 1e-4


def test_load_hf_dir_casts_and_names(tmp_path):
    save_hf_dir(make_tiny_model("gemma3"), tmp_path / "g3")
    config, state = load_hf_dir(tmp_path / "g3", dtype=torch.bfloat16)
    assert config.name == "g3" and "lm_head.weight" not in state
    assert all(t.dtype == torch.bfloat16 for t in state.values())


def test_tied_model_loads_tied_and_real(tmp_path):
    src = make_tiny_model("gemma2")
    model = load_model_from_hf_dir(save_hf_dir(src, tmp_path / "m"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(logits(model), logits(src))


def _expect(path, *needles):
    with pytest.raises(CheckpointError) as e:
        load_model_from_hf_dir(path)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_load_errors_are_helpful(tmp_path):
    _expect(tmp_path / "nope", "no such model directory")
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "no config.json")
    save_hf_dir(make_tiny_model("llama"), tmp_path / "ok")
    cfg = (tmp_path / "ok" / "config.json").read_text()

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(cfg)
    _expect(tmp_path / "noweights", "no model.safetensors", "add the model's weights")
    (tmp_path / "noweights" / "pytorch_model.bin").write_bytes(b"")
    _expect(tmp_path / "noweights", "convert them to safetensors")

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    _expect(tmp_path / "bad", "invalid JSON")

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "config.json").write_text(cfg)
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    _expect(tmp_path / "shards", "missing", "model-00001-of-00002.safetensors")

    (tmp_path / "ok" / "config.json").write_text(cfg.replace('"intermediate_size": 128', '"intermediate_size": 96'))
    _expect(tmp_path / "ok", "shapes do not match config.json")
    (tmp_path / "ok" / "config.json").write_text(cfg.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    _expect(tmp_path / "ok", "missing", "model.layers.2.")

    (tmp_path / "ok" / "config.json").write_text(cfg)
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    _expect(tmp_path / "ok", "unreadable safetensors")


# --- save -------------------------------------------------------------------------------------
class FakeTokenizer:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_hf_dir(self, path: Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")


def test_save_writes_a_complete_dir(tmp_path):
    model = make_tiny_model("llama")
    out = save_hf_dir(model, tmp_path / "a" / "b", tokenizer=FakeTokenizer(), dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == hf["torch_dtype"] == "bfloat16" and hf["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()  # untied: the head is its own tensor
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    tied = save_hf_dir(make_tiny_model("qwen2"), tmp_path / "tied")
    with safe_open(tied / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_save_is_atomic_and_never_clobbers(tmp_path):
    model = make_tiny_model("qwen3")
    dest = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_hf_dir(model, dest, tokenizer=FakeTokenizer(fail=True))
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temp dir is left

    dest.mkdir()  # an empty destination is fine
    save_hf_dir(model, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(CheckpointError, match="overwrite=True"):
        save_hf_dir(make_tiny_model("qwen3", seed=1), dest)
    with pytest.raises(OSError):
        save_hf_dir(make_tiny_model("qwen3", seed=1), dest, tokenizer=FakeTokenizer(fail=True), overwrite=True)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before  # failed overwrite kept the old dir
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    save_hf_dir(make_tiny_model("qwen3", seed=1), dest, overwrite=True)
    assert (dest / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_hf_dir(model, tmp_path / "file", overwrite=True)
