"""The measuring verbs as typer command functions; leanfm/cli.py registers them:

    app.command("eval")(eval_cmd)      # leanfm eval --model M --ppl wiki --tasks a,b -o run.json
    app.command("bench")(bench_cmd)    # leanfm bench --model M --prefill 128,512 --batches 1,4
    app.command("report")(report_cmd)  # leanfm report A.json B.json -o DIR

Each run writes a RunRecord holding quality AND cost (principle 8): eval records the cost of the
evaluation itself; bench records a quick perplexity (4 windows of 512 on the built-in wiki eval split)
unless --no-quality. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from leanfm.cli_common import AdapterOpt, DtypeOpt, ModelOpt, ThreadsOpt, load_for_inference, setup_torch
from leanfm.utils.errors import LeanfmError

SeedOpt = Annotated[int, typer.Option(help="random seed (task sampling, few-shot examples)")]
OutOpt = Annotated[Path | None, typer.Option("--output", "-o", help="record path (default: runs/<kind>-<model>-<time>.json)")]

QUICK_CTX, QUICK_WINDOWS = 512, 4


def _mod(name: str) -> Any:
    """A leanfm.bench submodule by name (looked up at call time, so tests can substitute it)."""
    return importlib.import_module(f"leanfm.bench.{name}")


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise LeanfmError(f"{flag} takes comma-separated integers, e.g. {flag} 128,512; got {text!r}") from None
    if not values:
        raise LeanfmError(f"{flag} needs at least one value, e.g. {flag} 128,512")
    return values


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _perplexity(loaded: Any, corpus: str, ctx: int, stride: int | None, max_tokens: int | None) -> dict[str, Any]:
    ppl_mod, corpora = _mod("perplexity"), _mod("corpora")
    text = corpora.load_corpus(corpus, split="eval")
    cfg = ppl_mod.PerplexityConfig(ctx=ctx, stride=stride, max_tokens=max_tokens)
    res = ppl_mod.perplexity(loaded.model, loaded.tokenizer, text, cfg, progress=True)
    from leanfm.bench.record import jsonable

    return {"corpus": corpus, "ctx": ctx, "stride": stride, "max_tokens": max_tokens, **jsonable(res)}


def _memory(loaded: Any, files: list[Path], peak_reset: bool) -> dict[str, Any]:
    from leanfm.bench.cost import files_bytes, model_bytes
    from leanfm.bench.system import peak_rss_bytes

    return {"peak_rss_bytes": peak_rss_bytes(), "peak_rss_reset": peak_reset,
            "model_bytes": model_bytes(loaded.model), "disk_bytes": files_bytes(files) if files else None}


def _task_line(name: str, r: dict[str, Any]) -> str:
    parts = []
    for key in ("acc", "acc_norm"):
        if r.get(key) is not None:
            err = r.get(f"{key}_stderr")
            parts.append(f"{key}={r[key]:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
    return f"{name}: " + " ".join(parts or ["no score"])


def _resolve_tasks(names: list[str], task_file: Path | None) -> list[tuple[str, Any]]:
    """[(name, what evaluate_tasks takes)]: built-in names checked up front, the user task loaded (a Task)."""
    if not names and task_file is None:
        return []
    tasks = _mod("tasks")
    known = set(tasks.list_tasks())
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = sorted(n for n in known if not n.startswith("mmlu_"))
        more = ", mmlu_<subject>" if any(n.startswith("mmlu_") for n in known) else ""
        raise LeanfmError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(shown)}{more}")
    out: list[tuple[str, Any]] = [(n, n) for n in names]
    if task_file is not None:
        user = tasks.load_user_task(task_file)
        out.append((user if isinstance(user, str) else user.name, user))
    return out


def _measure_eval(loaded: Any, files: list[Path], ppl: str | None, ppl_args: tuple,
                  task_list: list[tuple[str, Any]], task_kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Run perplexity then each task, printing results; (quality, cost, interrupted). Ctrl-C keeps what finished."""
    from leanfm.bench.record import jsonable
    from leanfm.bench.system import EnergyMeter, busy_warning, load_average, reset_peak_rss

    quality: dict[str, Any] = {"perplexity": None, "tasks": {}}
    cost: dict[str, Any] = {"load_seconds": loaded.load_seconds, "eval_tokens_per_second": None,
                            "perplexity_seconds": None, "tasks_seconds": 0.0}
    load0, peak_reset, total, ppl_meter = load_average(), reset_peak_rss(), EnergyMeter().start(), EnergyMeter()
    t0, interrupted, per_token = time.perf_counter(), False, None
    try:
        if ppl is not None:
            ppl_meter.start()
            p = quality["perplexity"] = _perplexity(loaded, ppl, *ppl_args)
            joules = ppl_meter.stop()["joules"]
            cost.update(eval_tokens_per_second=p["tokens_per_second"], perplexity_seconds=p["seconds"],
                        eval_tokens=p.get("n_input_tokens") or p["n_scored_tokens"])
            per_token = joules / max(cost["eval_tokens"], 1)
            typer.echo(f"perplexity: {p['ppl']:.4f}")
        for name, task in task_list:
            res = _mod("tasks").evaluate_tasks(loaded.model, loaded.tokenizer, [task], progress=True, **task_kw)
            r = quality["tasks"][name] = jsonable(res[name].to_dict() if hasattr(res[name], "to_dict") else res[name])
            cost["tasks_seconds"] += float(r.get("seconds") or 0.0)
            typer.echo(_task_line(name, r))
    except KeyboardInterrupt:
        interrupted = True
    cost.update(wall_seconds=time.perf_counter() - t0, memory=_memory(loaded, files, peak_reset),
                energy={**total.stop(), "joules_per_token": per_token})
    loads = [x for x in (load0, load_average()) if x is not None]
    cost["load_avg_1m"] = {"start": load0, "end": loads[-1] if len(loads) == 2 else None}
    cost["warnings"] = [w for w in [busy_warning(max(loads, default=None))] if w]
    for w in cost["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    return quality, cost, interrupted


def eval_cmd(
    model: ModelOpt = "gemma-3-270m",
    ppl: Annotated[str | None, typer.Option(help="corpus name (wiki, books) or text file for perplexity")] = None,
    ctx: Annotated[int, typer.Option(help="perplexity window, tokens (BOS included)")] = 512,
    stride: Annotated[int | None, typer.Option(help="new tokens per window (default: disjoint windows)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="score only the first N tokens of the text")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names")] = None,
    limit: Annotated[int | None, typer.Option(help="examples per task at most")] = None,
    seed: SeedOpt = 0,
    few_shot: Annotated[int, typer.Option(help="in-context examples per question")] = 0,
    task_file: Annotated[Path | None, typer.Option(help="a user task (.jsonl) to evaluate too")] = None,
    threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32",
    output: OutOpt = None,
    adapter: AdapterOpt = None,
) -> None:
    """Measure quality (perplexity, tasks) and what it cost; write a run record."""
    from leanfm.bench.record import RunRecord, default_record_path, model_info, provenance, save_record
    from leanfm.bench.record import weight_files as find_weights

    torch_dtype, dtype_name = setup_torch(threads, dtype, seed)
    task_list = _resolve_tasks(_names(tasks), task_file)
    task_names = [n for n, _ in task_list]
    if ppl is None and not task_list:
        ppl = "wiki"
    loaded = load_for_inference(model, torch_dtype, adapter)
    files = find_weights(loaded.path)
    split = "eval" if ppl in getattr(_mod("corpora"), "CORPORA", {}) else None
    dataset = "; ".join(x for x in (ppl, "tasks: " + ",".join(task_names) if task_names else "") if x)
    prov = provenance(model, dtype_name, files, dataset=dataset or None, split=split, seed=seed, limit=limit)
    out = output or default_record_path("eval", model)
    quality, cost, interrupted = _measure_eval(loaded, files, ppl, (ctx, stride, max_tokens), task_list,
                                               dict(limit=limit, seed=seed, few_shot=few_shot))
    notes = ["interrupted by the user: quality covers only what finished"] if interrupted else []
    record = RunRecord("eval", prov, model_info(loaded.model, loaded.path), quality, cost,
                       complete=not interrupted, notes=notes)
    save_record(record, out)
    typer.echo(f"record: {out}")
    if interrupted:
        typer.echo(f"interrupted: saved what finished to {out} (complete: false)", err=True)
        raise typer.Exit(130)


def bench_cmd(
    model: ModelOpt = "gemma-3-270m",
    prefill: Annotated[str, typer.Option(help="prompt lengths for prefill, comma-separated")] = "128,512,2048",
    batches: Annotated[str, typer.Option(help="decode batch sizes, comma-separated")] = "1,4,16",
    decode_tokens: Annotated[int, typer.Option(help="tokens decoded per run")] = 64,
    repeats: Annotated[int, typer.Option(help="timed runs per measurement (after warm-up)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 1,
    no_quality: Annotated[bool, typer.Option("--no-quality", help="skip the quick perplexity")] = False,
    concurrency: Annotated[str | None, typer.Option(help="also serve N concurrent requests through the engine "
                                                         "for each N, comma-separated (e.g. 1,4,16)")] = None,
    threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
    output: OutOpt = None,
) -> None:
    """Measure cost (prefill/decode speed, latency, memory, bandwidth, energy) with a quick quality check."""
    from leanfm.bench.cost import CostConfig, measure_cost
    from leanfm.bench.record import RunRecord, default_record_path, model_info, provenance, save_record
    from leanfm.bench.record import weight_files as find_weights

    torch_dtype, dtype_name = setup_torch(threads, dtype, seed)
    cfg = CostConfig(prefill_lengths=_int_list(prefill, "--prefill"), decode_batches=_int_list(batches, "--batches"),
                     decode_tokens=decode_tokens, warmup=warmup, repeats=repeats)
    levels = _int_list(concurrency, "--concurrency") if concurrency is not None else ()
    if any(n < 1 for n in levels):
        raise LeanfmError(f"--concurrency takes positive integers, e.g. --concurrency 1,4,16; got {concurrency!r}")
    loaded = load_for_inference(model, torch_dtype)
    files = find_weights(loaded.path)
    prov = provenance(model, dtype_name, files, dataset=None if no_quality else "wiki",
                      split=None if no_quality else "eval", seed=seed)
    out = output or default_record_path("bench", model)
    quality: dict[str, Any] = {"perplexity": None, "tasks": {}}
    try:
        if not no_quality:
            ctx = min(QUICK_CTX, loaded.model.config.max_position_embeddings)
            quality["perplexity"] = _perplexity(loaded, "wiki", ctx, None, QUICK_WINDOWS * (ctx - 1))
        cost = measure_cost(loaded.model, loaded.tokenizer, cfg, weight_files=files, progress=True)
        if levels:
            cost["concurrency"] = _mod("serving").measure_concurrency(
                loaded.model, loaded.tokenizer, levels, cfg.decode_prompt_tokens, decode_tokens)
    except KeyboardInterrupt:
        typer.echo("interrupted; no record written", err=True)
        raise typer.Exit(130) from None
    cost["load_seconds"] = loaded.load_seconds
    notes = ["--no-quality: no quality figure measured"] if no_quality else []
    record = RunRecord("bench", prov, model_info(loaded.model, loaded.path), quality, cost, notes=notes)
    save_record(record, out)
    typer.echo(format_bench(record))
    typer.echo(f"record: {out}")


def report_cmd(
    records: Annotated[list[Path] | None, typer.Argument(help="run records (JSON) from leanfm eval/bench")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="directory for report.md and plots")] = Path("report"),
) -> None:
    """Put run records side by side: a markdown table (quality and cost) and trade-off plots."""
    from leanfm.bench.report import write_report

    rep = write_report(list(records or []), output)
    typer.echo(rep.markdown)
    typer.echo(f"wrote {rep.markdown_path}" + "".join(f"\nwrote {p}" for p in rep.plots))


# ------------------------------------------------------------------ bench table
def _bytes(x: float | None) -> str:
    from leanfm.bench.report import human_bytes

    return "—" if x is None else human_bytes(x)


def format_bench(record: Any) -> str:
    """A readable summary of a bench record: quality first, then cost."""
    c, rows = record.cost, []
    p = record.quality.get("perplexity")
    rows.append(("quality", f"perplexity {p['ppl']:.4f} ({p['corpus']} eval, {p['n_windows']} windows of "
                            f"{p['ctx']}, {p['n_scored_tokens']} tokens)" if p else "not measured (--no-quality)"))
    for n, r in c["prefill"].items():
        s = r["tokens_per_second"]
        clamp = " (clamped to context)" if r["clamped"] else ""
        rows.append((f"prefill {n}", f"{s['median']:9.1f} tok/s  [min {s['min']:.1f}, max {s['max']:.1f}]  "
                                     f"{r['tokens']} tok in {r['seconds']['median'] * 1e3:.1f} ms{clamp}"))
    for b, r in c["decode"].items():
        s, per = r["tokens_per_second_total"], r["tokens_per_second_per_sequence"]["median"]
        rows.append((f"decode B={b}", f"{s['median']:9.1f} tok/s  [min {s['min']:.1f}, max {s['max']:.1f}]  "
                                      f"{per:.1f} tok/s per sequence, {r['new_tokens']} tokens after "
                                      f"{r['prompt_tokens']}"))
    ttft, tpot = c["ttft_seconds"], c["tpot_seconds"]
    rows.append(("TTFT", f"{ttft['median'] * 1e3:.1f} ms at {ttft['prompt_tokens']} prompt tokens"))
    if tpot:
        rows.append(("TPOT", f"{tpot['median'] * 1e3:.1f} ms per output token (B=1)"))
    for n, r in (c.get("concurrency") or {}).items():
        tpot = r["tpot_seconds"]
        rows.append((f"serve N={n}", f"{r['output_tokens_per_second']:9.1f} tok/s out, "
                                     f"{r['total_tokens_per_second']:.1f} tok/s total; TTFT median "
                                     f"{r['ttft_seconds']['median'] * 1e3:.1f} ms, TPOT median "
                                     + (f"{tpot['median'] * 1e3:.1f} ms" if tpot else "—")))
    m = c["memory"]
    rows.append(("memory", f"model {_bytes(m['model_bytes'])} in memory, {_bytes(m['disk_bytes'])} on disk; "
                           f"peak RSS {_bytes(m['peak_rss_bytes'])}"))
    bw = c["bandwidth"]
    if bw["achieved_gb_s"] is not None:
        frac = f" = {bw['fraction']:.0%} of" if bw["fraction"] is not None else " vs"
        rows.append(("bandwidth", f"{bw['weight_bytes_per_token'] / 1e9:.3f} GB of weights/token -> "
                                  f"{bw['achieved_gb_s']:.2f} GB/s at B=1{frac} {bw['machine_gb_s']:.2f} GB/s measured"))
    e = c["energy"]
    src = e["assumption"] if e["energy_source"] == "estimate" else "RAPL counters"
    rows.append(("energy", f"{e['joules_per_token']:.3g} J/token (B={e['batch']}; {src})"))
    rows += [("WARNING", w) for w in c.get("warnings", [])]
    head = f"{record.provenance['model_reference']} ({c['dtype']}, {c['threads']} threads)"
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])
