"""GGUF export of float and compressed models: the gguf package reads the tensors back, leanfm's reader
gives the same logits, structured pruning writes the real shapes, and (integration) llama.cpp agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model
from typer.testing import CliRunner

from leanfm.checkpoint.gguf_export import dense_model, dense_state_dict, export_gguf
from leanfm.checkpoint.gguf_reader import load_gguf_state_dict, read_gguf_config
from leanfm.checkpoint.loader import model_from_state_dict
from leanfm.compress import Recipe, Step, compress_, config_from_dict
from leanfm.utils.errors import CheckpointError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.usefixtures("single_thread")


GEMMA = dict(query_pre_attn_scalar=16)  # GGUF has no query_pre_attn_scalar: llama.cpp uses head_dim


def tiny(variant, seed, **kw):
    return make_tiny_model(variant, seed=seed, **(GEMMA if variant == "gemma3" else {}), **kw)


def logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def read_back(path):
    config = read_gguf_config(path)
    return model_from_state_dict(config, load_gguf_state_dict(path, config, progress=False)).eval()


def tensors(path) -> dict[str, tuple[tuple[int, ...], object]]:
    r = gguf.GGUFReader(str(path))
    return {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in r.tensors}


@pytest.mark.parametrize("variant", ["gemma3", "llama"])
def test_float_f16_tensors_and_round_trip(tmp_path, variant):
    model = tiny(variant, 1, **BYTE_VOCAB)
    path = export_gguf(model, make_byte_tokenizer(), tmp_path / "m.gguf", "f16")
    t = tensors(path)
    assert t["blk.0.attn_q.weight"] == ((64, 64), Q.F16) and t["blk.0.ffn_down.weight"] == ((128, 64), Q.F16)
    assert t["blk.1.attn_k.weight"] == ((64, 32), Q.F16) and t["output_norm.weight"] == ((64,), Q.F32)
    assert t["token_embd.weight"] == ((64, 260), Q.F16)
    assert ("output.weight" in t) == (not model.config.tie_word_embeddings)
    per_layer = 13 if variant == "gemma3" else 9
    assert len(t) == model.config.num_hidden_layers * per_layer + 2 + ("output.weight" in t)
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    assert arch == variant and r.fields[f"{arch}.block_count"].contents() == model.config.num_hidden_layers
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 260
    back = read_back(path)
    # the reader adds "<end_of_turn>" (id 3 in the byte vocabulary) to the end-of-generation ids, as llama.cpp does
    assert read_gguf_config(path).replace(name="", eos_token_id=(2,)) == model.config.replace(name="")
    ids = torch.randint(0, 260, (1, 16))
    ref = logits(model, ids)
    torch.testing.assert_close(logits(back, ids), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("qtype, qt", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0), ("f32", Q.F32)])
def test_quantized_types(tmp_path, qtype, qt):
    model = tiny("gemma3", 2)
    t = tensors(export_gguf(model, None, tmp_path / "m.gguf", qtype))
    assert t["blk.0.ffn_up.weight"][1] == qt and t["blk.0.attn_norm.weight"][1] == Q.F32


def test_compressed_artifact_exports_its_dequantized_weights(tmp_path):
    model = tiny("gemma3", 3, **BYTE_VOCAB)
    step = Step(config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}), include=("model.layers.*", "lm_head"))
    compress_(model, step, progress=False)
    path = export_gguf(model, make_byte_tokenizer(), tmp_path / "q.gguf", "f32")
    ids = torch.randint(0, 260, (1, 16))
    torch.testing.assert_close(logits(read_back(path), ids), logits(model, ids), atol=1e-4, rtol=1e-4)
    dense = dense_model(model)
    assert not any(hasattr(m, "form_spec") for m in dense.modules())
    torch.testing.assert_close(logits(dense, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_every_form_has_a_dense_weight():
    """Each registered method's modules dequantize to weights that reproduce the layer's outputs."""
    from leanfm.compress import method_names

    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    methods = [("smoothquant", {}), ("llm_int8", {}), ("magnitude", {"pattern": "2:4", "pack": True}),
               ("svd", {"param_ratio": 0.5}), ("rtn", {"bits": 3, "group_size": 32})]
    for method, opts in methods:
        if method not in method_names():
            continue
        model = make_tiny_model("llama", seed=4)
        compress_(model, config_from_dict({"method": method, **opts}), calibration=calib, progress=False)
        state = dense_state_dict(model)
        x = torch.randn(3, 64)
        layer = model.model.layers[0].mlp.up_proj
        assert hasattr(layer, "form_spec"), method
        w = state["model.layers.0.mlp.up_proj.weight"]
        torch.testing.assert_close(x @ w.T, layer(x).float(), atol=0.05, rtol=0.05, msg=method)


def test_structured_pruning_writes_real_shapes(tmp_path):
    model = tiny("gemma3", 5)
    model.remove_layers([1, 4])
    recipe = Recipe([config_from_dict({"method": "channels", "ffn_sparsity": 0.5, "head_sparsity": 0.5})])
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_(model, recipe, calibration=calib, progress=False)
    path = export_gguf(model, None, tmp_path / "p.gguf", "f32")
    c = read_gguf_config(path)
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (4, 64, 2, 2)
    assert c.layer_types == model.config.layer_types
    ids = torch.randint(0, 128, (1, 16))
    torch.testing.assert_close(logits(read_back(path), ids), logits(model, ids), atol=1e-4, rtol=1e-4)


def test_uneven_widths_and_bad_input(tmp_path):
    model = make_tiny_model("llama", seed=6)
    mlp = model.model.layers[0].mlp
    for name, shape in (("gate_proj", (64, 32)), ("up_proj", (64, 32)), ("down_proj", (32, 64))):
        setattr(mlp, name, torch.nn.Linear(*shape, bias=False))
    with pytest.raises(CheckpointError, match="different FFN widths"):
        export_gguf(model, None, tmp_path / "u.gguf")
    with pytest.raises(CheckpointError, match="unknown GGUF type"):
        export_gguf(make_tiny_model("llama"), None, tmp_path / "x.gguf", "q5_k")
    (tmp_path / "e.gguf").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="exists"):
        export_gguf(make_tiny_model("llama"), None, tmp_path / "e.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.gguf"]


def test_cli_convert_to_gguf(tmp_path):
    from leanfm.checkpoint.hf import save_hf_dir
    from leanfm.cli import app

    runner = CliRunner()
    tiny_model_dir = save_hf_dir(tiny("gemma3", 0, **BYTE_VOCAB), tmp_path / "tiny", tokenizer=make_byte_tokenizer())
    out = tmp_path / "m.gguf"
    res = runner.invoke(app, ["convert", str(tiny_model_dir), str(out), "--type", "q8_0"])
    assert res.exit_code == 0, res.output
    assert tensors(out)["blk.0.ffn_up.weight"][1] == Q.Q8_0
    res = runner.invoke(app, ["convert", str(tiny_model_dir), str(out), "--type", "q5_k"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["convert", str(tiny_model_dir), str(tmp_path / "d"), "--type", "f16"])
    assert res.exit_code == 2 and not (tmp_path / "d").exists()
    res = runner.invoke(app, ["convert", str(tiny_model_dir), str(out)])
    assert res.exit_code == 1 and "exists" in str(res.exception)


# ------------------------------------------------------------------ real models + llama.cpp
TEXTS = ["The capital of France is Paris, and the capital of Germany is",
         "Hello!!! $100 <tag> a^b ~x |y| 3.14159 don't we'll", "  leading spaces\n\nnew   lines\ttabs",
         "Ünïcödé — 日本語のテキスト 🙂", "def f(x):\n    return x**2 + 12345"]


@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m"])  # arch gemma3, arch llama
def real_f16(request, tmp_path_factory):
    from leanfm.checkpoint.loader import load_model

    try:
        lm = load_model(request.param, progress=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{request.param} not available: {e}")
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}-f16.gguf"
    export_gguf(lm.model, lm.tokenizer, path, "f16")  # tokenizer metadata rebuilt from the HF tokenizer
    yield request.param, lm, path
    path.unlink()


@pytest.mark.integration
def test_rebuilt_vocabulary_equals_the_source_gguf(real_f16):
    from leanfm.checkpoint.gguf_vocab import tokenizer_fields_from_gguf
    from leanfm.checkpoint.loader import ALIASES

    name, _, path = real_f16
    src = tokenizer_fields_from_gguf(ALIASES[name].gguf_path())
    ours = tokenizer_fields_from_gguf(path)
    for key in ("model", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token"):
        key = f"tokenizer.ggml.{key}"
        assert ours.get(key) == src.get(key), key
    if "tokenizer.ggml.scores" in src:
        normal = np.asarray(src["tokenizer.ggml.token_type"]) == 1
        ours_s = np.asarray(ours["tokenizer.ggml.scores"])[normal]
        src_s = np.asarray(src["tokenizer.ggml.scores"])[normal]
        assert (np.diff(ours_s) < 0).all() and (np.diff(src_s) < 0).all()  # same order: same merges


@pytest.mark.integration
def test_llama_cpp_loads_f16_and_agrees(real_f16):
    """llama.cpp tokenizes like leanfm and its next-token logits match (F16 weights vs leanfm's fp32)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, lm, path = real_f16
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=lm.tokenizer.add_bos, special=False) == lm.tokenizer.encode(text)
    ids = lm.tokenizer.encode(TEXTS[0])
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)
    ours = logits(lm.model, torch.tensor([ids]))[0]
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    assert (theirs - ours).abs().max() < 0.02 * ours.abs().max()


@pytest.mark.integration
def test_llama_cpp_runs_a_layer_removed_gemma(tmp_path):
    """17 of 18 layers: the GGUF holds the real block count and the per-layer sliding pattern (which also
    picks each layer's RoPE base), and llama.cpp follows both."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from leanfm.checkpoint.loader import load_model

    try:
        lm = load_model("gemma-3-270m", progress=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"gemma-3-270m not available: {e}")
    lm.model.remove_layers([3])
    path = export_gguf(lm.model, lm.tokenizer, tmp_path / "g17.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    ids = lm.tokenizer.encode(TEXTS[0])
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)
    ours = logits(lm.model, torch.tensor([ids]))[0]
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    assert (theirs - ours).abs().max() < 0.02 * ours.abs().max()
