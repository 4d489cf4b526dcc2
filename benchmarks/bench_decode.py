"""Batch-1 decode speed: leanfm against transformers' generate, same model, weights, dtype and threads.

    python benchmarks/bench_decode.py [--model gemma-3-270m] [--tokens 128] [--threads 2] [--dtype float32]

Both runs greedy-decode `--tokens` new tokens (EOS ignored) from the same prompt, on the same
dequantized weights (the GGUF's 4-bit/8-bit values turned into floats; transformers loads the HF
directory leanfm cached). Prints tokens/s for each, the ratio, achieved weight bandwidth, and leanfm's
load time cold (empty cache: GGUF -> float base) and cached. Repeats alternate between the two engines so that drift in machine load hits both alike; still,
run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

PROMPT = "The history of the printing press begins in"


def leanfm_runner(loaded, n_tokens: int):
    from leanfm.engine.generate import Generator
    from leanfm.engine.params import SamplingParams

    gen = Generator(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    gen.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up

    def run() -> float:
        r = gen.generate(PROMPT, params)
        assert len(r.token_ids) == n_tokens
        return r.decode_tokens_per_second

    return run


def hf_runner(path, dtype, prompt_ids: list[int], n_tokens: int):
    """tokens/s of the decode phase: (time(n) - time(1)) / (n - 1), prefill excluded as for leanfm."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt_ids])

    def timed(n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    timed(8)  # warm-up

    def run() -> float:
        t1, tn = timed(1), timed(n_tokens)
        return (n_tokens - 1) / (tn - t1)

    return run


def cold_load_seconds(model: str, dtype: str) -> float:
    """Load time with an empty cache (GGUF dequantized and cached), in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            "import time, torch; t=time.perf_counter(); from leanfm.checkpoint.loader import load_model; "
            f"load_model({model!r}, dtype=torch.{dtype}, progress=False); print(time.perf_counter()-t)"
        )
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LEANFM_CACHE": tmp},
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def cached_load_seconds(model: str, dtype: str) -> float:
    code = (
        "import time, torch; t=time.perf_counter(); from leanfm.checkpoint.loader import load_model; "
        f"load_model({model!r}, dtype=torch.{dtype}, progress=False); print(time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold-load measurement")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--from-json", help="skip measuring: write the README table from a saved --json file")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            r = json.load(f)
        write_readme(r, len(r["leanfm_tok_s"]))
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference
    from leanfm.models.cost import weight_bytes_read_per_token

    cold = None if args.skip_cold else cold_load_seconds(args.model, args.dtype)
    cached = cached_load_seconds(args.model, args.dtype)
    loaded = load_model(args.model, dtype=dtype, progress=False)
    prepare_for_inference(loaded.model)
    run_ours = leanfm_runner(loaded, args.tokens)
    run_theirs = hf_runner(loaded.path, dtype, loaded.tokenizer.encode(PROMPT), args.tokens)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        ours.append(run_ours())
        theirs.append(run_theirs())

    from leanfm.checkpoint.inspect import read_config

    config, _ = read_config(args.model)
    bytes_per_token = weight_bytes_read_per_token(config, torch.finfo(dtype).bits // 8)
    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    result = {
        "model": args.model, "dtype": args.dtype, "threads": args.threads, "new_tokens": args.tokens,
        "leanfm_tok_s": ours, "transformers_tok_s": theirs, "ratio": med_ours / med_theirs,
        "leanfm_GB_s": med_ours * bytes_per_token / 1e9, "transformers_GB_s": med_theirs * bytes_per_token / 1e9,
        "load_cold_s": cold, "load_cached_s": cached, "load_average_1m": os.getloadavg()[0],
    }
    print(f"model {args.model} (4-bit GGUF dequantized to {args.dtype}), {args.threads} threads, "
          f"batch 1, {args.tokens} new tokens, greedy; median of {args.repeats}")
    print(f"{'':14}{'tok/s':>10}{'GB/s':>8}   runs")
    print(f"{'leanfm':14}{med_ours:>10.2f}{result['leanfm_GB_s']:>8.1f}   {', '.join(f'{r:.2f}' for r in ours)}")
    print(f"{'transformers':14}{med_theirs:>10.2f}{result['transformers_GB_s']:>8.1f}   "
          f"{', '.join(f'{r:.2f}' for r in theirs)}")
    print(f"ratio leanfm / transformers: {result['ratio']:.2f}x  (target >= 1.5x at float32)")
    print(f"load: cold {cold:.1f} s (GGUF -> float base), cached {cached:.2f} s" if cold is not None
          else f"load: cached {cached:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.readme:
        write_readme(result, args.repeats)


def write_readme(r: dict, repeats: int) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from readme_table import write_table

    rows = [
        ["leanfm", f"{statistics.median(r['leanfm_tok_s']):.1f}", f"{r['leanfm_GB_s']:.1f}", f"{r['ratio']:.2f}x"],
        ["transformers `generate`", f"{statistics.median(r['transformers_tok_s']):.1f}",
         f"{r['transformers_GB_s']:.1f}", "1.00x"],
    ]
    cold = f"cold {r['load_cold_s']:.1f} s (GGUF dequantized and cached), " if r["load_cold_s"] else ""
    note = (f"{r['model']}: 4-bit GGUF weights dequantized to {r['dtype']}; batch 1, {r['new_tokens']} new "
            f"tokens, greedy, {r['threads']} threads, median of {repeats} runs; GB/s = weight bytes read per "
            f"token x tokens/s. Load time: {cold}cached {r['load_cached_s']:.1f} s. "
            + (f"1-min load average at the end of the run: {r['load_average_1m']:.1f} on 2 cores (shared machine: "
               "re-run on an idle one before quoting). " if r.get("load_average_1m") is not None else
               "Measured on a shared, busy machine: re-run on an idle one before quoting. ")
            + f"Made by `python benchmarks/bench_decode.py --threads {r['threads']} --readme`.")
    write_table("decode", ["engine", "decode tok/s", "weight GB/s", "vs transformers"], rows, note)


if __name__ == "__main__":
    main()
