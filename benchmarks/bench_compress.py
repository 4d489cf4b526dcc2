"""The compression table: every method on the same base, same held-out windows, next to llama.cpp's quantizer.

    python benchmarks/bench_compress.py [--model gemma-3-270m] [--windows 16] [--calib 64] [--readme]
    python benchmarks/bench_compress.py --from-json compress.json --readme     # table from a saved run
    python benchmarks/bench_compress.py --speed-only --json J --anchors OLD.json   # re-time J's artifacts, with
                                                                               # OLD's llama.cpp rows

Each variant is compressed from the float base (gemma-3-270m: its 4-bit GGUF dequantized), saved as an
artifact, reloaded from disk in the same process and measured: bits per weight (disk bytes x 8 / base
parameters), bytes, perplexity on the harness' held-out wiki split (the same windows for every row,
calibration from the disjoint calib split) and batch-1 decode tokens/s. llama.cpp's rows come from its
own quantizer (Q8_0, Q4_0, Q4_K_M made from leanfm's F16 export) scored on the same token windows.
Then the issue's claims are checked one by one and printed PASS/FAIL with the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from leanfm.bench.tour import RECIPES, TourConfig, format_rows, pareto_plot, run_variant  # noqa: E402

L_H = ["model.layers.*", "lm_head"]
VARIANTS: dict[str, list[dict]] = {
    **RECIPES,  # int8, rtn-4, gptq-4, awq-4, wanda-50+int4
    "magnitude-50": [{"method": "magnitude", "sparsity": 0.5}],
    "wanda-50": [{"method": "wanda", "sparsity": 0.5}],
    "sparsegpt-50": [{"method": "sparsegpt", "sparsity": 0.5}],
    "sparsegpt-2:4": [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "pack": True}],
    "svd-0.8": [{"method": "svd", "param_ratio": 0.8}],
    "asvd-0.8": [{"method": "asvd", "param_ratio": 0.8}],
    "svdllm-0.8": [{"method": "asvd", "variant": "whiten", "param_ratio": 0.8}],
    "shortgpt-3": [{"method": "shortgpt", "n_layers": 3}],
    "channels-25": [{"method": "channels", "ffn_sparsity": 0.25}],
    "shortgpt-3+distill": [{"method": "shortgpt", "n_layers": 3},
                           {"method": "distill", "steps": 60, "seq_len": 128, "batch_size": 2, "lr": 1e-4}],
}
ORDER = ["int8", "int4-all", "rtn-4", "gptq-4", "awq-4", "magnitude-50", "wanda-50", "sparsegpt-50", "sparsegpt-2:4",
         "svd-0.8", "asvd-0.8", "svdllm-0.8", "wanda-50+int4", "shortgpt-3", "shortgpt-3+distill", "channels-25"]


def identical_reload(row: dict) -> bool:
    """The artifact loaded in a fresh process gives bit-identical logits to the model compress_ produced."""
    import subprocess

    from leanfm.bench.tour import reference_logits_path

    code = ("import sys, torch; from leanfm.checkpoint.loader import load_model; "
            "from leanfm.bench.tour import probe_logits; "
            "ok = torch.equal(probe_logits(load_model(sys.argv[1], progress=False).model), torch.load(sys.argv[2])); "
            "sys.exit(0 if ok else 3)")
    ref = reference_logits_path(Path(row["path"]))
    return subprocess.run([sys.executable, "-c", code, row["path"], str(ref)]).returncode == 0


def checks(rows: dict[str, dict], anchors: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The issue's claims, each (claim, passed or None if not measured, figures)."""
    def ppl(n):
        return rows[n]["ppl"] if n in rows else float("nan")

    out: list[tuple[str, bool | None, str]] = []

    def add(claim, names, ok, figures):
        out.append((claim, ok if all(n in rows for n in names) else None, figures))

    b = ppl("base")
    add("int8 weight-only ppl within 1% of the base", ["int8"], ppl("int8") <= 1.01 * b,
        f"{ppl('int8'):.3f} vs {b:.3f} ({100 * (ppl('int8') / b - 1):+.2f}%)")
    add("GPTQ-4 and AWQ-4 (g128) below RTN-4", ["gptq-4", "awq-4", "rtn-4"],
        ppl("gptq-4") < ppl("rtn-4") and ppl("awq-4") < ppl("rtn-4"),
        f"gptq {ppl('gptq-4'):.3f}, awq {ppl('awq-4'):.3f}, rtn {ppl('rtn-4'):.3f}")
    add("50% unstructured: SparseGPT <= Wanda < magnitude", ["sparsegpt-50", "wanda-50", "magnitude-50"],
        ppl("sparsegpt-50") <= ppl("wanda-50") < ppl("magnitude-50"),
        f"sparsegpt {ppl('sparsegpt-50'):.3f}, wanda {ppl('wanda-50'):.3f}, magnitude {ppl('magnitude-50'):.3f}")
    add("2:4 runs", ["sparsegpt-2:4"], ppl("sparsegpt-2:4") < float("inf"), f"ppl {ppl('sparsegpt-2:4'):.3f}")
    add("ASVD (and SVD-LLM whitening) beat SVD at equal parameter count", ["asvd-0.8", "svdllm-0.8", "svd-0.8"],
        max(ppl("asvd-0.8"), ppl("svdllm-0.8")) < ppl("svd-0.8"),
        f"asvd {ppl('asvd-0.8'):.4g}, svd-llm {ppl('svdllm-0.8'):.4g}, svd {ppl('svd-0.8'):.4g}")
    if "wanda-50+int4" in rows:
        same = rows["wanda-50+int4"].get("reload_identical_fresh_process")
        add("prune then quantize: saves and reloads with identical logits", ["wanda-50+int4"], bool(same),
            f"fresh-process reloads bit-identical: {same}; ppl {ppl('wanda-50+int4'):.3f}")
    s, d = ppl("shortgpt-3"), ppl("shortgpt-3+distill")
    add("distillation after layer removal recovers part of the lost perplexity", ["shortgpt-3", "shortgpt-3+distill"],
        d < s, f"removed {s:.3f} -> distilled {d:.3f} (base {b:.3f}; recovered {100 * (s - d) / max(s - b, 1e-9):.0f}%)")
    for name, target in (("int4-all", 2.0), ("int8", 1.5)):
        if name in rows:
            r = rows[name]["decode_tok_s"] / rows["base"]["decode_tok_s"]
            add(f"{name} decodes >= {target}x the fp32 base", [name], r >= target,
                f"{rows[name]['decode_tok_s']:.1f} vs {rows['base']['decode_tok_s']:.1f} tok/s = {r:.2f}x")
    for name, what in (("sparsegpt-2:4", "2:4 (packed)"), ("shortgpt-3", "3 layers removed"),
                       ("channels-25", "25% of FFN channels removed")):
        if name in rows:
            r = rows[name]["decode_tok_s"] / rows["base"]["decode_tok_s"]
            add(f"{what} decodes faster than the fp32 base", [name], r > 1.0,
                f"{rows[name]['decode_tok_s']:.1f} vs {rows['base']['decode_tok_s']:.1f} tok/s = {r:.2f}x")
    if "int4-all" in rows:
        bf16 = rows["base"]["disk_bytes"] / 2  # the base artifact is fp32
        frac = rows["int4-all"]["disk_bytes"] / bf16
        add("int4 artifact <= 30% of the bf16 size", ["int4-all"], frac <= 0.30, f"{100 * frac:.1f}% of bf16")
    q4km = next((a for a in anchors if a["name"] == "Q4_K_M"), None)
    # like with like: Q4_K_M is a mix (its 640-wide rows cannot take Q4_K and fall back to Q5_0/Q8_0; the
    # tied embedding/head is Q8_0), so compare the decoder layers' bits per weight, head at 8 bits on both
    ours = [(rows[n]["ppl"], n, rows[n].get("bpw_layers") or 99) for n in ("rtn-4", "gptq-4", "awq-4") if n in rows]
    if q4km and ours:  # the goal asks for <= 4.5 bpw; the best row is reported (and fails) when it is above
        best = min(ours)
        out.append(("best leanfm 4-bit (<= 4.5 bpw in the layers) matches or beats llama.cpp Q4_K_M",
                    best[0] <= q4km["ppl"] and best[2] <= 4.5 + 1e-3,
                    f"{best[1]} ppl {best[0]:.3f} at {best[2]:.2f} bpw (layers) vs Q4_K_M {q4km['ppl']:.3f} at "
                    f"{q4km.get('bpw_linear', float('nan')):.2f} bpw (layers), {q4km['bits_per_weight']:.2f} whole file"))
    return out


