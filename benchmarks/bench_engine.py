"""The serving engine on the real model: overhead at batch 1, throughput with concurrent requests, prefix caching.

    python benchmarks/bench_engine.py [--model gemma-3-270m] [--threads 2] [--concurrency 16] [--rounds 3]

(a) batch-1 greedy decode tok/s through the engine (LLM) against the plain Generator, same model and prompt
    (rounds alternate between the two; medians). Target: engine within 10% of the Generator.
(b) --concurrency requests at once, prompts of 256-1024 tokens cut from the wiki eval corpus, 128 output
    tokens each (EOS ignored): total output tokens/s over the whole run (prefill included), and its ratio
    to the engine's own batch-1 decode rate from (a). Target >= 4x.
(c) prefix caching: time to first token of a request sharing a 1,024-token prefix with an earlier one,
    against the cold request that computed it. Target >= 5x.
Prints one JSON object with every figure and the ratios, plus the machine load (os.getloadavg). Rates are
also given per CPU-second of the process (time.process_time): on a machine shared with other jobs the wall
clock measures the load as much as the engine; run with --threads 1 for the steadiest CPU-time figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

PROMPT = "The history of the printing press begins in"


def batch1(loaded, n_tokens: int, rounds: int) -> dict:
    from leanfm.engine.generate import Generator
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    gen = Generator(loaded.model, loaded.tokenizer)
    llm = LLM(loaded, max_num_seqs=1)
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    gen.generate(PROMPT, warm)
    llm.generate(PROMPT, warm)
    g_rates, e_rates, g_cpu, e_cpu, same = [], [], [], [], True
    for _ in range(rounds):
        c = time.process_time()
        r = gen.generate(PROMPT, params)
        g_cpu.append(n_tokens / (time.process_time() - c))
        g_rates.append(r.decode_tokens_per_second)
        c = time.process_time()
        out = llm.generate(PROMPT, params)[0]
        e_cpu.append(n_tokens / (time.process_time() - c))
        e_rates.append(out.metrics.decode_tokens_per_second)
        same &= out.token_ids == r.token_ids
    g, e = statistics.median(g_rates), statistics.median(e_rates)
    gc, ec = statistics.median(g_cpu), statistics.median(e_cpu)
    return {"generator_tok_s": g, "engine_tok_s": e, "engine_over_generator": e / g,
            "generator_tok_per_cpu_s": gc, "engine_tok_per_cpu_s": ec, "engine_over_generator_cpu": ec / gc,
            "generator_rounds": g_rates, "engine_rounds": e_rates, "same_tokens": same}


def corpus_prompts(tokenizer, n: int, lo: int, hi: int) -> list[list[int]]:
    from leanfm.bench.corpora import load_corpus

    ids = tokenizer.encode(load_corpus("wiki", "eval"), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) else []
    lengths = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
    step = max(1, (len(ids) - hi) // n)
    return [bos + ids[i * step:i * step + length - len(bos)] for i, length in enumerate(lengths)]


def concurrent(loaded, n: int, n_tokens: int, batch1_rate: tuple[float, float]) -> dict:
    """All requests submitted at once; the engine stepped to the end (what LLM.generate does), timing each
    step so that the pure-decode steps (every prompt done) can be reported apart."""
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    prompts = corpus_prompts(loaded.tokenizer, n, 256, 1024)
    llm = LLM(loaded, max_num_seqs=n, enable_prefix_caching=False)
    llm.generate([prompts[0][:64]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    core = llm.engine
    t0, c0 = time.perf_counter(), time.process_time()
    reqs = [core.add_request(p, params) for p in prompts]
    decode_s, decode_tokens, steps = 0.0, 0, []
    while core.has_unfinished:
        prefilling = any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs if not r.finished)
        t = time.perf_counter()
        before = core.num_generated_tokens
        core.step()
        dt = time.perf_counter() - t
        steps.append((core.scheduler.last_step_tokens, dt))
        if not prefilling:
            decode_s += dt
            decode_tokens += core.num_generated_tokens - before
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_out = sum(len(r.output_token_ids) for r in reqs)
    ttfts = sorted(r.metrics.ttft for r in reqs)
    prefill_s = sum(dt for _, dt in steps) - decode_s
    return {"requests": n, "prompt_tokens": sum(map(len, prompts)), "output_tokens": n_out, "wall_s": wall,
            "output_tok_s": n_out / wall, "ratio_to_batch1": n_out / wall / batch1_rate[0],
            "cpu_s": cpu, "output_tok_per_cpu_s": n_out / cpu, "ratio_to_batch1_cpu": n_out / cpu / batch1_rate[1],
            "prefill_phase_s": prefill_s, "decode_phase_s": decode_s,
            "decode_phase_tok_s": decode_tokens / decode_s if decode_s else 0.0,
            "decode_phase_ratio_to_batch1": decode_tokens / decode_s / batch1_rate[0] if decode_s else 0.0,
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": ttfts[-1], "steps": len(steps),
            "preemptions": core.stats().num_preemptions, "kv_cache_mib": core.stats().kv_cache_bytes / 2**20}


def prefix_cache(loaded, rounds: int) -> dict:
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    shared = corpus_prompts(loaded.tokenizer, 1, 1024, 1024)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    cold, warm, cached, cpu = [], [], [], []
    for r in range(rounds):
        llm = LLM(loaded, max_num_seqs=2)
        llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0.0))  # warm-up, shares nothing
        suffix = loaded.tokenizer.encode(f" Question {r}: what happened next?", add_special_tokens=False)
        c = time.process_time()
        first = llm.generate([shared + suffix], params)[0]
        c1 = time.process_time()
        second = llm.generate([shared + suffix[:-1] + [suffix[-1] + 1]], params)[0]
        cpu.append((c1 - c) / (time.process_time() - c1))
        cold.append(first.metrics.ttft)
        warm.append(second.metrics.ttft)
        cached.append(second.metrics.num_cached_tokens)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"prefix_tokens": len(shared), "cold_ttft_s": c, "warm_ttft_s": w, "ttft_speedup": c / w,
            "ttft_speedup_cpu": statistics.median(cpu),
            "cached_tokens": cached, "cold_rounds": cold, "warm_rounds": warm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    loaded = load_model(args.model, dtype=torch.float32, progress=False)
    prepare_for_inference(loaded.model)
    skip = set(args.skip.split(","))
    result: dict = {"model": args.model, "threads": args.threads, "loadavg_start": os.getloadavg()}
    if "a" not in skip:
        result["a_batch1"] = batch1(loaded, args.tokens, args.rounds)
        print(json.dumps({"a_batch1": result["a_batch1"]}), flush=True)
    a = result.get("a_batch1", {})
    rate = (a.get("engine_tok_s") or 1.0, a.get("engine_tok_per_cpu_s") or 1.0)
    if "b" not in skip:
        result["b_concurrent"] = concurrent(loaded, args.concurrency, args.tokens, rate)
        print(json.dumps({"b_concurrent": result["b_concurrent"]}), flush=True)
    if "c" not in skip:
        result["c_prefix_cache"] = prefix_cache(loaded, args.rounds)
        print(json.dumps({"c_prefix_cache": result["c_prefix_cache"]}), flush=True)
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
