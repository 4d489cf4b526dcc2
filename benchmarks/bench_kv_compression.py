"""KV-cache compression on the real model: long-context perplexity and KV bytes, full cache vs compressed.

    python benchmarks/bench_kv_compression.py [--model gemma-3-270m] [--tokens 4096] [--budget 256]
        [--chunk 512] [--corpus books] [--threads 2] [--only full,int8,...] [--json OUT]

One text of --tokens tokens (BOS + the start of the corpus's eval split) goes through the engine's own
cache in chunks of --chunk (leanfm.bench.long_context.cache_perplexity), every token scored once, for:
  full             the full fp32 cache
  int8             the full cache, int8 K/V with per-token scales
  streaming        StreamingLLM: 4 sinks + a recent window, --budget tokens in all
  window           the same recent window without sinks (--budget tokens)
  h2o              H2O: --budget tokens, half recent, half heavy hitters
  streaming+int8   StreamingLLM on an int8 cache
Compression applies to the full-attention layers (gemma-3-270m: 3 of 18); the sliding-window layers
keep their 512-token window in every variant. Prints ppl, its ratio to the full cache, the peak KV bytes
in use and per token, and the KV bytes per token `leanfm info` predicts (leanfm.models.cost) next to
the engine's measured bytes (sliding layers hold their window plus the chunk being computed).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

VARIANTS = {
    "full": {},
    "int8": {"kv_cache_dtype": "int8"},
    "streaming": {"kv_compression": "streaming", "kv_sink_tokens": 4},
    "window": {"kv_compression": "streaming", "kv_sink_tokens": 0},
    "h2o": {"kv_compression": "h2o"},
    "streaming+int8": {"kv_compression": "streaming", "kv_sink_tokens": 4, "kv_cache_dtype": "int8"},
}


def formula(config, n_tokens: int, chunk: int, block_size: int) -> dict:
    """What leanfm.models.cost predicts for the full cache, and the engine's own block-rounded count."""
    from leanfm.models.cost import kv_bytes, kv_bytes_per_token

    per_layer_token = 2 * config.num_key_value_heads * config.head_dim * 4
    blocks = -(-n_tokens // block_size) * block_size
    window = config.sliding_window or 0
    sliding_held = min(blocks, -(-(window + chunk) // block_size) * block_size + block_size)
    engine = sum(per_layer_token * (sliding_held if config.layer_is_sliding(i) else blocks)
                 for i in range(config.num_hidden_layers))
    return {"info_kv_bytes_per_token_short_context": kv_bytes_per_token(config, 4),
            "info_kv_bytes_at_context": kv_bytes(config, n_tokens, 4),
            "info_kv_bytes_per_token_at_context": kv_bytes(config, n_tokens, 4) / n_tokens,
            "info_engine_kv_bytes_at_context": kv_bytes(config, n_tokens, 4, chunk),
            "engine_expected_peak_bytes": engine}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--corpus", default="books")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from leanfm.bench.corpora import load_corpus
    from leanfm.bench.long_context import cache_perplexity
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    loaded = load_model(args.model, dtype=torch.float32, progress=False)
    model = prepare_for_inference(loaded.model)
    tok = loaded.tokenizer
    ids = [tok.bos_token_id] + tok.encode(load_corpus(args.corpus, "eval"), add_special_tokens=False)[:args.tokens - 1]
    out = {"model": args.model, "tokens": len(ids), "budget": args.budget, "chunk": args.chunk, "corpus": args.corpus,
           "threads": args.threads, "loadavg_start": os.getloadavg(), "variants": {}}
    full_ppl = None
    print(f"{'variant':<16} {'ppl':>9} {'vs full':>8} {'KV peak MiB':>12} {'KV B/token':>11} {'seconds':>8}", flush=True)
    for name in args.only.split(","):
        opts = dict(VARIANTS[name])
        if "kv_compression" in opts:
            opts["kv_budget"] = args.budget
        res = cache_perplexity(model, ids, chunk=args.chunk, label=name, **opts)
        full_ppl = res.ppl if name == "full" else full_ppl
        ratio = res.ppl / full_ppl if full_ppl else float("nan")
        out["variants"][name] = {**res.to_dict(), "ppl_over_full": ratio}
        print(f"{name:<16} {res.ppl:9.3f} {ratio:8.4f} {res.kv_bytes_peak / 2**20:12.2f} "
              f"{res.kv_bytes_per_token:11.0f} {res.seconds:8.1f}", flush=True)
    f = formula(model.config, len(ids), args.chunk, 16)
    out["formula"] = f
    if "full" in out["variants"]:
        measured = out["variants"]["full"]["kv_bytes_peak"]
        print(f"KV bytes per token, full fp32 cache at {len(ids)} tokens: leanfm info formula "
              f"{f['info_kv_bytes_per_token_at_context']:.0f} B (short context: {f['info_kv_bytes_per_token_short_context']} B),"
              f" engine measured {measured / len(ids):.0f} B (expected from blocks: {f['engine_expected_peak_bytes'] / len(ids):.0f} B;"
              f" ratio measured/formula {measured / f['info_kv_bytes_at_context']:.3f}; against leanfm info's engine"
              f" line (sliding layers hold window + chunk) {measured / f['info_engine_kv_bytes_at_context']:.3f})")
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1) if args.json is None else f"wrote {args.json}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
