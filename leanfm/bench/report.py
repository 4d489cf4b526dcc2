"""`leanfm report A.json B.json -o DIR`: run records side by side, quality next to cost.

    out = write_report(["runs/a.json", "runs/b.json"], "report/")   # DIR/report.md + PNG plots
    pareto_frontier([(1, 5), (2, 4), (3, 6)], maximize_x=False, maximize_y=True)   # -> [0, 2]

The table has one column per record: quality (perplexity per corpus/context/slice, task accuracies)
then cost (model bytes, decode and prefill tokens/s, TTFT, TPOT, peak RSS, J/token, ...). Each quality
metric present in two or more records gets two plots, quality vs model bytes and quality vs decode
tokens/s, with the Pareto frontier marked. matplotlib is imported only when plotting (Agg backend).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leanfm.bench.record import RunRecord, load_record
from leanfm.utils.errors import LeanfmError
from leanfm.utils.paths import atomic_file


@dataclass
class Metric:
    name: str
    higher_is_better: bool


def pareto_frontier(points: Sequence[tuple[float, float]], maximize_x: bool, maximize_y: bool) -> list[int]:
    """Indices of the points no other point dominates, ordered by x ascending.

    A point is dominated when another is at least as good in both coordinates and strictly better in
    one ("good" means larger when maximize_*, smaller otherwise). Equal points all stay on the frontier.
    """
    sx, sy = (1 if maximize_x else -1), (1 if maximize_y else -1)
    keep = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            sx * xj >= sx * xi and sy * yj >= sy * yi and (sx * xj > sx * xi or sy * yj > sy * yi)
            for j, (xj, yj) in enumerate(points) if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


# ------------------------------------------------------------------ metrics from records
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def quality_metrics(rec: RunRecord) -> dict[str, tuple[float, Metric]]:
    """{display name: (value, Metric)} for the perplexity and task scores a record holds."""
    out: dict[str, tuple[float, Metric]] = {}
    ppl = rec.quality.get("perplexity")
    if ppl and _num(ppl.get("ppl")) is not None:
        name = f"ppl {ppl['corpus']} ctx{ppl['ctx']}"
        if ppl.get("max_tokens"):
            name += f" (first {ppl['max_tokens']} tok)"
        out[name] = (float(ppl["ppl"]), Metric(name, False))
    for task, r in sorted(rec.quality.get("tasks", {}).items()):
        for key in ("acc", "acc_norm"):
            if _num(r.get(key)) is not None:
                name = f"{task} {key}"
                out[name] = (float(r[key]), Metric(name, True))
    return out


def decode_tps(rec: RunRecord, batch: int = 1) -> float | None:
    return _num(_get(rec.cost, "decode", str(batch), "tokens_per_second_total", "median"))


def model_bytes(rec: RunRecord) -> float | None:
    return _num(_get(rec.cost, "memory", "model_bytes"))


def human_bytes(x: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def _cost_rows(records: Sequence[RunRecord]) -> list[tuple[str, list[str]]]:
    def row(name: str, fn) -> tuple[str, list[str]]:
        return name, [fn(r) for r in records]

    def fmt(value: Any, f) -> str:
        v = _num(value)
        return "—" if v is None else f(v)

    batches = sorted({int(b) for r in records for b in (r.cost.get("decode") or {})})
    lengths = sorted({int(n) for r in records for n in (r.cost.get("prefill") or {})})
    rows = [
        row("model bytes (memory)", lambda r: fmt(_get(r.cost, "memory", "model_bytes"), human_bytes)),
        row("model bytes (disk)", lambda r: fmt(_get(r.cost, "memory", "disk_bytes"), human_bytes)),
        row("peak RSS", lambda r: fmt(_get(r.cost, "memory", "peak_rss_bytes"), human_bytes)),
    ]
    for b in batches:
        rows.append(row(f"decode tok/s (B={b}, total)", lambda r, b=b: fmt(decode_tps(r, b), "{:.1f}".format)))
    for n in lengths:
        rows.append(row(f"prefill tok/s ({n})", lambda r, n=n: fmt(
            _get(r.cost, "prefill", str(n), "tokens_per_second", "median"), "{:.1f}".format)))
    rows += [
        row("TTFT ms", lambda r: fmt(_get(r.cost, "ttft_seconds", "median"), lambda v: f"{v * 1e3:.1f}")
            + (f" ({r.cost['ttft_seconds']['prompt_tokens']} tok)" if _get(r.cost, "ttft_seconds") else "")),
        row("TPOT ms (B=1)", lambda r: fmt(_get(r.cost, "tpot_seconds", "median"), lambda v: f"{v * 1e3:.1f}")),
        row("weight GB/s (B=1)", lambda r: fmt(_get(r.cost, "bandwidth", "achieved_gb_s"), "{:.2f}".format)
            + fmt(_get(r.cost, "bandwidth", "fraction"), lambda v: f" ({v:.0%} of machine)").replace("—", "")),
        row("eval tok/s", lambda r: fmt(_get(r.cost, "eval_tokens_per_second"), "{:.1f}".format)),
        row("J/token", lambda r: fmt(_get(r.cost, "energy", "joules_per_token"), "{:.3g}".format)
            + (" (estimate)" if _get(r.cost, "energy", "energy_source") == "estimate" else "")),
        row("wall s", lambda r: fmt(_get(r.cost, "wall_seconds"), "{:.1f}".format)),
    ]
    return [r for r in rows if any(cell not in ("—", "") for cell in r[1])]


def labels_for(records: Sequence[RunRecord], paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Column names: the model reference, disambiguated by kind/dtype, then by file name."""
    labels = [Path(r.provenance["model_reference"].rstrip("/")).name or r.provenance["model_reference"]
              for r in records]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r.kind}, {r.provenance['dtype']})" for lab, r in zip(labels, records, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{Path(p).stem}]" for lab, p in zip(labels, paths, strict=True)]
    return labels


