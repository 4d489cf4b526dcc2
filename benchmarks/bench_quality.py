"""Quality of the embedded default model on the harness, next to its published model-card figures.

    python benchmarks/bench_quality.py [--model gemma-3-270m] [--limit 200] [--windows 32] [--readme]

Perplexity on the built-in `wiki` and `books` eval splits (first `--windows` disjoint windows of 512),
and the zero-shot / few-shot tasks of the Gemma 3 270M model card, each on a seeded random subset of
`--limit` items (stderr printed). leanfm runs the package's 4-bit GGUF weights dequantized to float32,
while the card reports the bf16 release model; the protocol differences are printed next to each row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# Gemma 3 270M pre-trained model card (google/gemma-3-270m): task -> (shots, reported accuracy %)
CARD = {
    "hellaswag": (10, 40.9),
    "boolq": (0, 61.4),
    "piqa": (0, 67.7),
    "arc_easy": (0, 57.7),
    "arc_challenge": (25, 29.0),
    "winogrande": (5, 52.0),
}
# which of acc / acc_norm the card's protocol corresponds to (lm-eval conventions)
METRIC = {"hellaswag": "acc_norm", "boolq": "acc", "piqa": "acc_norm", "arc_easy": "acc_norm",
          "arc_challenge": "acc_norm", "winogrande": "acc"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--limit", type=int, default=200, help="items per task (seeded random subset)")
    ap.add_argument("--windows", type=int, default=32, help="perplexity windows of 512 per corpus")
    ap.add_argument("--max-shots", type=int, default=5, help="cap on the card's shot count (CPU time)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(CARD))
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--from-json", help="skip measuring: write the README table from a saved --json file")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            write_readme(json.load(f))
        return
    torch.set_num_threads(args.threads)

    from leanfm.bench.corpora import load_corpus
    from leanfm.bench.perplexity import PerplexityConfig, perplexity
    from leanfm.bench.tasks import evaluate_tasks
    from leanfm.checkpoint.loader import load_model

    lm = load_model(args.model, progress=False)
    out = {"model": args.model, "limit": args.limit, "seed": args.seed, "ppl": {}, "tasks": {}}
    cfg = PerplexityConfig(ctx=512, batch_size=4, max_tokens=args.windows * 511)
    for corpus in ("wiki", "books"):
        r = perplexity(lm.model, lm.tokenizer, load_corpus(corpus, "eval"), cfg, progress=False)
        out["ppl"][corpus] = {"ppl": r.ppl, "tokens": r.n_scored_tokens, "seconds": r.seconds}
        print(f"perplexity {corpus}: {r.ppl:.3f} ({r.n_scored_tokens} tokens, {r.seconds:.0f} s)", flush=True)
    for name in [t for t in args.tasks.split(",") if t]:
        card_shots, card_acc = CARD[name]
        shots = min(card_shots, args.max_shots)
        t0 = time.perf_counter()
        res = evaluate_tasks(lm.model, lm.tokenizer, [name], limit=args.limit, seed=args.seed, few_shot=shots,
                             progress=False)[name]
        metric = METRIC[name]
        acc, err = getattr(res, metric), getattr(res, f"{metric}_stderr")
        out["tasks"][name] = {"metric": metric, "acc": acc, "stderr": err, "n": res.n, "shots": shots,
                              "card_shots": card_shots, "card": card_acc, "seconds": time.perf_counter() - t0}
        print(f"{name}: {metric}={100 * acc:.1f} ± {100 * err:.1f} (n={res.n}, {shots}-shot) | card "
              f"{card_acc} ({card_shots}-shot)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.readme:
        write_readme(out)


def write_readme(out: dict) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from readme_table import write_table

    rows = []
    for name, t in out["tasks"].items():
        shots = f"{t['shots']}" + (f" (card: {t['card_shots']})" if t["shots"] != t["card_shots"] else "")
        rows.append([name, t["metric"], shots, f"{100 * t['acc']:.1f} ± {100 * t['stderr']:.1f}", f"{t['n']}",
                     f"{t['card']:.1f}"])
    for corpus, p in out["ppl"].items():
        rows.append([f"perplexity, {corpus} eval split", "ppl (ctx 512)", "-", f"{p['ppl']:.2f}",
                     f"{p['tokens']} tokens", "-"])
    note = (f"{out['model']}: the package's 4-bit GGUF (Q4_K_M) dequantized to float32 by leanfm; the model "
            "card reports the bf16 release. Tasks: seeded random subsets of "
            f"{out['limit']} items (seed {out['seed']}), lm-evaluation-harness prompts and metrics, shot counts "
            "capped for CPU time where marked; the card's evaluation harness and splits may differ. "
            f"Made by `python benchmarks/bench_quality.py --limit {out['limit']} --readme`.")
    write_table("quality", ["task", "metric", "shots", "leanfm (%)", "items", "model card (%)"], rows, note)


if __name__ == "__main__":
    main()
