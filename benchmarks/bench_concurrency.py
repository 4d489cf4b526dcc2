"""Concurrent serving throughput: leanfm's engine against its own batch-1 rate and against llama.cpp
serving the same prompts as parallel sequences, on the same weights.

    python benchmarks/bench_concurrency.py [--model gemma-3-270m] [--threads 2] [--concurrency 16]
        [--tokens 128] [--rounds 2] [--int8 DIR] [--formats fp32,int8] [--skip-llamacpp] [--json OUT]

Per weight format (fp32: leanfm's float base; int8: a `leanfm compress --method rtn --bits 8
--group-size -1` artifact, built into DIR when missing), each round runs, interleaved:
  batch1    the engine with one request (a short prompt), 128 greedy tokens: decode tok/s;
  leanfm    --concurrency requests at once, prompts of 256-1024 tokens from the wiki eval split, --tokens
            output tokens each (EOS ignored): total output tokens/s over the whole run, prefill included
            (benchmarks/bench_engine.py's `concurrent`);
  llama.cpp the same prompts as --concurrency sequences of one llama.cpp context, batched decode
            (benchmarks/anchors/llamacpp_batched.py), on the GGUF nearest the format: F32 and F16
            exports of the float base for fp32, llama.cpp's Q8_0 for int8 (files of
            benchmarks/anchors/llamacpp_quant.py's cache; run it once to create them).
Prints medians and the ratios leanfm / batch1 (target >= 4x) and leanfm / llama.cpp (target >= 2x),
by wall clock and per CPU-second of the process (time.process_time), with the machine's load; then the
workload's FLOPs and the most output tok/s any engine could reach at this process's best fp32 GEMM
rate (benchmarks/workload_bound.py), and what share of that bound each target asks for.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import concurrent, corpus_prompts  # noqa: E402
from workload_bound import measured_gemm_peak, workload_flops  # noqa: E402

GGUF_FOR = {"fp32": ("F32.gguf", "F16.gguf"), "int8": ("Q8_0*.gguf",)}


def gguf_files(model: str, fmt: str) -> list[str]:
    root = Path.home() / ".cache" / "leanfm" / "llamacpp_quant"
    return [f for pattern in GGUF_FOR[fmt] for f in sorted(glob.glob(str(root / f"{model}-*" / pattern)))[-1:]]


def load(model: str, fmt: str, int8_dir: str):
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    ref = model
    if fmt == "int8":
        if not Path(int8_dir, "leanfm_compressed.json").is_file():
            subprocess.run([sys.executable, "-m", "leanfm.cli", "compress", "--model", model, "--method", "rtn",
                            "--bits", "8", "--group-size", "-1", "-o", int8_dir], check=True)
        ref = int8_dir
    loaded = load_model(ref, dtype=torch.float32, progress=False)
    prepare_for_inference(loaded.model)
    return loaded


def batch1_rate(loaded, n_tokens: int) -> tuple[float, float]:
    """The engine's decode tok/s with one request, and tokens per CPU-second of the whole request."""
    from bench_engine import PROMPT

    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    llm = LLM(loaded, max_num_seqs=1)
    llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0.0))
    c = time.process_time()
    out = llm.generate(PROMPT, SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True))[0]
    return out.metrics.decode_tokens_per_second, n_tokens / (time.process_time() - c)


def run_round(loaded, fmt: str, prompts, args, rows: dict) -> None:
    from anchors.llamacpp_batched import batched_generate

    rate = batch1_rate(loaded, args.tokens)
    rows.setdefault(f"{fmt} batch1", []).append({"output_tok_s": rate[0], "output_tok_per_cpu_s": rate[1]})
    print(json.dumps({f"{fmt} batch1": rows[f"{fmt} batch1"][-1]}), flush=True)
    res = concurrent(loaded, args.concurrency, args.tokens, rate)
    rows.setdefault(f"{fmt} leanfm", []).append(res)
    print(json.dumps({f"{fmt} leanfm": res}), flush=True)
    if args.skip_llamacpp:
        return
    for path in gguf_files(args.model, fmt):
        r = batched_generate(path, prompts, args.tokens, args.threads)
        r.pop("tokens")
        key = f"{fmt} llama.cpp {Path(path).name.split('.')[0]}"
        rows.setdefault(key, []).append(r)
        print(json.dumps({key: r}), flush=True)