def render_table(records: Sequence[RunRecord], labels: Sequence[str]) -> str:
    """A markdown table: quality rows, then cost rows, one column per record."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    quals = [quality_metrics(r) for r in records]
    names = sorted({n for q in quals for n in q})
    lines = ["| metric | " + " | ".join(esc(x) for x in labels) + " |", "|---|" + "---:|" * len(labels)]
    lines.append("| **quality** |" + " |" * len(labels))
    for name in names:
        cells = [f"{q[name][0]:.4g}" if name in q else "—" for q in quals]
        arrow = "↑" if next(q[name][1] for q in quals if name in q).higher_is_better else "↓"
        lines.append(f"| {esc(name)} {arrow} | " + " | ".join(cells) + " |")
    if not names:
        lines.append("| (none) |" + " — |" * len(labels))
    lines.append("| **cost** |" + " |" * len(labels))
    for name, cells in _cost_rows(records):
        lines.append(f"| {esc(name)} | " + " | ".join(cells) + " |")
    lines.append("| kind / complete | " + " | ".join(f"{r.kind} / {'yes' if r.complete else 'NO'}"
                                                     for r in records) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots
def model_mib(rec: RunRecord) -> float | None:
    b = model_bytes(rec)
    return None if b is None else b / (1 << 20)


X_AXES = (("model MiB in memory", model_mib, False, "model_bytes"),
          ("decode tok/s (B=1)", decode_tps, True, "decode_tps"))


def _slug(s: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in s).lower().split())


def plot_tradeoff(points: Sequence[tuple[float, float]], labels: Sequence[str], metric: Metric,
                  x_name: str, maximize_x: bool) -> bytes:
    """PNG bytes: a scatter of (x, quality) with the Pareto frontier drawn and its points ringed."""
    try:
        from matplotlib.figure import Figure  # the Figure API renders with Agg, whatever pyplot's backend
    except ImportError:
        raise LeanfmError("the report's plots need matplotlib; install it with: pip install matplotlib") from None

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.scatter(xs, ys, color="tab:blue", zorder=3, label="runs")
    front = pareto_frontier(points, maximize_x, metric.higher_is_better)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="tab:red", zorder=2,
            label="Pareto frontier")
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=140, facecolors="none",
               edgecolors="tab:red", zorder=4)
    for x, y, lab in zip(xs, ys, labels, strict=True):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"{x_name} ({'higher' if maximize_x else 'lower'} is better)")
    ax.set_ylabel(f"{metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{metric.name} vs {x_name}")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plots(records: Sequence[RunRecord], labels: Sequence[str], out_dir: Path) -> list[Path]:
    quals = [quality_metrics(r) for r in records]
    names = sorted({n for q in quals for n in q})
    written = []
    for name in names:
        holders = [i for i, q in enumerate(quals) if name in q]
        if len(holders) < 2:
            continue
        metric = quals[holders[0]][name][1]
        for x_name, x_fn, maximize_x, x_slug in X_AXES:
            idx = [i for i in holders if x_fn(records[i]) is not None]
            if len(idx) < 2:
                continue
            points = [(x_fn(records[i]), quals[i][name][0]) for i in idx]
            png = plot_tradeoff(points, [labels[i] for i in idx], metric, x_name, maximize_x)
            path = out_dir / f"{_slug(name)}_vs_{x_slug}.png"
            with atomic_file(path, "wb") as f:
                f.write(png)
            written.append(path)
    return written


# ------------------------------------------------------------------ the report
@dataclass
class Report:
    markdown: str
    markdown_path: Path
    plots: list[Path]


def _notes(records: Sequence[RunRecord], labels: Sequence[str]) -> list[str]:
    notes = []
    for lab, r in zip(labels, records, strict=True):
        if not r.complete:
            notes.append(f"- **{lab}**: incomplete run (interrupted); its numbers cover what finished.")
        assumption = _get(r.cost, "energy", "assumption")
        if assumption:
            notes.append(f"- **{lab}**: energy is an {assumption}")
        for warning in r.cost.get("warnings") or []:
            notes.append(f"- **{lab}**: {warning}")
        if r.quality.get("perplexity") is None and not r.quality.get("tasks"):
            notes.append(f"- **{lab}**: no quality figure in this record (run without quality).")
    return notes


def write_report(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Report:
    """Load and validate the records, write OUT_DIR/report.md and the trade-off PNGs."""
    if not paths:
        raise LeanfmError("no run records given; pass one or more JSON files from leanfm eval/bench")
    records = [load_record(p) for p in paths]
    labels = labels_for(records, paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(records, labels, out)
    parts = ["# leanfm report", "", "Records: " + ", ".join(f"`{p}`" for p in paths), "", render_table(records, labels)]
    notes = _notes(records, labels)
    if notes:
        parts += ["Notes:", "", *notes, ""]
    if plots:
        parts += ["## Trade-offs", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    elif len(records) > 1:
        parts += ["(No plot: no quality metric is present in two or more records.)", ""]
    markdown = "\n".join(parts)
    md_path = out / "report.md"
    with atomic_file(md_path) as f:
        f.write(markdown)
    return Report(markdown, md_path, plots)
