"""leanfm against its anchors, llama.cpp and transformers: same model, same text, same threads, one run.

    python benchmarks/bench_anchors.py [--model gemma-3-270m|smollm2-135m] [--threads 2] [--windows 8]
        [--ctx 512] [--prefill 128,512] [--decode-tokens 64] [--repeats 3] [--json OUT]

What runs where:
- leanfm: its own model code on the GGUF's quantized weights dequantized to float32 (the cached float base),
  after `prepare_for_inference` (its CPU GEMV kernels).
- transformers: `AutoModelForCausalLM` on that same float32 HF directory.
- llama.cpp (llama-cpp-python): the original quantized GGUF, natively (Q4_K_M for gemma-3-270m, Q4_1 for
  smollm2-135m). Its quantized dot products also round activations to 8 bit, so its perplexity agrees
  with the float engines closely but not exactly. Needs llama-cpp-python built on this machine:
      CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" pip install llama-cpp-python

What is measured:
- perplexity on the same `--windows` windows of `--ctx` tokens from the wiki eval split: leanfm through
  `leanfm.bench.perplexity.perplexity`, the others on the exact token ids and scored positions that
  `window_token_ids` gives (forward over each window, NLL of the scored tokens);
- prefill tokens/s for each `--prefill` prompt length (prompt = the first L corpus tokens; time to the
  first token, logits of the last position only);
- batch-1 greedy decode tokens/s: `--decode-tokens` new tokens (EOS ignored) after a prompt of the first
  `--prefill` length; rate = (n - 1) / decode time, the first token coming from the prefill. Also how many
  greedy tokens each anchor shares with leanfm (they may diverge after a near-tie; llama.cpp earlier).
Every engine gets `--threads` threads (torch.set_num_threads, llama.cpp n_threads and n_threads_batch).
Speed figures are medians of `--repeats` runs after a warm-up, engines interleaved within each repeat so
that load from other processes hits all of them alike; ratios come from the same run. Thread pools that
spin at barriers (llama.cpp's most of all) collapse when other processes hold the cores: if `--threads 2`
gives absurd figures (decode of a few tok/s or less), check `uptime` and compare with `--threads 1`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors.common import Window  # noqa: E402


class LeanfmRunner:
    name = "leanfm"

    def __init__(self, lm):
        from leanfm.engine.generate import Generator
        from leanfm.engine.runtime import prepare_for_inference

        prepare_for_inference(lm.model)
        self.lm, self.gen = lm, Generator(lm.model, lm.tokenizer)

    def _run(self, ids: list[int], n: int):
        from leanfm.engine.params import SamplingParams

        return self.gen.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    def prefill(self, ids: list[int]) -> float:
        return self._run(ids, 1).prefill_seconds

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        r = self._run(ids, n)
        assert len(r.token_ids) == n, (len(r.token_ids), n)
        return r.decode_tokens_per_second, list(r.token_ids)


def corpus_text(args) -> str:
    if args.text_file:
        return Path(args.text_file).read_text()
    from leanfm.bench.corpora import load_corpus

    return load_corpus(args.corpus, split="eval")


def leanfm_perplexity(lm, text: str, args) -> tuple[dict, list[Window]]:
    """leanfm's perplexity and the exact windows it scored (token ids + scored masks)."""
    from leanfm.bench.perplexity import PerplexityConfig, perplexity, window_token_ids

    cfg = PerplexityConfig(ctx=args.ctx, add_bos=True, max_tokens=args.windows * (args.ctx - 1))
    ws = window_token_ids(lm.tokenizer, text, cfg)
    windows = [Window(list(ids), list(mask)) for ids, mask in zip(ws.input_ids, ws.scored, strict=True)]
    res = perplexity(lm.model, lm.tokenizer, text, cfg, progress=False)
    if res.n_scored_tokens != ws.n_scored:
        raise RuntimeError(f"leanfm scored {res.n_scored_tokens} tokens, its windows {ws.n_scored}")
    return {"ppl": res.ppl, "nll": res.nll * res.n_scored_tokens, "tokens": res.n_scored_tokens,
            "eval_tok_s": res.tokens_per_second}, windows


