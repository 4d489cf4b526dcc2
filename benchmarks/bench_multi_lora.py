"""Serving several LoRA adapters over one base at once: throughput against the base alone, and against
transformers + PEFT's mixed-adapter batches, on the same prompts.

    python benchmarks/bench_multi_lora.py [--model gemma-3-270m] [--threads 2] [--requests 16] [--adapters 4]
        [--rank 16] [--prompt-tokens 64] [--tokens 64] [--rounds 2] [--no-peft] [--json OUT]

--adapters random LoRA adapters (rank --rank, on every linear of the decoder layers: q, k, v, o, gate, up,
down; A and B both random so each one changes the output) are saved in the PEFT layout. --requests
prompts (--prompt-tokens tokens of the wiki eval split each) then ask for --tokens greedy tokens (EOS
ignored), all submitted at once, in these scenarios:
  base      every request on the base model (no adapter installed: the fused base kernels)
  one       every request on adapter 0 (unmerged: base kernels + the per-row LoRA delta)
  mixed     request i on adapter i mod --adapters, all in the same batches (S-LoRA / Punica's idea)
  merged    adapter 0 merged into the weights, every request on it (what serving one adapter costs)
  peft      transformers + PEFT: the HF float32 model with the same adapters loaded, one left-padded batch
            of all requests, generate(adapter_names=[...]) with the mixed assignment
Output tokens / wall time of the whole run (prefill included); rounds interleave leanfm's scenarios
(medians). Prints ratios mixed / base, mixed / one and mixed / peft, and whether the mixed batch's tokens
equal each adapter's own run (leanfm `one`-style runs per adapter).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_adapters(model, root: Path, n: int, rank: int) -> list[Path]:
    from leanfm.tune import LoraConfig, adapter_parameters, add_adapter, save_adapter

    paths = []
    for i in range(n):
        m = copy.deepcopy(model)
        add_adapter(m, LoraConfig(r=rank, alpha=2 * rank, target_modules=("model.layers.*",)), f"a{i}", seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, p in adapter_parameters(m, f"a{i}"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5))
        paths.append(save_adapter(m, root / f"a{i}", f"a{i}"))
    return paths


def run_llm(llm, prompts, params, adapters) -> tuple[float, list[list[int]]]:
    t = time.perf_counter()
    outs = llm.generate(prompts, params, adapter=adapters)
    dt = time.perf_counter() - t
    return sum(len(o.token_ids) for o in outs) / dt, [o.token_ids for o in outs]


def run_peft(hf_dir: str, paths: list[Path], prompts, names, n_tokens: int, pad_id: int) -> tuple[float, list]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                             do_sample=False, adapter_names=names, pad_token_id=pad_id)
    dt = time.perf_counter() - t
    toks = [row[width:].tolist() for row in out]
    return sum(map(len, toks)) / dt, toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench_engine import corpus_prompts

    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams
    from leanfm.engine.runtime import prepare_for_inference
    from leanfm.tune import load_adapter, merge_and_unload_

    load0 = os.getloadavg()
    lm = load_model(args.model, dtype=torch.float32, progress=False)
    prompts = corpus_prompts(lm.tokenizer, args.requests, args.prompt_tokens, args.prompt_tokens)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    root = Path(tempfile.mkdtemp(prefix="leanfm-multilora-"))
    paths = make_adapters(lm.model, root, args.adapters, args.rank)
    names = [f"a{i % args.adapters}" for i in range(args.requests)]

    merged = copy.deepcopy(lm.model)
    load_adapter(merged, paths[0])
    merge_and_unload_(merged)
    prepare_for_inference(merged)
    prepare_for_inference(lm.model)
    multi = LLM(lm, max_num_seqs=args.requests, enable_prefix_caching=False,
                adapters={f"a{i}": str(p) for i, p in enumerate(paths)})
    plain = LLM(merged, tokenizer=lm.tokenizer, max_num_seqs=args.requests, enable_prefix_caching=False)
    scenarios = {"base": (multi, None), "one": (multi, "a0"), "mixed": (multi, names), "merged": (plain, None)}
    for llm, adapter in scenarios.values():  # warm-up
        llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0), adapter=adapter
                     if not isinstance(adapter, list) else adapter[0])
    rates: dict[str, list[float]] = {k: [] for k in scenarios}
    tokens: dict[str, list] = {}
    for _ in range(args.rounds):
        for k, (llm, adapter) in scenarios.items():
            r, tokens[k] = run_llm(llm, prompts, params, adapter)
            rates[k].append(r)
    own = {}  # each adapter's requests alone: the mixed batch must give the same tokens
    for i in range(args.adapters):
        idx = [j for j, n in enumerate(names) if n == f"a{i}"]
        _, toks = run_llm(multi, [prompts[j] for j in idx], params, f"a{i}")
        own.update(dict(zip(idx, toks, strict=True)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"model": args.model, "threads": args.threads, "requests": args.requests, "adapters": args.adapters,
              "rank": args.rank, "prompt_tokens": args.prompt_tokens, "output_tokens": args.tokens,
              "loadavg_start": load0, "tok_s": med, "rounds": rates,
              "mixed_over_base": med["mixed"] / med["base"], "mixed_over_one": med["mixed"] / med["one"],
              "merged_over_base": med["merged"] / med["base"],
              "mixed_equals_own_runs": all(tokens["mixed"][j] == own[j] for j in own),
              "merged_agrees_with_one": sum(a == b for a, b in zip(tokens["merged"], tokens["one"], strict=True))}
    if not args.no_peft:
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        r, toks = run_peft(str(lm.path), paths, prompts, names, args.tokens, pad)
        result["tok_s"]["peft"] = r
        result["mixed_over_peft"] = med["mixed"] / r
        result["peft_agrees_with_mixed"] = sum(
            a[:8] == b[:8] for a, b in zip(toks, tokens["mixed"], strict=True))  # first 8 greedy tokens
    result["loadavg_end"] = os.getloadavg()
    print(f"{args.requests} requests x {args.tokens} tokens, {args.adapters} LoRA adapters of rank {args.rank} "
          f"on every decoder linear, {args.model} (fp32, the 4-bit GGUF dequantized), {args.threads} threads")
    for k, v in result["tok_s"].items():
        print(f"  {k:8} {v:7.1f} tok/s")
    print(f"mixed / base {result['mixed_over_base']:.2f}x, mixed / one {result['mixed_over_one']:.2f}x"
          + (f", mixed / transformers+PEFT {result['mixed_over_peft']:.2f}x" if "mixed_over_peft" in result else "")
          + f"; mixed tokens equal each adapter's own run: {result['mixed_equals_own_runs']}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
