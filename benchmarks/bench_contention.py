"""Batch-1 decode when another process holds a core: leanfm's adaptive thread retreat on and off.

    python benchmarks/bench_contention.py [--model gemma-3-270m | ARTIFACT] [--tokens 32] [--rounds 3]
        [--hogs 1] [--conditions idle,hog]

Each condition ("idle": nothing started here; "hog": --hogs busy-looping Python processes started by this
script and stopped at the end of the condition) times greedy decode (EOS ignored) in three modes,
interleaved round by round (medians reported):
  * 2 threads, adaptive   the default: kernels retreat to the calling thread when a parallel region ran
                          slower than one thread would have (leanfm/ops/kernels/csrc/parallel.h);
  * 2 threads, fixed      LEANFM_ADAPTIVE_THREADS=0 behaviour (torch.ops.leanfm_kernels.set_adaptive_threads);
  * 1 thread              torch.set_num_threads(1).
The controller's counters (parallel regions, strikes, calls run serially) are printed per mode. Other
processes on the machine count as load too: the 1-minute load average is printed with each condition.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

MODES = ("2 threads, adaptive", "2 threads, fixed", "1 thread")


def set_mode(mode: str, ops) -> None:
    torch.set_num_threads(1 if mode == "1 thread" else 2)
    ops.set_adaptive_threads(mode != "2 threads, fixed")


def run_condition(name: str, gen, args, ops) -> dict[str, tuple[float, list[int]]]:
    from leanfm.engine.params import SamplingParams

    hogs = []
    if name == "hog":
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
        time.sleep(1.0)
    prompt = "The history of the printing press begins in"
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    rates = {m: [] for m in MODES}
    stats = {}
    try:
        for _ in range(args.rounds):
            for m in MODES:
                set_mode(m, ops)
                before = ops.thread_stats()
                rates[m].append(gen.generate(prompt, params).decode_tokens_per_second)
                stats[m] = [a - b for a, b in zip(ops.thread_stats()[:3], before[:3], strict=True)]
    finally:
        for p in hogs:
            p.terminate()
        for p in hogs:
            p.wait()
    return {m: (statistics.median(r), stats[m], r) for m, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=1)
    ap.add_argument("--conditions", default="idle,hog")
    args = ap.parse_args()

    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.generate import Generator
    from leanfm.engine.params import SamplingParams
    from leanfm.engine.runtime import prepare_for_inference
    from leanfm.ops import kernels

    if not kernels.warmup():
        sys.exit(f"leanfm kernels unavailable: {kernels.status().get('error')}")
    ops = torch.ops.leanfm_kernels
    lm = load_model(args.model, progress=False)
    prepare_for_inference(lm.model)
    gen = Generator(lm.model, lm.tokenizer)
    gen.generate("warm up", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    adaptive = ops.thread_stats()[4] == 1
    print(f"{args.model}: batch-1 greedy decode, {args.tokens} tokens, median of {args.rounds} interleaved rounds")
    try:
        for cond in args.conditions.split(","):
            load = os.getloadavg()[0]
            res = run_condition(cond, gen, args, ops)
            print(f"\n{cond} ({args.hogs if cond == 'hog' else 0} busy-loop process(es) started; 1-min load "
                  f"average {load:.2f} before, {os.getloadavg()[0]:.2f} after)")
            print(f"  {'mode':22}{'tok/s':>8}   [regions, strikes, serial calls] of the last run   runs")
            for m, (med, st, r) in res.items():
                print(f"  {m:22}{med:>8.2f}   {str(st):38}{' '.join(f'{x:.2f}' for x in r)}")
    finally:
        ops.set_adaptive_threads(adaptive)


if __name__ == "__main__":
    main()
