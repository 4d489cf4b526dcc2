"""Speculative decoding on the real model: n-gram prompt lookup, a draft model and layer skipping against plain
engine decode, at batch 1 on an input-grounded task (repeat / rewrite a passage), greedy.

    python benchmarks/bench_spec.py [--threads 1] [--rounds 3] [--tokens 128] [--prompts 2] [--k 4]
                                    [--methods plain,ngram,draft,draft_vocab,layer_skip,layer_skip_vocab]
                                    [--batch-sizes 1,2,4,8]

Prompts: passages of the wiki eval corpus (leanfm.bench.corpora) in the model's chat template after an
instruction ("Repeat the following text exactly:" / "Rewrite the following text in your own words:").
Methods (every engine built once, prefix caching off so that rounds are alike):
  plain             the engine without speculation (the reference output)
  ngram             prompt lookup, k drafts, n = 4..2
  draft             the target with --draft-remove layers removed by ShortGPT (block influence on the
                    calibration split) as a separate draft model (embeddings shared)
  layer_skip        the target drafting with those same low-influence layers skipped (weights shared)
  *_vocab           the same with the draft's LM head cut to the --draft-vocab most frequent tokens of the
                    calibration split plus the prompt's (FR-Spec)
Rounds interleave the methods (round r runs every method on every prompt); the figures are medians over
rounds and prompts of decode tokens/s (after the first token; wall clock) and decode tokens per CPU-second
of the process (time.process_time, steadier on a shared machine), each method's ratio to plain, acceptance
rate, tokens per verify step, and whether the output equals plain's token for token.
--batch-sizes: B identical-shape requests at once (ngram, the off-switch disabled) against plain, output
tokens/s per CPU-second: where speculation stops paying (SpeculativeConfig.disable_above_batch).
Prints one JSON object, with os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

INSTRUCTIONS = ("Repeat the following text exactly:", "Rewrite the following text in your own words:")
ALL_METHODS = ("plain", "ngram", "draft", "draft_vocab", "layer_skip", "layer_skip_vocab")


def make_prompts(tokenizer, n: int, lo: int = 120, hi: int = 300) -> list[list[int]]:
    from leanfm.bench.corpora import corpus_passages

    out = []
    for passage in corpus_passages("wiki", "eval"):
        if lo <= len(tokenizer.encode(passage, add_special_tokens=False)) <= hi:
            instruction = INSTRUCTIONS[len(out) % len(INSTRUCTIONS)]
            text = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{passage}"}],
                                                 add_generation_prompt=True)
            out.append(tokenizer.encode(text, add_special_tokens=False))
            if len(out) == n:
                return out
    return out


def low_influence_layers(model, tokenizer, count: int) -> list[int]:
    from leanfm.bench.corpora import calibration_samples
    from leanfm.compress.prune.shortgpt import layer_influences, lowest_influence

    calib = calibration_samples(tokenizer, 16, 256, seed=0)
    with torch.inference_mode():
        influence = layer_influences(model, calib, batch_size=4)
    return lowest_influence(influence, list(range(1, len(influence) - 1)), count)  # first and last stay


def frequent_tokens(tokenizer, size: int, prompts: list[list[int]]) -> list[int]:
    from leanfm.bench.corpora import load_corpus

    ids = torch.tensor(tokenizer.encode(load_corpus("wiki", "calib"), add_special_tokens=False))
    top = torch.bincount(ids).argsort(descending=True)[:size].tolist()
    return sorted(set(top) | {t for p in prompts for t in p} | set(tokenizer.stop_token_ids))


def build_engines(loaded, methods, k: int, removed: list[int], vocab: list[int]) -> dict:
    from leanfm.engine.llm import LLM

    model = loaded.model
    draft = None
    if any(m.startswith("draft") for m in methods):
        shared = {id(p): p for p in (model.model.embed_tokens.weight, model.lm_head.weight)}
        draft = copy.deepcopy(model, memo=shared)  # embeddings / head shared, layers copied
        draft.remove_layers(removed)
    specs = {"plain": None, "ngram": {"method": "ngram", "num_speculative_tokens": k},
             "draft": {"method": "draft", "draft_model": draft, "num_speculative_tokens": k},
             "layer_skip": {"method": "layer_skip", "skip_layers": removed, "num_speculative_tokens": k}}
    engines = {}
    for m in methods:
        spec = specs[m.removesuffix("_vocab")]
        if m.endswith("_vocab"):
            spec = {**spec, "draft_vocab": vocab}
        engines[m] = LLM(loaded, max_num_seqs=1, kv_memory_bytes=96 << 20, enable_prefix_caching=False,
                         speculative=spec)
    return engines


def run_once(llm, prompt: list[int], params) -> dict:
    before = llm.stats()
    c0 = time.process_time()
    c_first = out = None
    for item in llm.stream(prompt, params):
        out = item
        if c_first is None:
            c_first = time.process_time()
    cpu = time.process_time() - c_first
    after = llm.stats()
    n = len(out.token_ids)
    drafts = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    verify = after.spec_verify_steps - before.spec_verify_steps
    return {"tokens": out.token_ids, "tok_s": out.metrics.decode_tokens_per_second,
            "tok_cpu_s": (n - 1) / cpu if cpu > 0 else 0.0, "ttft_s": out.metrics.ttft,
            "prefill_cpu_s": c_first - c0, "drafts": drafts, "accepted": accepted, "verify_steps": verify}


def batch1(engines: dict, prompts: list[list[int]], n_tokens: int, rounds: int) -> dict:
    from leanfm.engine.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
    for llm in engines.values():  # warm-up (kernels, allocator)
        llm.generate(prompts[0][:32], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    runs = {m: [] for m in engines}
    for _ in range(rounds):
        for i, prompt in enumerate(prompts):
            for m, llm in engines.items():
                runs[m].append((i, run_once(llm, prompt, params)))
    ref = {i: r["tokens"] for i, r in runs.get("plain", [])}
    base = {k: statistics.median(r[k] for _, r in runs["plain"]) for k in ("tok_s", "tok_cpu_s")} if ref else None
    out = {}
    for m, rs in runs.items():
        med = {k: statistics.median(r[k] for _, r in rs) for k in ("tok_s", "tok_cpu_s", "ttft_s", "prefill_cpu_s")}
        drafts, acc, steps = (sum(r[k] for _, r in rs) for k in ("drafts", "accepted", "verify_steps"))
        out[m] = {**med, "acceptance_rate": acc / drafts if drafts else 0.0,
                  "tokens_per_verify_step": 1 + acc / steps if steps else 0.0,
                  "same_tokens_as_plain": all(r["tokens"] == ref[i] for i, r in rs) if ref else None,
                  "tok_s_rounds": [round(r["tok_s"], 2) for _, r in rs]}
        if base:
            out[m]["speedup"] = med["tok_s"] / base["tok_s"]
            out[m]["speedup_cpu"] = med["tok_cpu_s"] / base["tok_cpu_s"]
    return out


def batch_sweep(loaded, prompts: list[list[int]], sizes: list[int], n_tokens: int, k: int) -> dict:
    """Output tokens per CPU-second with B requests at once, plain vs ngram (off-switch disabled)."""
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
    out = {}
    for b in sizes:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        rates = {}
        for name, spec in (("plain", None), ("ngram", {"num_speculative_tokens": k, "disable_above_batch": None})):
            llm = LLM(loaded, max_num_seqs=b, kv_memory_bytes=(32 * b) << 20, enable_prefix_caching=False,
                      speculative=spec)
            c = time.process_time()
            outs = llm.generate(batch, params)
            rates[name] = sum(len(o.token_ids) for o in outs) / (time.process_time() - c)
        out[b] = {**rates, "ngram_over_plain_cpu": rates["ngram"] / rates["plain"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--methods", default="plain,ngram,draft_vocab,layer_skip_vocab")
    ap.add_argument("--draft-remove", type=int, default=4, help="layers ShortGPT removes for the draft / skips")
    ap.add_argument("--draft-vocab", type=int, default=16384, help="most frequent tokens the cut draft head keeps")
    ap.add_argument("--batch-sizes", default="", help="e.g. 1,2,4,8 (ngram vs plain, --tokens // 2 tokens)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(ALL_METHODS):
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
    torch.set_num_threads(args.threads)
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    load_before = os.getloadavg()
    loaded = load_model(args.model, progress=False)
    prepare_for_inference(loaded.model)
    prompts = make_prompts(loaded.tokenizer, args.prompts)
    removed = low_influence_layers(loaded.model, loaded.tokenizer, args.draft_remove)
    vocab = frequent_tokens(loaded.tokenizer, args.draft_vocab, prompts)
    engines = build_engines(loaded, methods, args.k, removed, vocab)
    report = {"model": args.model, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds, "k": args.k,
              "prompt_tokens": [len(p) for p in prompts], "draft_removed_layers": removed,
              "draft_vocab_size": len(vocab), "batch1": batch1(engines, prompts, args.tokens, args.rounds)}
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        report["batch_sweep_cpu"] = batch_sweep(loaded, prompts, sizes, args.tokens // 2, args.k)
    report["loadavg_before"], report["loadavg_after"] = load_before, os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