def speed_phase(rows: dict[str, dict], names: list[str], tokens: int, rounds: int, threads: int) -> dict:
    """Batch-1 decode tok/s of every artifact, measured in interleaved rounds (base, int8, int4-all, ...
    base, int8, ...) after all of them are built: a shared machine's speed drifts over minutes, and
    interleaving puts every row under the same drift. Each row gets the median of its rounds."""
    from leanfm.bench.tour import decode_tokens_per_second
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    torch.set_num_threads(threads)
    models = {}
    for n in ["base", *names]:
        if n in rows and Path(rows[n]["path"]).exists():
            lm = load_model(rows[n]["path"], progress=False)
            models[n] = (prepare_for_inference(lm.model), lm.tokenizer)
    samples: dict[str, list[float]] = {n: [] for n in models}
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        for r in range(rounds):
            for n, (model, tok) in models.items():
                samples[n].append(decode_tokens_per_second(model, tok, tokens, 1))
            print(f"speed round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in samples.items()),
                  flush=True)
    for n, v in samples.items():
        rows[n]["decode_tok_s"] = statistics.median(v)
        rows[n]["decode_rounds"] = [round(x, 2) for x in v]
    return {"tokens": tokens, "rounds": rounds, "load_before": load_before, "load_after": os.getloadavg()[0]}