def summarize(rows: dict) -> dict:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("output_tok_s", "output_tok_per_cpu_s")}
           for k, v in rows.items()}
    ratios = {}
    for key, m in med.items():
        fmt, who = key.split(" ", 1)
        if who == "leanfm":
            b = med[f"{fmt} batch1"]
            ratios[f"{fmt} leanfm / batch1"] = {"wall": m["output_tok_s"] / b["output_tok_s"],
                                                 "cpu": m["output_tok_per_cpu_s"] / b["output_tok_per_cpu_s"]}
        elif who.startswith("llama.cpp"):
            lf = med[f"{fmt} leanfm"]
            ratios[f"{fmt} leanfm / {who}"] = {"wall": lf["output_tok_s"] / m["output_tok_s"],
                                                "cpu": lf["output_tok_per_cpu_s"] / m["output_tok_per_cpu_s"]}
    return {"medians": med, "ratios": ratios}


def compute_bound(loaded, prompts, n_out: int, medians: dict) -> dict:
    """The workload's FLOPs (workload_bound.py), the fastest it could run at this process's best fp32
    GEMM rate, and what each target (4x own batch-1, 2x llama.cpp) asks of that bound."""
    flops = workload_flops(loaded.model.config, [len(p) for p in prompts], n_out)
    peak = measured_gemm_peak()
    max_tok_s = len(prompts) * n_out / (flops["total"] / (peak * 1e9))
    targets, achieved = {}, {}
    for key, m in medians.items():
        fmt, who = key.split(" ", 1)
        if who != "batch1":  # the concurrent runs: leanfm and llama.cpp
            achieved[key] = m["output_tok_s"] / max_tok_s
        factor = 4 if who == "batch1" else 2 if who.startswith("llama.cpp") else None
        if factor:
            need = factor * m["output_tok_s"]
            targets[f"{fmt}: {factor}x {who}"] = {"tok_s": need, "of_bound": need / max_tok_s}
    return {"tflop": flops["total"] / 1e12, "flops": flops, "gemm_peak_gflops": peak,
            "max_output_tok_s": max_tok_s, "targets": targets, "achieved_of_bound": achieved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--formats", default="fp32,int8")
    ap.add_argument("--int8", default=str(Path.home() / ".cache" / "leanfm" / "artifacts" / "gemma-3-270m-rtn8"))
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"model": args.model, "threads": args.threads, "concurrency": args.concurrency,
                    "tokens": args.tokens, "loadavg_start": os.getloadavg()}
    models = {fmt: load(args.model, fmt, args.int8) for fmt in args.formats.split(",")}
    prompts = corpus_prompts(next(iter(models.values())).tokenizer, args.concurrency, 256, 1024)
    rows: dict = {}
    for _ in range(args.rounds):
        for fmt, loaded in models.items():
            run_round(loaded, fmt, prompts, args, rows)
    result.update(summarize(rows), rounds=rows, loadavg_end=os.getloadavg())
    result["bound"] = compute_bound(next(iter(models.values())), prompts, args.tokens, result["medians"])
    for key, r in result["ratios"].items():
        print(f"{key:<40} {r['wall']:6.2f}x wall   {r['cpu']:6.2f}x per CPU-second")
    b = result["bound"]
    print(f"compute bound: {b['tflop']:.2f} TFLOP at the measured fp32 GEMM peak {b['gemm_peak_gflops']:.0f} GFLOP/s "
          f"-> at most {b['max_output_tok_s']:.1f} output tok/s on this machine")
    for key, share in b["achieved_of_bound"].items():
        print(f"  {key:<38} reaches {share:.0%} of the bound")
    for key, need in b["targets"].items():
        print(f"  {key:<38} needs {need['tok_s']:6.1f} tok/s = {need['of_bound']:.0%} of the bound")
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
        print(f"wrote {args.json}")
    else:
        print(text)


if __name__ == "__main__":
    main()