def measure_speed(runners, prompts: dict[int, list[int]], decode_ids: list[int], n_new: int, repeats: int):
    """{engine: {"prefill": {L: [tok/s...]}, "decode": [tok/s...], "tokens": greedy ids}}, interleaved."""
    out = {r.name: {"prefill": {L: [] for L in prompts}, "decode": [], "tokens": []} for r in runners}
    for r in runners:  # warm-up: every shape once
        for ids in prompts.values():
            r.prefill(ids)
        r.decode(decode_ids, min(8, n_new))
    for _ in range(repeats):
        for r in runners:
            for L, ids in prompts.items():
                out[r.name]["prefill"][L].append(L / r.prefill(ids))
            rate, toks = r.decode(decode_ids, n_new)
            out[r.name]["decode"].append(rate)
            out[r.name]["tokens"] = toks
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common greedy prefix."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def print_table(res: dict, args, gguf_name: str, build: str) -> None:
    print(f"leanfm and transformers run {args.model}'s 4-bit GGUF weights dequantized to float32; llama.cpp "
          f"runs the quantized GGUF ({gguf_name}) natively, so perplexities agree closely but not exactly "
          "(llama.cpp also quantizes activations to 8 bit inside its quantized dot products).")
    print(f"{args.threads} threads; perplexity on {args.windows} windows x {args.ctx} tokens "
          f"({res['scored_tokens']} scored) of {args.text_file or args.corpus + ' eval'}; speed: median of "
          f"{args.repeats} after a warm-up, batch 1, greedy, {args.decode_tokens} new tokens after "
          f"{args.prefill[0]} prompt tokens; ppl-eval tok/s: one pass (leanfm batches windows by 4).\n"
          "GB/s = decode tok/s x weight bytes read per token (float32 base, or the GGUF's size).")
    print(f"llama.cpp build: {build}")
    lens = args.prefill
    cols = [f"prefill{L} tok/s" for L in lens]
    print(f"{'':24}{'perplexity':>11}{'vs leanfm':>11}{'ppl-eval tok/s':>16}"
          + "".join(f"{c:>19}" for c in cols) + f"{'decode tok/s':>14}{'GB/s':>6}{'greedy agree':>14}")
    med, base = res["median"], res["engines"]["leanfm"]["ppl"]
    for name, e in res["engines"].items():
        delta = f"{(e['ppl'] / base - 1) * 100:+.2f}%"
        pre = "".join(f"{med[name]['prefill'][L]:>19.1f}" for L in lens)
        agree = "-" if name == "leanfm" else f"{e['greedy_agree']}/{args.decode_tokens}"
        gbs = med[name]["decode"] * e["weight_bytes_per_token"] / 1e9
        print(f"{name:24}{e['ppl']:>11.3f}{delta:>11}{e['eval_tok_s']:>16.1f}{pre}"
              f"{med[name]['decode']:>14.1f}{gbs:>6.1f}{agree:>14}")
    for other in res["engines"]:
        if other == "leanfm":
            continue
        r = res["ratios"][f"leanfm/{other}"]
        pre = "".join(f"{r[f'prefill{L}']:>18.2f}x" for L in lens)
        print(f"{'leanfm / ' + other:24}{r['ppl']:>11.4f}{'':>11}{r['ppl_eval']:>15.2f}x{pre}"
              f"{r['decode']:>13.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m", choices=["gemma-3-270m", "smollm2-135m"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--text-file", help="score this text file instead of the corpus")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prefill", default="128,512", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="leanfm,transformers,llama.cpp")
    ap.add_argument("--llama-flash-attn", action="store_true", help="llama.cpp with flash attention")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = args.engines.split(",")

    from leanfm.checkpoint.loader import ALIASES, load_model
    from leanfm.models.cost import weight_bytes_read_per_token

    t0 = time.perf_counter()
    lm = load_model(args.model, progress=False)
    gguf = lm.gguf_path or ALIASES[args.model].gguf_path()
    text = corpus_text(args)
    runners, build = [LeanfmRunner(lm)], "not run"  # prepared for inference before anything is measured
    ppl, windows = leanfm_perplexity(lm, text, args)
    ids = lm.tokenizer.encode(text[: 40 * max(args.prefill)])  # plenty of characters for the prompts
    prompts = {L: ids[:L] for L in args.prefill}
    assert len(ids) >= max(args.prefill), "the text is too short for the longest --prefill prompt"
    decode_ids, n_new = prompts[args.prefill[0]], args.decode_tokens
    n_ctx = max(max(args.prefill), len(decode_ids) + n_new)

    stats = {"leanfm": ppl}
    if "transformers" in engines:
        from anchors.hf_runner import TransformersRunner

        runners.append(TransformersRunner(lm.path))
    if "llama.cpp" in engines:
        from anchors.llamacpp_runner import LlamaCppRunner, build_info

        runners.append(LlamaCppRunner(gguf, args.threads, n_ctx, flash_attn=args.llama_flash_attn))
        build = build_info()
    n_input = sum(len(w.ids) for w in windows)
    for r in runners[1:]:
        t = time.perf_counter()
        nll, n = r.window_nll(windows)
        assert n == ppl["tokens"], (r.name, n, ppl["tokens"])
        stats[r.name] = {"ppl": math.exp(nll / n), "nll": nll, "tokens": n,
                         "eval_tok_s": n_input / (time.perf_counter() - t)}

    speed = measure_speed(runners, prompts, decode_ids, n_new, args.repeats)
    med = {k: {"prefill": {L: statistics.median(v) for L, v in s["prefill"].items()},
               "decode": statistics.median(s["decode"])} for k, s in speed.items()}
    float_bytes = weight_bytes_read_per_token(lm.config, 4)
    for k in stats:  # decode reads every weight once per token: the float base, or the GGUF's tensors
        stats[k]["weight_bytes_per_token"] = Path(gguf).stat().st_size if k == "llama.cpp" else float_bytes
        stats[k]["greedy_agree"] = agreement(speed["leanfm"]["tokens"], speed[k]["tokens"])
        stats[k]["speed"] = speed[k]
    ratios = {f"leanfm/{k}": {"ppl": stats["leanfm"]["ppl"] / stats[k]["ppl"],
                              "ppl_eval": stats["leanfm"]["eval_tok_s"] / stats[k]["eval_tok_s"],
                              "decode": med["leanfm"]["decode"] / med[k]["decode"],
                              **{f"prefill{L}": med["leanfm"]["prefill"][L] / med[k]["prefill"][L]
                                 for L in args.prefill}}
              for k in stats if k != "leanfm"}
    res = {"model": args.model, "gguf": str(gguf), "threads": args.threads, "ctx": args.ctx,
           "windows": len(windows), "scored_tokens": ppl["tokens"], "repeats": args.repeats,
           "decode_tokens": n_new, "llama_cpp_build": build, "engines": stats, "median": med,
           "ratios": ratios, "seconds": time.perf_counter() - t0}
    print_table(res, args, Path(gguf).name, build)
    print(f"({res['seconds']:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
