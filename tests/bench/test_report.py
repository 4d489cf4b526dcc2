"""Reports (leanfm.bench.report): the Pareto frontier, the side-by-side table and the trade-off plots."""

from __future__ import annotations

import copy

import pytest

from leanfm.bench.record import RunRecord, save_record
from leanfm.bench.report import labels_for, pareto_frontier, quality_metrics, render_table, write_report
from leanfm.utils.errors import LeanfmError


# ------------------------------------------------------------------ pareto_frontier
def test_pareto_min_x_max_y():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 6.0), (4.0, 6.0), (0.5, 1.0)]
    # (2,4) is beaten by (1,5); (4,6) by (3,6)
    assert pareto_frontier(pts, maximize_x=False, maximize_y=True) == [4, 0, 2]


def test_pareto_max_x_min_y():
    pts = [(10.0, 20.0), (20.0, 25.0), (15.0, 30.0), (30.0, 40.0)]  # (tokens/s, perplexity)
    assert pareto_frontier(pts, maximize_x=True, maximize_y=False) == [0, 1, 3]


def test_pareto_both_directions_and_edge_cases():
    pts = [(1.0, 1.0), (2.0, 2.0), (3.0, 1.0)]
    assert pareto_frontier(pts, True, True) == [1, 2]
    assert pareto_frontier(pts, False, False) == [0]
    assert pareto_frontier([(1.0, 1.0), (1.0, 1.0)], True, True) == [0, 1]  # ties both stay
    assert pareto_frontier([(3.0, 3.0)], False, True) == [0]
    assert pareto_frontier([], True, True) == []


# ------------------------------------------------------------------ records
def _record(ref: str, ppl: float, model_bytes: int, decode: float | None, kind: str = "bench",
            acc: float | None = None) -> RunRecord:
    prov = {"leanfm_version": "0.1.0", "git_sha": None, "git_dirty": None, "torch_version": "2", "python": "3.11.0",
            "os": "Linux", "cpu": {"model": "cpu", "flags": [], "logical_cores": 2, "physical_cores": 1},
            "threads": 2, "ram_bytes": None, "load_avg_1m": 0.5, "timestamp": "2025-01-01T00:00:00+00:00", "command": "leanfm bench",
            "model_reference": ref, "weights_sha256": None, "dtype": "float32", "compression": None,
            "dataset": "wiki", "split": "eval", "seed": 0, "limit": None}
    quality = {"perplexity": {"corpus": "wiki", "ctx": 512, "ppl": ppl, "n_scored_tokens": 2044, "n_windows": 4,
                              "max_tokens": 2044}, "tasks": {}}
    if acc is not None:
        quality["tasks"]["toy"] = {"n": 50, "acc": acc, "acc_stderr": 0.05, "acc_norm": None, "acc_norm_stderr": None}
    cost = {"memory": {"model_bytes": model_bytes, "disk_bytes": model_bytes, "peak_rss_bytes": 2 * model_bytes},
            "energy": {"joules_per_token": 0.5, "energy_source": "estimate", "assumption": "ESTIMATE: 5 W per core"},
            "wall_seconds": 10.0}
    if decode is not None:
        cost.update(decode={"1": {"tokens_per_second_total": {"min": decode, "median": decode, "max": decode}}},
                    prefill={"128": {"tokens_per_second": {"median": 10 * decode}}},
                    ttft_seconds={"prompt_tokens": 128, "median": 0.1}, tpot_seconds={"median": 1 / decode},
                    bandwidth={"achieved_gb_s": 5.0, "fraction": 0.25})
    model = {"name": ref, "family": "gemma3", "parameters": 100, "path": None, "max_context": 512}
    return RunRecord(kind, prov, model, quality, cost)


@pytest.fixture
def three(tmp_path):
    recs = [_record("gemma-fp32", 20.0, 1 << 30, 12.0, acc=0.6), _record("gemma-int8", 20.5, 300 << 20, 30.0, acc=0.58),
            _record("gemma-int4", 24.0, 200 << 20, 25.0)]
    return [save_record(r, tmp_path / f"r{i}.json") for i, r in enumerate(recs)]


def test_report_table_and_plots(three, tmp_path):
    rep = write_report(three, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md == rep.markdown
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header == "| metric | gemma-fp32 | gemma-int8 | gemma-int4 |"
    for needle in ("ppl wiki ctx512 (first 2044 tok) ↓ | 20 | 20.5 | 24 |", "toy acc ↑ | 0.6 | 0.58 | — |",
                   "decode tok/s (B=1, total) | 12.0 | 30.0 | 25.0 |", "model bytes (memory) | 1.00 GiB | 300.00 MiB",
                   "J/token | 0.5 (estimate)", "TTFT ms | 100.0 (128 tok)", "**quality**", "**cost**"):
        assert needle in md, needle
    names = sorted(p.name for p in rep.plots)
    assert names == ["ppl_wiki_ctx512_first_2044_tok_vs_decode_tps.png",
                     "ppl_wiki_ctx512_first_2044_tok_vs_model_bytes.png",
                     "toy_acc_vs_decode_tps.png", "toy_acc_vs_model_bytes.png"]
    import matplotlib.image as mpimg

    for p in rep.plots:
        img = mpimg.imread(p)
        assert img.shape[:2] == (480, 640)
        assert f"]({p.name})" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_single_record_has_table_and_no_plot(three, tmp_path):
    rep = write_report(three[:1], tmp_path / "one")
    assert "| metric | gemma-fp32 |" in rep.markdown and rep.plots == []


def test_eval_and_bench_records_side_by_side(tmp_path):
    bench = _record("m", 20.0, 100, 10.0)
    ev = _record("m", 19.0, 100, None, kind="eval")
    ev.quality["perplexity"].update(max_tokens=None, n_scored_tokens=270000)
    ev.cost["eval_tokens_per_second"] = 400.0
    paths = [save_record(bench, tmp_path / "b.json"), save_record(ev, tmp_path / "e.json")]
    rep = write_report(paths, tmp_path / "out")
    assert "| metric | m (bench, float32) | m (eval, float32) |" in rep.markdown
    assert "ppl wiki ctx512 ↓ | — | 19 |" in rep.markdown  # a different slice is a different metric
    assert "eval tok/s | — | 400.0 |" in rep.markdown
    assert rep.plots == [] and "No plot" in rep.markdown


def test_labels_disambiguate():
    a, b = _record("x", 1, 1, 1), _record("x", 1, 1, 1)
    assert labels_for([a, b], ["p/one.json", "p/two.json"]) == ["x (bench, float32) [one]", "x (bench, float32) [two]"]
    c = copy.deepcopy(a)
    c.provenance["model_reference"] = "/models/y/"
    assert labels_for([a, c], ["1", "2"]) == ["x", "y"]


def test_quality_metrics_directions():
    q = quality_metrics(_record("x", 10.0, 1, 1.0, acc=0.5))
    assert {k: m.higher_is_better for k, (_, m) in q.items()} == {"ppl wiki ctx512 (first 2044 tok)": False,
                                                                  "toy acc": True}
    assert "| metric | a |" in render_table([_record("x", 1, 1, 1)], ["a"])


def test_report_errors(tmp_path, three):
    with pytest.raises(LeanfmError, match="no run records"):
        write_report([], tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "bench"}')
    with pytest.raises(LeanfmError, match="bad.json"):
        write_report([three[0], bad], tmp_path / "o")
