"""The serving engine on the real model: overhead at batch 1, throughput with concurrent requests, prefix caching.

    python benchmarks/bench_engine.py [--model gemma-3-270m] [--threads 2] [--concurrency 16] [--rounds 3]

(a) batch-1 greedy decode tok/s through the engine (LLM) against the plain Generator, same model and prompt
    (rounds alternate between the two; medians). Target: engine within 10% of the Generator.
(b) --concurrency requests at once, prompts of 256-1024 tokens cut from the wiki eval corpus, 128 output
    tokens each (EOS ignored): total output tokens/s over the whole run (prefill included), and its ratio
    to the engine's own batch-1 decode rate from (a). Target >= 4x.
(c) prefix caching: time to first token of a request sharing a 1,024-token prefix with an earlier one,
    against the cold request that computed it. Target >= 5x.
Prints one JSON object with every figure and the ratios, plus the machine load (os.getloadavg).
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
    g_rates, e_rates, same = [], [], True
    for _ in range(rounds):
        r = gen.generate(PROMPT, params)
        g_rates.append(r.decode_tokens_per_second)
        out = llm.generate(PROMPT, params)[0]
        e_rates.append(out.metrics.decode_tokens_per_second)
        same &= out.token_ids == r.token_ids
    g, e = statistics.median(g_rates), statistics.median(e_rates)
    return {"generator_tok_s": g, "engine_tok_s": e, "engine_over_generator": e / g,
            "generator_rounds": g_rates, "engine_rounds": e_rates, "same_tokens": same}


def corpus_prompts(tokenizer, n: int, lo: int, hi: int) -> list[list[int]]:
    from leanfm.bench.corpora import load_corpus

    ids = tokenizer.encode(load_corpus("wiki", "eval"), add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) else []
    lengths = [lo + (hi - lo) * i // max(1, n - 1) for i in range(n)]
    step = max(1, (len(ids) - hi) // n)
    return [bos + ids[i * step:i * step + length - len(bos)] for i, length in enumerate(lengths)]


def concurrent(loaded, n: int, n_tokens: int, batch1_rate: float) -> dict:
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    prompts = corpus_prompts(loaded.tokenizer, n, 256, 1024)
    llm = LLM(loaded, max_num_seqs=n, enable_prefix_caching=False)
    llm.generate([prompts[0][:64]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    ttfts = sorted(o.metrics.ttft for o in outs)
    stats = llm.stats()
    return {"requests": n, "prompt_tokens": sum(map(len, prompts)), "output_tokens": n_out, "wall_s": wall,
            "output_tok_s": n_out / wall, "ratio_to_batch1": n_out / wall / batch1_rate,
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": ttfts[-1], "steps": stats.num_steps,
            "preemptions": stats.num_preemptions, "kv_cache_mib": stats.kv_cache_bytes / 2**20}


def prefix_cache(loaded, rounds: int) -> dict:
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    shared = corpus_prompts(loaded.tokenizer, 1, 1024, 1024)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    cold, warm, cached = [], [], []
    for r in range(rounds):
        llm = LLM(loaded, max_num_seqs=2)
        llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0.0))  # warm-up, shares nothing
        suffix = loaded.tokenizer.encode(f" Question {r}: what happened next?", add_special_tokens=False)
        first = llm.generate([shared + suffix], params)[0]
        second = llm.generate([shared + suffix[:-1] + [suffix[-1] + 1]], params)[0]
        cold.append(first.metrics.ttft)
        warm.append(second.metrics.ttft)
        cached.append(second.metrics.num_cached_tokens)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"prefix_tokens": len(shared), "cold_ttft_s": c, "warm_ttft_s": w, "ttft_speedup": c / w,
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
    rate = result.get("a_batch1", {}).get("engine_tok_s") or 1.0
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
