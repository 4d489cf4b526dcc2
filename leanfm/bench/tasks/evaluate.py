"""Run tasks on a model: build each item's requests, score them, aggregate (see the package docstring)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from leanfm.bench.tasks import mmlu
from leanfm.bench.tasks.base import Task
from leanfm.bench.tasks.metrics import TaskResult, aggregate, choice_metrics, group_report
from leanfm.bench.tasks.registry import resolve_task
from leanfm.bench.tasks.scoring import (
    Score,
    common_prefix_len,
    encode_pairs,
    score_padded,
    score_shared,
    truncate,
)
from leanfm.utils.errors import LeanfmError

PROTOCOL = "leanfm-tasks-v1"


def _check_args(limit: int | None, few_shot: int, batch_size: int) -> None:
    if limit is not None and (not isinstance(limit, int) or limit <= 0):
        raise LeanfmError(f"limit must be a positive number of items (got {limit!r}); omit it to use all items")
    if not isinstance(few_shot, int) or few_shot < 0:
        raise LeanfmError(f"few_shot must be a number of examples >= 0 (got {few_shot!r})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LeanfmError(f"batch_size must be >= 1 (got {batch_size!r})")


def _item(task: Task, index: int, scores: Sequence[Score]) -> dict[str, Any]:
    doc = task.docs[index]
    base: dict[str, Any] = {"index": index, "id": doc.id, "gold": doc.gold}
    if doc.group:
        base["group"] = doc.group
    if task.spec.style == "greedy":
        s = scores[0]
        return {**base, "acc": float(s.greedy), "logprob": s.logprob, "n_tokens": s.n_tokens}
    base["logprobs"] = [s.logprob for s in scores]
    return {**base, **choice_metrics(base["logprobs"], doc.choices, doc.gold)}


def _score_items(model, tokenizer, task: Task, indices: list[int], few_shot: int, seed: int,
                 batch_size: int, progress: bool) -> tuple[list[dict[str, Any]], int]:
    """Score the selected items; returns per-item records and the number of tokens run through the model."""
    max_len = model.config.max_position_embeddings
    bar = tqdm(total=len(indices), desc=task.name, disable=not progress, leave=False)
    items, forwarded = [], 0
    pending: list[tuple[int, list[tuple[list[int], list[int]]]]] = []  # greedy items: padded across items
    for i in indices:
        req = task.request(i, few_shot, seed)
        pairs = [(truncate(c, [t], max_len), t) for c, t in encode_pairs(tokenizer, req.contexts, req.continuations)]
        if task.spec.style == "greedy":
            pending.append((i, pairs))
            continue
        items.append(_item(task, i, score_shared(model, pairs, batch_size)))
        p = common_prefix_len(pairs)
        forwarded += p + sum(len(c) + len(t) - 1 - p for c, t in pairs)
        bar.update(1)
    if pending:
        flat = [p for _, ps in pending for p in ps]
        bar.reset(total=len(flat))  # padded scoring progresses in rows
        scores = iter(score_padded(model, flat, batch_size, on_batch=bar.update))
        for i, ps in pending:
            items.append(_item(task, i, [next(scores) for _ in ps]))
        forwarded += sum(len(c) + len(t) - 1 for c, t in flat)
    bar.close()
    items.sort(key=lambda it: it["index"])
    return items, forwarded


def _protocol(task: Task, limit: int | None, seed: int, few_shot: int, model) -> dict[str, Any]:
    spec = task.spec
    if few_shot == 0:
        shots = None
    elif spec.sampler == "first_n" and task.fewshot_docs is not None:
        shots = "the first K items of the few-shot split (lm-eval first_n)"
    elif task.fewshot_docs is not None:
        shots = "seeded random draw from the shipped few-shot split"
    else:
        shots = "seeded random draw from the evaluated split, excluding the item"
    p = next(model.parameters())
    return {
        "protocol": PROTOCOL, "task": task.name, "style": spec.style, "prompt": spec.prompt,
        "source": spec.source, "notes": spec.notes, "n_total": len(task.docs), "limit": limit,
        "subset": "all" if limit is None or limit >= len(task.docs) else f"random.Random({seed}).sample",
        "seed": seed, "few_shot": few_shot, "fewshot_sampling": shots,
        "metrics": list(spec.metrics),
        "normalization": ("acc_norm = argmax(loglik / len(choice) in characters) (lm-eval)"
                          if "acc_norm" in spec.metrics else None),
        "tokenization": "lm-eval _encode_pair: continuation = tokens of context+continuation past the context",
        "scoring": ("shared token prefix run once per item; the rest batched on a copied KV cache"
                    if spec.style != "greedy" else "independent (context, continuation) rows, right-padded batches"),
        "stderr": "sample std (n-1) / sqrt(n), lm-eval mean_stderr",
        "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
    }


def evaluate_task(model, tokenizer, task: Task, limit: int | None = None, seed: int = 0, few_shot: int = 0,
                  batch_size: int = 16, progress: bool = True) -> TaskResult:
    """Evaluate one loaded task (see `evaluate_tasks`)."""
    _check_args(limit, few_shot, batch_size)
    t0 = time.perf_counter()
    indices = task.select(limit, seed)
    items, forwarded = _score_items(model, tokenizer, task, indices, few_shot, seed, batch_size, progress)
    seconds = time.perf_counter() - t0
    agg = aggregate(items, task.spec.metrics)
    extra: dict[str, Any] = {"tokens_forwarded": forwarded, "items_per_second": len(items) / max(seconds, 1e-9)}
    if task.spec.style == "greedy":
        lps = [it["logprob"] for it in items]
        extra["perplexity"] = math.exp(-sum(lps) / len(lps))
        extra["perplexity_per_token"] = math.exp(-sum(lps) / sum(it["n_tokens"] for it in items))
    if task.name == "mmlu":
        agg["acc_stderr"], groups = group_report(items, mmlu.SUBJECTS)
        extra.update(groups)
    return TaskResult(task.name, len(items), agg["acc"], agg["acc_stderr"], agg["acc_norm"], agg["acc_norm_stderr"],
                      extra, seconds, _protocol(task, limit, seed, few_shot, model), items)


def evaluate_tasks(model, tokenizer, names: Sequence[str | Task | os.PathLike[str]], limit: int | None = None,
                   seed: int = 0, few_shot: int | dict[str, int] = 0, batch_size: int = 16,
                   progress: bool = True) -> dict[str, TaskResult]:
    """Evaluate built-in tasks (by name), user tasks (.jsonl paths or `Task`s) on one model.

    `limit` takes a seeded random subset of each task; `few_shot` is K for every task, or a dict of
    per-task K (missing tasks: 0). Every name is resolved (and its data loaded) before any scoring.
    """
    _check_args(limit, 0, batch_size)
    tasks = [resolve_task(n) for n in names]
    shots = few_shot if isinstance(few_shot, dict) else {t.name: few_shot for t in tasks}
    for k, v in shots.items():
        _check_args(limit, v, batch_size)
        if k not in {t.name for t in tasks}:
            raise LeanfmError(f"few_shot names task {k!r}, which is not evaluated; use one of "
                              f"{[t.name for t in tasks]}")
    results: dict[str, TaskResult] = {}
    for task in tasks:
        results[task.name] = evaluate_task(model, tokenizer, task, limit, seed, shots.get(task.name, 0),
                                           batch_size, progress)
    return results
