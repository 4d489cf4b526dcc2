"""Compressed artifacts: save, then load in a fresh process with identical logits, for every module form.

Every registered compression method runs on a tiny Gemma 3 (calibration: random tokens), is saved, and a
single subprocess reloads every artifact through `load_model` and compares its logits with torch.equal.
A method that is not registered yet is skipped; `test_every_registered_form_is_covered` fails when a
module form exists that none of the METHODS below produces (add a config for it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model
from torch import nn

from leanfm.checkpoint import artifact
from leanfm.checkpoint.artifact import MANIFEST_NAME, load_compressed, read_manifest, save_compressed
from leanfm.checkpoint.hf import save_hf_dir
from leanfm.checkpoint.loader import load_model
from leanfm.compress import Recipe, Step, compress_, config_from_dict, method_names
from leanfm.models.forms import FORMS, _load_forms
from leanfm.utils.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread")

ALL = ("model.layers.*", "lm_head")
# name -> (recipe steps as dicts, options a config may not have are dropped, see _step)
METHODS: dict[str, list[dict]] = {
    "rtn2": [{"method": "rtn", "bits": 2, "group_size": 32, "include": ALL}],
    "rtn3": [{"method": "rtn", "bits": 3, "group_size": 32, "symmetric": False}],
    "rtn4_tied_head": [{"method": "rtn", "bits": 4, "group_size": 32, "include": ALL}],
    "rtn8": [{"method": "rtn", "bits": 8, "group_size": -1, "include": ALL}],
    "gptq": [{"method": "gptq", "bits": 4, "group_size": 32}],
    "awq": [{"method": "awq", "bits": 4, "group_size": 32}],
    "smoothquant": [{"method": "smoothquant", "alpha": 0.5}],
    "llm_int8": [{"method": "llm_int8", "threshold": 2.0}],
    "magnitude_24": [{"method": "magnitude", "sparsity": 0.5, "pattern": "2:4", "pack": True}],
    "wanda": [{"method": "wanda", "sparsity": 0.5}],
    "sparsegpt": [{"method": "sparsegpt", "sparsity": 0.5}],
    "svd": [{"method": "svd", "param_ratio": 0.5}],
    "asvd": [{"method": "asvd", "param_ratio": 0.5}],
    "shortgpt": [{"method": "shortgpt", "n_layers": 2}],
    "channels": [{"method": "channels", "ffn_sparsity": 0.25, "head_sparsity": 0.5}],
    "shortgpt_distill": [{"method": "shortgpt", "n_layers": 1},
                         {"method": "distill", "steps": 2, "batch_size": 2, "holdout": 0.25}],
    "wanda_then_rtn": [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": 32}],
}


def _step(d: dict) -> Step:
    """A Step from a dict, dropping options the method's config does not have (names differ by method)."""
    import dataclasses

    from leanfm.compress.api import _REGISTRY

    method_names()  # loads the registry
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(_REGISTRY[d["method"]][0])} | {"method", "include"}
    return Step.from_dict({k: v for k, v in d.items() if k in fields})


def _run(name: str, calib: torch.Tensor):
    model = make_tiny_model("gemma3", seed=1, **BYTE_VOCAB)
    report = compress_(model, Recipe([_step(s) for s in METHODS[name]]), calibration=calib, progress=False)
    return model, report


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """{name: (dir, ref logits file)} for every method that is registered, saved from this process."""
    registered = set(method_names())
    root = tmp_path_factory.mktemp("artifacts")
    calib = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 260, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.save(ids, root / "ids.pt")
    out = {}
    for name, steps in METHODS.items():
        if not {s["method"] for s in steps} <= registered:
            continue
        model, report = _run(name, calib)
        with torch.no_grad():
            logits = model.compute_logits(model(ids, torch.arange(ids.shape[1])))
        path = save_compressed(model, make_byte_tokenizer(), root / name, report)
        torch.save(logits, root / f"{name}.logits.pt")
        out[name] = path
    return root, out