def llamacpp_rows(model: str, windows: int, ctx: int, saved: str | None = None) -> list[dict]:
    if saved:
        old = json.loads(Path(saved).read_text())
        if (old.get("windows"), old.get("ctx")) != (windows, ctx):
            raise SystemExit(f"--anchors {saved}: measured on {old.get('windows')} windows of {old.get('ctx')} tokens, "
                             f"not {windows} of {ctx}; re-run without --anchors")
        return old["anchors"]
    try:
        from anchors.llamacpp_quant import llamacpp_quant_rows
    except ImportError as e:
        print(f"llama.cpp anchor unavailable: {e}")
        return []
    return llamacpp_quant_rows(model, windows=windows, ctx=ctx)


def _ppl(p: float) -> str:
    return f"{p:.3f}" if p < 1e4 else f"{p:.2e}"


def _dppl(p: float, base: float) -> str:
    d = 100 * (p / base - 1)
    return f"{d:+.1f}%" if abs(d) < 1e4 else f"{p / base:.1e}x"


def write_readme(out: dict) -> None:
    from readme_table import write_table

    rows = out["rows"]
    base = rows[0]
    table = []
    for r in rows:
        table.append([r["variant"], f"{r['bits_per_weight']:.2f}", f"{r.get('bpw_layers') or 0:.2f}", f"{r['disk_bytes'] / 2**20:.0f} MiB",
                      _ppl(r["ppl"]), _dppl(r["ppl"], base["ppl"]),
                      f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"])
    for a in out["anchors"]:
        table.append([f"llama.cpp {a['name']}", f"{a['bits_per_weight']:.2f}", f"{a.get('bpw_linear') or 0:.2f}", f"{a['bytes'] / 2**20:.0f} MiB",
                      _ppl(a["ppl"]), _dppl(a["ppl"], base["ppl"]), "-"])
    checks_md = "; ".join(f"{'PASS' if ok else ('FAIL' if ok is False else 'n/a')}: {c} ({f})"
                          for c, ok, f in out["checks"])
    missing = [v for v in ORDER if v not in {r["variant"] for r in rows}]
    partial = (f"PARTIAL RUN: not yet measured: {', '.join(missing)}. " if out.get("partial") and missing else "")
    speed = out.get("speed")
    if speed:
        partial += (f"Decode: batch 1, {speed['tokens']} new tokens, median of {speed['rounds']} rounds interleaved "
                    f"across the rows (1-min load {speed['load_before']:.1f} before, {speed['load_after']:.1f} "
                    "after; above ~1.5 the machine was shared and speeds are noisy). ")
    else:
        partial += "Decode speeds are provisional single runs taken while building (no speed phase). "
    note = (f"{partial}gemma-3-270m (its 4-bit GGUF dequantized to float32 is the base); perplexity on {out['windows']} "
            f"held-out windows of {out['ctx']} tokens (wiki eval split), calibration {out['calib']} x 512 tokens of "
            f"the disjoint calib split; decode: {out['threads']} threads, fp32 activations. "
            f"bits/w = artifact bytes x 8 / base parameters (scales included); 'layers' = the decoder layers' "
            f"matrices alone. llama.cpp rows: its quantizer on "
            f"leanfm's F16 export, scored on the same token windows. 1-min load average at the end: "
            f"{out['load_average']:.1f}. Checks: {checks_md}. Made by `python benchmarks/bench_compress.py --readme`.")
    write_table("compress", ["variant", "bits/w", "bits/w layers", "disk", "ppl", "Δppl", "decode tok/s"], table, note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--variants", default=",".join(ORDER))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib", type=int, default=64, help="calibration samples of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/leanfm-bench-compress")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--anchors", help="take the llama.cpp rows from this earlier --json output instead of re-running "
                                      "llama.cpp (same --windows and --ctx)")
    ap.add_argument("--json", default="benchmarks/results/compress.json")
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--from-json")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json, measure the rest")
    ap.add_argument("--from-partial", action="store_true",
                    help="no measuring: write --json (and the README table with --readme) from the rows finished so far")
    ap.add_argument("--speed-tokens", type=int, default=128, help="new tokens per decode-speed run")
    ap.add_argument("--speed-rounds", type=int, default=5, help="interleaved decode-speed rounds (median)")
    ap.add_argument("--skip-speed", action="store_true", help="build and score the rows only (no speed phase)")
    ap.add_argument("--speed-only", action="store_true",
                    help="re-measure decode speed of the artifacts of the finished rows (--json's .partial.json)")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            write_readme(json.load(f))
        return
    partial = Path(args.json).with_suffix(".partial.json")
    if args.from_partial:
        rows = {r["variant"]: r for r in json.loads(partial.read_text())}
        finish(rows, [], args, partial=True)
        return
    torch.set_num_threads(args.threads)
    names = [v for v in args.variants.split(",") if v]
    if args.speed_only:
        rows = {r["variant"]: r for r in json.loads(partial.read_text())}
        speed = speed_phase(rows, [n for n in names if n in rows], args.speed_tokens, args.speed_rounds, args.threads)
        partial.write_text(json.dumps(list(rows.values()), indent=2, default=str))
        anchors = [] if args.no_llamacpp else llamacpp_rows(args.model, args.windows, args.ctx, args.anchors)
        finish(rows, anchors, args, speed=speed)
        return
    # decode speed while building is a provisional one-run figure; the speed phase below replaces it
    cfg = TourConfig(model=args.model, variants=tuple(names), out_dir=args.out, calib_samples=args.calib,
                     ppl_windows=args.windows, ppl_ctx=args.ctx, recipes=VARIANTS, decode_tokens=8, decode_repeats=1)
    from leanfm.checkpoint.loader import load_model

    base_params = load_model(args.model, progress=False).model.num_parameters()
    rows: dict[str, dict] = {}
    if args.resume and partial.exists():
        rows = {r["variant"]: r for r in json.loads(partial.read_text())}
    for name in ["base", *names]:
        if name in rows:
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        rows[name] = run_variant(name, cfg, base_params)
        if name == "wanda-50+int4":
            rows[name]["reload_identical_fresh_process"] = identical_reload(rows[name])
        print(format_rows(list(rows.values())), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(list(rows.values()), indent=2, default=str))  # --resume continues here
    speed = None
    if not args.skip_speed:
        speed = speed_phase(rows, names, args.speed_tokens, args.speed_rounds, args.threads)
        partial.write_text(json.dumps(list(rows.values()), indent=2, default=str))
    anchors = [] if args.no_llamacpp else llamacpp_rows(args.model, args.windows, args.ctx, args.anchors)
    for a in anchors:
        print(f"llama.cpp {a['name']}: {a['bits_per_weight']:.2f} bpw, ppl {a['ppl']:.3f}")
    finish(rows, anchors, args, speed=speed)


def finish(rows: dict[str, dict], anchors: list[dict], args, partial: bool = False, speed: dict | None = None) -> None:
    """Check the claims, print them, write the JSON, the Pareto plot and (--readme) the README table."""
    results = checks(rows, anchors)
    for claim, ok, figures in results:
        print(f"{'PASS' if ok else ('FAIL' if ok is False else 'n/a '):5} {claim}: {figures}")
    out = {"rows": list(rows.values()), "anchors": anchors, "checks": results, "windows": args.windows,
           "ctx": args.ctx, "calib": args.calib, "threads": args.threads, "load_average": os.getloadavg()[0],
           "partial": partial, "speed": speed}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    pareto_plot(list(rows.values()), Path(args.json).with_suffix(".png"), f"{args.model}: compression methods")
    if args.readme:
        write_readme(out)


if __name__ == "__main__":
    main()
