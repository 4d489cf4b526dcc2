"""Per-item metrics and their aggregation, as lm-evaluation-harness computes them.

- acc: 1 if argmax_i loglik_i == gold (first index wins ties, like np.argmax).
- acc_norm: 1 if argmax_i loglik_i / len(choice_i) == gold, len in *characters* of lm-eval's
  doc_to_choice string (without the leading " " delimiter) — not bytes, not tokens.
- greedy acc (lambada): 1 if every continuation token is the argmax.
- stderr of a mean (`mean_stderr`): sample standard deviation (n - 1) / sqrt(n); None for n < 2.
- groups (MMLU): acc is the mean over all items (weight_by_size); stderr is lm-eval's
  `pooled_sample_stderr` over subgroups, applied subjects -> categories -> overall as lm-eval's group tree does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sample_stddev(values: Sequence[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1))


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample_stddev / sqrt(n)."""
    sd = sample_stddev(values)
    return None if sd is None else sd / math.sqrt(len(values))


def pooled_sample_stderr(stderrs: Sequence[float | None], sizes: Sequence[int]) -> float | None:
    """lm-eval's `pooled_sample_stderr`: sqrt(sum((n_i - 1) * se_i^2 * n_i) / (N - k) / N). A group of one
    item contributes nothing (its (n_i - 1) factor is 0)."""
    total, k = sum(sizes), len(sizes)
    if total - k <= 0:
        return None
    var = sum((n - 1) * (se or 0.0) ** 2 * n for se, n in zip(stderrs, sizes, strict=True)) / (total - k)
    return math.sqrt(var / total)


def argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_metrics(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, Any]:
    """acc and acc_norm of one multiple-choice item."""
    pred = argmax(logprobs)
    pred_norm = argmax([lp / len(c) if len(c) else -math.inf for lp, c in zip(logprobs, choices, strict=True)])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


@dataclass
class TaskResult:
    """One task's measurement: quality numbers, how long it took and exactly how it was measured."""

    name: str
    n: int
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    protocol: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)  # per-item predictions

    def to_dict(self, with_items: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", "n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                           "extra", "seconds", "protocol")}
        if with_items:
            d["items"] = self.items
        return d

    def summary(self) -> str:
        def pct(v: float | None, se: float | None) -> str:
            if v is None:
                return "-"
            return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")

        line = f"{self.name:<16} n={self.n:<6} acc={pct(self.acc, self.acc_stderr):<12}"
        line += f" acc_norm={pct(self.acc_norm, self.acc_norm_stderr):<12}"
        if "perplexity" in self.extra:
            line += f" ppl={self.extra['perplexity']:.2f}"
        return line + f" {self.seconds:.1f}s"


def aggregate(items: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float | None]:
    """Mean and stderr of each requested per-item metric; None for the metrics the task does not report."""
    out: dict[str, float | None] = {}
    for m in ("acc", "acc_norm"):
        vals = [it[m] for it in items] if m in metrics else []
        out[m], out[f"{m}_stderr"] = (mean(vals), mean_stderr(vals)) if vals else (None, None)
    return out


def group_report(items: list[dict[str, Any]], categories: dict[str, str]) -> tuple[float | None, dict[str, Any]]:
    """Per-subject and per-category acc (items carry `group`), and the overall pooled stderr."""
    by_subject: dict[str, list[float]] = {}
    for it in items:
        by_subject.setdefault(it["group"], []).append(it["acc"])
    subjects = {s: {"n": len(v), "acc": mean(v), "acc_stderr": mean_stderr(v)} for s, v in sorted(by_subject.items())}
    cats: dict[str, dict[str, Any]] = {}
    for cat in sorted(set(categories.get(s, "other") for s in subjects)):
        members = [subjects[s] for s in subjects if categories.get(s, "other") == cat]
        n = sum(m["n"] for m in members)
        cats[cat] = {"n": n, "acc": sum(m["acc"] * m["n"] for m in members) / n,
                     "acc_stderr": pooled_sample_stderr([m["acc_stderr"] for m in members], [m["n"] for m in members])}
    overall = pooled_sample_stderr([c["acc_stderr"] for c in cats.values()], [c["n"] for c in cats.values()])
    return overall, {"subjects": subjects, "categories": cats}
