"""Run records (leanfm.bench.record): schema round trip, validation errors, checksums, provenance."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import pytest

from leanfm.bench import record as rec_mod
from leanfm.bench.record import (
    SCHEMA_VERSION,
    RunRecord,
    default_record_path,
    file_sha256,
    jsonable,
    load_record,
    model_info,
    provenance,
    save_record,
    weights_sha256,
)
from leanfm.utils.errors import LeanfmError


def make_record(tmp_path, kind: str = "eval") -> RunRecord:
    weights = tmp_path / "w" / "model.safetensors"
    weights.parent.mkdir(exist_ok=True)
    weights.write_bytes(b"weights" * 100)
    prov = provenance("tiny-model", "float32", [weights], dataset="wiki", split="eval", seed=0, limit=5,
                      command=["leanfm", "eval", "--model", "tiny-model"])
    quality = {"perplexity": {"corpus": "wiki", "ctx": 64, "ppl": 12.5, "nll": 2.52, "n_scored_tokens": 252,
                              "n_windows": 4, "max_tokens": 252, "protocol": {"name": "leanfm-perplexity-v1"}},
               "tasks": {"toy": {"n": 10, "acc": 0.6, "acc_stderr": 0.16, "acc_norm": None,
                                 "acc_norm_stderr": None}}}
    cost = {"wall_seconds": 1.5, "memory": {"model_bytes": 1000, "peak_rss_bytes": 10**8, "disk_bytes": 700},
            "energy": {"joules_per_token": 0.1, "energy_source": "estimate", "assumption": "ESTIMATE: ..."}}
    model = {"name": "tiny", "family": "llama", "parameters": 250, "path": str(weights.parent), "max_context": 256}
    return RunRecord(kind, prov, model, quality, cost)


def test_round_trip(tmp_path):
    rec = make_record(tmp_path)
    path = save_record(rec, tmp_path / "runs" / "a.json")
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # atomic write left no temp file
    back = load_record(path)
    assert back == rec and back.schema_version == SCHEMA_VERSION
    d = json.loads(path.read_text())
    assert d["quality"]["perplexity"]["ppl"] == 12.5 and d["cost"]["memory"]["model_bytes"] == 1000
    assert d["provenance"]["command"] == "leanfm eval --model tiny-model"


def test_provenance_fields(tmp_path):
    p = make_record(tmp_path).provenance
    assert p["weights_sha256"] == file_sha256(tmp_path / "w" / "model.safetensors")
    assert p["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git_sha"])
    assert p["torch_version"] and p["python"].count(".") == 2 and p["cpu"]["model"]
    assert p["timestamp"].endswith("+00:00") and p["compression"] is None
    assert (p["dataset"], p["split"], p["seed"], p["limit"]) == ("wiki", "eval", 0, 5)


def _write(tmp_path, d) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["provenance"].pop("torch_version"), "provenance.torch_version"),
    (lambda d: d.pop("cost"), "'cost'"),
    (lambda d: d["model"].__setitem__("parameters", "many"), "model.parameters"),
    (lambda d: d.__setitem__("complete", 1), "'complete'"),
    (lambda d: d["provenance"].__setitem__("seed", True), "provenance.seed"),
    (lambda d: d["quality"]["perplexity"].pop("ppl"), "quality.perplexity.ppl"),
    (lambda d: d["quality"]["tasks"]["toy"].__setitem__("acc", "high"), "quality.tasks.toy.acc"),
    (lambda d: d.__setitem__("kind", "train"), "'kind'"),
    (lambda d: d["provenance"]["cpu"].pop("flags"), "provenance.cpu.flags"),
])
def test_validation_names_file_and_field(tmp_path, mutate, field):
    d = make_record(tmp_path).to_dict()
    mutate(d)
    path = _write(tmp_path, d)
    with pytest.raises(LeanfmError) as e:
        load_record(path)
    msg = str(e.value)
    assert path in msg and field in msg and "\n" not in msg


def test_load_errors(tmp_path):
    with pytest.raises(LeanfmError, match="no such record"):
        load_record(tmp_path / "absent.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(LeanfmError, match="not valid JSON"):
        load_record(tmp_path / "x.json")
    d = make_record(tmp_path).to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(LeanfmError, match="upgrade leanfm"):
        load_record(_write(tmp_path, d))
    with pytest.raises(LeanfmError, match="JSON object"):
        load_record(_write(tmp_path, [1, 2]))


def test_save_refuses_invalid_record(tmp_path):
    rec = make_record(tmp_path)
    rec.kind = "train"
    with pytest.raises(LeanfmError, match="kind"):
        save_record(rec, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_checksum_is_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"abc")
    digest = file_sha256(f)
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    cache = tmp_path / ".model.safetensors.sha256"
    entry = json.loads(cache.read_text())
    entry["sha256"] = "cached"
    cache.write_text(json.dumps(entry))
    assert file_sha256(f) == "cached"  # served from the cache, not re-hashed
    f.write_bytes(b"abcd")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_sha256(f) != "cached"  # size/mtime changed: re-hashed


def test_checksum_of_shards(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    assert weights_sha256([a]) == file_sha256(a)
    two = weights_sha256([b, a])
    assert two == weights_sha256([a, b]) and two not in (file_sha256(a), file_sha256(b))
    assert weights_sha256([]) is None
    assert rec_mod.weight_files(tmp_path) == [a, b]


def test_jsonable_and_default_path():
    @dataclass
    class R:
        x: tuple
        y: float

    assert jsonable(R((1, 2), float("inf"))) == {"x": [1, 2], "y": "inf"}
    p = default_record_path("bench", "/models/my model/")
    assert p.parent.name == "runs" and re.fullmatch(r"bench-my_model-\d{8}-\d{6}\.json", p.name)


def test_model_info(tiny_model):
    m = tiny_model("gemma3")
    info = model_info(m, "/x/tiny")
    assert info["family"] == "gemma3" and info["max_context"] == 256 and info["path"] == "/x/tiny"
    assert info["parameters"] == sum(p.numel() for p in m.parameters())  # tied head once