RELOAD = """
import json, sys, torch
from pathlib import Path
from leanfm.checkpoint.loader import load_model
root = Path(sys.argv[1])
ids = torch.load(root / "ids.pt")
res = {}
for name in sys.argv[2:]:
    m = load_model(str(root / name)).model
    assert not any(k.startswith("leanfm.compress") for k in sys.modules), "compress code imported"
    with torch.no_grad():
        got = m.compute_logits(m(ids, torch.arange(ids.shape[1])))
    res[name] = bool(torch.equal(got, torch.load(root / (name + ".logits.pt"))))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def reloaded(artifacts):
    root, paths = artifacts
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(root), *paths], capture_output=True, text=True,
                          env={"LEANFM_KERNELS": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fresh_process_reload_gives_identical_logits(name, artifacts, reloaded):
    if name not in artifacts[1]:
        pytest.skip(f"method(s) of {name} not registered yet")
    assert reloaded[name], f"{name}: logits differ after reload"
    m = read_manifest(artifacts[1][name])
    assert m["compress"]["steps"] and m["leanfm_version"]
    assert m["sizes"]["disk_bytes"] > 0 and m["sizes"]["bits_per_weight"]["overall"] > 0


def test_every_registered_form_is_covered(artifacts):
    _load_forms()
    seen = set()
    for path in artifacts[1].values():
        seen |= {s["form"] for s in read_manifest(path)["modules"].values()}
    missing = set(FORMS) - seen
    assert not missing, f"forms {sorted(missing)} are registered but no method in METHODS produced them"


def test_tied_quant_head_is_stored_once(artifacts):
    path = artifacts[1]["rtn4_tied_head"]
    m = read_manifest(path)
    assert m["modules"]["lm_head"]["form"] == "quant_linear" and m["modules"]["model.embed_tokens"]["tied"]
    assert m["aliases"]["lm_head.qweight"] == "model.embed_tokens.qweight"
    model = load_compressed(path)
    assert model.model.embed_tokens.qweight is model.lm_head.qweight


def _big_llama():
    return make_tiny_model("llama", seed=2, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=64)


def test_disk_size_follows_the_bits(tmp_path):
    model = _big_llama()
    bf16 = save_hf_dir(model, tmp_path / "bf16", dtype=torch.bfloat16)
    bf16_bytes = (bf16 / "model.safetensors").stat().st_size
    step = Step(config_from_dict({"method": "rtn", "bits": 4, "group_size": 128}),
                include=("model.layers.*", "lm_head", "model.embed_tokens"))
    compress_(model, step, progress=False)
    out = save_compressed(model, None, tmp_path / "int4")
    int4_bytes = (out / "model.safetensors").stat().st_size
    assert int4_bytes <= 0.30 * bf16_bytes, (int4_bytes, bf16_bytes)
    bpw = read_manifest(out)["sizes"]["bits_per_weight"]
    assert 4.4 < bpw["decoder_layers"] < 4.7 and 4.4 < bpw["embedding_head"] < 4.6


def test_resized_linears_heads_and_removed_layers(tmp_path):
    """What structured pruning leaves: narrower FFN, fewer query heads, a removed layer (new config)."""
    model = make_tiny_model("gemma3", seed=3)
    ids = torch.randint(0, 128, (1, 16))
    layers = model.model.layers
    mlp = layers[0].mlp
    keep = torch.arange(0, 128, 2)
    for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        old = getattr(mlp, proj)
        new = nn.Linear(old.in_features if dim == 0 else 64, 64 if dim == 0 else old.out_features, bias=False)
        new.weight.data = old.weight.data.index_select(dim, keep).clone()
        setattr(mlp, proj, new)
    attn = layers[1].self_attn  # 4 -> 2 query heads (GQA 2 kv heads: one query head per kv head)
    q_rows = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
    q, o = nn.Linear(64, 32, bias=False), nn.Linear(32, 64, bias=False)
    q.weight.data, o.weight.data = attn.q_proj.weight.data[q_rows].clone(), attn.o_proj.weight.data[:, q_rows].clone()
    attn.q_proj, attn.o_proj, attn.n_heads = q, o, 2
    model.remove_layers([2])
    with torch.no_grad():
        ref = model.compute_logits(model(ids, torch.arange(16)))
    out = save_compressed(model, None, tmp_path / "pruned")
    m = read_manifest(out)
    assert m["modules"]["model.layers.0.mlp.gate_proj"] == {"form": "linear", "in_features": 64,
                                                            "out_features": 64, "bias": False}
    assert m["attention_heads"] == {"model.layers.1.self_attn": {"n_heads": 2, "n_kv": 2}}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    loaded = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded.compute_logits(loaded(ids, torch.arange(16))), ref)


def test_plain_model_round_trip_and_bf16(tmp_path):
    model = make_tiny_model("llama", seed=4)
    ids = torch.randint(0, 128, (1, 10))
    out = save_compressed(model, None, tmp_path / "plain", dtype=torch.bfloat16)
    assert read_manifest(out)["modules"] == {} and read_manifest(out)["dtype"] == "bfloat16"
    loaded = load_compressed(out, dtype=torch.bfloat16)
    ref = model.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded.compute_logits(loaded(ids, torch.arange(10))),
                           ref.compute_logits(ref(ids, torch.arange(10))))


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = make_tiny_model("gemma3", seed=5)
    compress_(model, config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}), progress=False)

    def broken(state, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "_write_weights", broken)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, make_byte_tokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    model = make_tiny_model("llama")
    out = save_compressed(model, None, tmp_path / "a")
    with pytest.raises(CheckpointError, match="not empty"):
        save_compressed(model, None, out)
    save_compressed(model, None, out, overwrite=True)
    (tmp_path / "empty").mkdir()
    save_compressed(model, None, tmp_path / "empty")  # an empty directory is fine
    assert read_manifest(tmp_path / "empty")["format_version"] == artifact.FORMAT_VERSION


def test_corrupt_or_missing_manifest(tmp_path):
    model = make_tiny_model("gemma3", seed=6, **BYTE_VOCAB)
    compress_(model, config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}), progress=False)
    out = save_compressed(model, make_byte_tokenizer(), tmp_path / "art")
    manifest = out / MANIFEST_NAME
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_model(str(out))
    manifest.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade leanfm"):
        load_compressed(out)
    m = json.loads(good)
    m["modules"]["model.layers.0.mlp.up_proj"] = {"form": "no_such_form"}
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="cannot rebuild module"):
        load_compressed(out)
    manifest.unlink()
    with pytest.raises(CheckpointError, match="not a compressed"):
        load_compressed(out)
    with pytest.raises(CheckpointError):  # without the manifest it is a plain HF dir whose weights do not fit
        load_model(str(out))
    manifest.write_text(good)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_compressed(out)
