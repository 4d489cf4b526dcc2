"""`leanfm eval / bench / report` (leanfm.bench.commands) through typer's CliRunner on a tiny saved model."""

from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import dataclass, field

import pytest
import typer
from conftest import make_tiny_model
from tokenizers import Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from typer.testing import CliRunner

from leanfm.bench import commands
from leanfm.bench.record import load_record
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")
TEXT = "The keeper wrote down every ship that passed the point.\n\n" * 40
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def char_tokenizer():
    """A character-level tokenizer with <bos> prepended: 4 specials + printable ASCII + newline (< 128 ids)."""
    from leanfm.checkpoint.tokenizer import Tokenizer

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return Tokenizer(backend, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from leanfm.checkpoint.hf import save_hf_dir

    path = tmp_path_factory.mktemp("models") / "tiny-gemma3"
    save_hf_dir(make_tiny_model("gemma3"), path, tokenizer=char_tokenizer())
    return str(path)


@dataclass
class FakeTaskResult:
    name: str
    n: int
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    extra: dict = field(default_factory=dict)
    seconds: float = 0.5
    protocol: dict = field(default_factory=dict)


@pytest.fixture
def fakes(monkeypatch):
    """Short corpus text, no bandwidth measurement, no fast-kernel build, and a fake tasks module."""
    import leanfm.bench.corpora as corpora
    import leanfm.bench.cost as cost

    monkeypatch.setenv("LEANFM_KERNELS", "0")
    monkeypatch.setattr(corpora, "load_corpus", lambda name, split="eval": TEXT)
    monkeypatch.setattr(cost, "machine_bandwidth", lambda threads=2: {"gb_s": 10.0})
    calls = []

    def evaluate_tasks(model, tokenizer, names, limit=None, seed=0, few_shot=0, batch_size=16, progress=True):
        names = [n if isinstance(n, str) else n.name for n in names]  # built-in names or user Task objects
        calls.append((tuple(names), limit, seed, few_shot))
        if "boom" in names:
            raise KeyboardInterrupt
        return {n: FakeTaskResult(n, limit or 10, 0.7, 0.1, 0.75, 0.09) for n in names}

    tasks = types.SimpleNamespace(list_tasks=lambda: ["toy", "boom", "mmlu_anatomy"], evaluate_tasks=evaluate_tasks,
                                  load_user_task=lambda path: types.SimpleNamespace(name=path.stem))
    monkeypatch.setitem(sys.modules, "leanfm.bench.tasks", tasks)
    return calls


def run(*args: str):
    app = typer.Typer()
    app.command("eval")(commands.eval_cmd)
    app.command("bench")(commands.bench_cmd)
    app.command("report")(commands.report_cmd)
    return CliRunner().invoke(app, list(args))


def test_eval_ppl_and_tasks(model_dir, fakes, tmp_path):
    out = tmp_path / "eval.json"
    r = run("eval", "-m", model_dir, "--ppl", "wiki", "--ctx", "64", "--tasks", "toy", "--limit", "5",
            "--seed", "3", "--few-shot", "2", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert re.search(r"^perplexity: \d+\.\d{4}$", r.stdout, re.M)
    assert "toy: acc=0.7000 ± 0.1000 acc_norm=0.7500 ± 0.0900" in r.output
    assert f"record: {out}" in r.output and fakes == [(("toy",), 5, 3, 2)]
    rec = load_record(out)
    assert rec.kind == "eval" and rec.complete
    p = rec.quality["perplexity"]
    assert p["corpus"] == "wiki" and p["ctx"] == 64 and p["ppl"] > 1 and p["n_scored_tokens"] > 0
    assert rec.quality["tasks"]["toy"]["acc"] == 0.7
    c = rec.cost
    assert c["eval_tokens_per_second"] > 0 and c["memory"]["model_bytes"] > 0 and c["memory"]["disk_bytes"] > 0
    assert c["energy"]["joules_per_token"] > 0 and c["wall_seconds"] > 0 and c["tasks_seconds"] == 0.5
    prov = rec.provenance
    assert prov["model_reference"] == model_dir and prov["weights_sha256"] and len(prov["weights_sha256"]) == 64
    assert (prov["dataset"], prov["split"], prov["seed"], prov["limit"]) == ("wiki; tasks: toy", "eval", 3, 5)


def test_eval_default_path_and_user_task(model_dir, fakes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task_file = tmp_path / "mine.jsonl"
    task_file.write_text("{}\n")
    r = run("eval", "-m", model_dir, "--task-file", str(task_file))
    assert r.exit_code == 0, r.output
    assert "perplexity:" not in r.output and "mine: acc=" in r.output
    written = list((tmp_path / "runs").glob("eval-tiny-gemma3-*.json"))
    assert len(written) == 1 and f"record: runs/{written[0].name}" in r.output
    assert load_record(written[0]).quality["perplexity"] is None


def test_eval_interrupted_saves_partial_record(model_dir, fakes, tmp_path):
    out = tmp_path / "partial.json"
    r = run("eval", "-m", model_dir, "--ppl", "wiki", "--ctx", "32", "--tasks", "toy,boom", "-o", str(out))
    assert r.exit_code == 130
    assert "perplexity:" in r.output and "toy: acc=" in r.output and "complete: false" in r.output
    rec = load_record(out)
    assert not rec.complete and list(rec.quality["tasks"]) == ["toy"] and rec.quality["perplexity"]
    assert rec.notes and rec.cost["memory"]["peak_rss_bytes"] > 0


def test_eval_errors(model_dir, fakes, tmp_path):
    r = run("eval", "-m", model_dir, "--tasks", "nope", "-o", str(tmp_path / "x.json"))
    assert isinstance(r.exception, LeanfmError) and "unknown task(s) nope" in str(r.exception)
    assert "available: boom, toy, mmlu_<subject>" in str(r.exception)
    r = run("eval", "-m", model_dir, "--dtype", "int3")
    assert isinstance(r.exception, LeanfmError) and "--dtype" in str(r.exception)
    assert not (tmp_path / "x.json").exists()


def test_bench_writes_record_with_quality_and_cost(model_dir, fakes, tmp_path):
    out = tmp_path / "bench.json"
    r = run("bench", "-m", model_dir, "--prefill", "16,300", "--batches", "1,2", "--decode-tokens", "4",
            "--repeats", "1", "--warmup", "0", "-o", str(out))
    assert r.exit_code == 0, r.output
    for needle in ("quality", "perplexity", "prefill 16", "prefill 300", "(clamped to context)", "decode B=1",
                   "decode B=2", "TTFT", "TPOT", "peak RSS", "GB/s", "J/token", f"record: {out}"):
        assert needle in r.output, needle
    rec = load_record(out)
    assert rec.kind == "bench" and rec.complete
    p = rec.quality["perplexity"]
    assert p["corpus"] == "wiki" and p["ctx"] == 256 and p["n_windows"] == 4  # ctx clamped to the model's 256
    assert set(rec.cost["decode"]) == {"1", "2"} and rec.cost["prefill"]["300"]["tokens"] == 256
    assert rec.cost["bandwidth"]["machine_gb_s"] == 10.0 and rec.cost["memory"]["disk_bytes"] > 0
    assert json.loads(out.read_text())["schema_version"] == 1


def test_bench_no_quality_and_bad_options(model_dir, fakes, tmp_path):
    out = tmp_path / "nq.json"
    r = run("bench", "-m", model_dir, "--prefill", "8", "--batches", "1", "--decode-tokens", "2", "--repeats", "1",
            "--no-quality", "-o", str(out))
    assert r.exit_code == 0, r.output
    rec = load_record(out)
    assert rec.quality["perplexity"] is None and "--no-quality" in rec.notes[0]
    assert "not measured (--no-quality)" in r.output
    for bad, flag in ((["--prefill", "a,b"], "--prefill"), (["--batches", "0"], "decode_batches"),
                      (["--repeats", "0"], "repeats")):
        r = run("bench", "-m", model_dir, *bad)
        assert isinstance(r.exception, LeanfmError) and flag in str(r.exception), r.exception


def test_bench_concurrency_sweep(model_dir, fakes, tmp_path):
    out = tmp_path / "conc.json"
    r = run("bench", "-m", model_dir, "--prefill", "8", "--batches", "1", "--decode-tokens", "3", "--repeats", "1",
            "--warmup", "0", "--no-quality", "--concurrency", "1,3", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "serve N=1" in r.output and "serve N=3" in r.output and "TTFT median" in r.output
    sweep = load_record(out).cost["concurrency"]
    assert set(sweep) == {"1", "3"}
    for n, level in sweep.items():
        assert level["requests"] == int(n) and level["output_tokens"] == 3 * int(n)
        assert level["output_tokens_per_second"] > 0 and level["total_tokens_per_second"] > level["output_tokens_per_second"]
        assert level["ttft_seconds"]["median"] > 0 and level["tpot_seconds"]["median"] > 0
    r = run("bench", "-m", model_dir, "--concurrency", "0,2")
    assert isinstance(r.exception, LeanfmError) and "--concurrency" in str(r.exception)


def test_report_command(model_dir, fakes, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, dtype in ((a, "float32"), (b, "bfloat16")):
        r = run("bench", "-m", model_dir, "--prefill", "8", "--batches", "1", "--decode-tokens", "2",
                "--repeats", "1", "--dtype", dtype, "-o", str(path))
        assert r.exit_code == 0, r.output
    out = tmp_path / "rep"
    r = run("report", str(a), str(b), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "| metric | tiny-gemma3 (bench, float32) | tiny-gemma3 (bench, bfloat16) |" in r.output
    assert (out / "report.md").is_file() and len(list(out.glob("*.png"))) == 2
    r = run("report", "-o", str(out))
    assert isinstance(r.exception, LeanfmError) and "no run records" in str(r.exception)
    (tmp_path / "bad.json").write_text("{}")
    r = run("report", str(a), str(tmp_path / "bad.json"))
    assert isinstance(r.exception, LeanfmError) and "bad.json" in str(r.exception)


def test_eval_with_the_real_tasks_module(model_dir, tmp_path, monkeypatch):
    """A user JSONL task through the real leanfm.bench.tasks (when it is installed), no perplexity."""
    pytest.importorskip("leanfm.bench.tasks")
    monkeypatch.setenv("LEANFM_KERNELS", "0")
    task_file = tmp_path / "sums.jsonl"
    rows = [{"context": f"{a} + {a} =", "choices": [str(2 * a), str(2 * a + 1)], "answer": 0} for a in range(6)]
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "user.json"
    r = run("eval", "-m", model_dir, "--task-file", str(task_file), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert re.search(r"^sums: acc=\d\.\d{4} ± \d\.\d{4} acc_norm=", r.stdout, re.M), r.stdout
    rec = load_record(out)
    assert rec.quality["tasks"]["sums"]["n"] == 6 and "items" not in rec.quality["tasks"]["sums"]
    assert rec.cost["tasks_seconds"] > 0 and rec.cost["energy"]["joules"] > 0
