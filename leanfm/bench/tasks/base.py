"""Documents, task specifications and how a document becomes scored text, the way lm-evaluation-harness
builds it (0-shot or K-shot).

A task is a list of `Doc`s plus a `TaskSpec` saying how to turn one into (context, continuation) pairs:

- style "mc" (multiple choice; hellaswag, piqa, arc, boolq, openbookqa, sciq, mmlu, user tasks):
  one shared context `prefix + doc.query`, continuations `" " + choice` for every choice.
- style "partial" (winogrande's partial scoring): one context per option, `prefix + doc.choices[i]`
  (the sentence up to the blank with the option filled in), and the same continuation for all,
  `" " + doc.target` (the rest of the sentence).
- style "greedy" (lambada): context `prefix + doc.query`, continuation `" " + doc.target`; scored for its
  log-likelihood and whether every target token is the argmax.

`prefix` is lm-eval's: the task description (MMLU's "The following are multiple choice questions (with
answers) about <subject>.\\n\\n"), then K demonstrations joined and followed by "\\n\\n". A demonstration
is the document's text, " ", and its gold answer (for "partial": the gold option's context, " ", target).
Demonstrations come from the task's few-shot pool (a separate shipped split) — restricted to the same
`group` (MMLU subject) when documents have one — else from the evaluated split without the item itself.
They are drawn with `random.Random(f"{seed}:{task}:{item}")`, so each item's draw is reproducible and
independent of `limit` and evaluation order; MMLU uses lm-eval's `first_n` sampler (the first K dev items).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from leanfm.utils.errors import LeanfmError

STYLES = ("mc", "partial", "greedy")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Doc:
    """One evaluation item, already in lm-eval's processed form."""

    query: str  # doc_to_text ("" for "partial")
    choices: tuple[str, ...]  # doc_to_choice ("partial": the per-option contexts; "greedy": (target,))
    gold: int
    target: str = ""  # "partial"/"greedy": the shared scored text, without the leading delimiter
    id: str = ""
    group: str = ""  # e.g. the MMLU subject

    def demonstration(self, style: str) -> str:
        if style == "partial":
            return self.choices[self.gold] + TARGET_DELIMITER + self.target
        if style == "greedy":
            return self.query + TARGET_DELIMITER + self.target
        return self.query + TARGET_DELIMITER + self.choices[self.gold]


@dataclass(frozen=True)
class Request:
    """What gets scored for one document: one context per continuation (often all the same string)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]

    @property
    def shared_context(self) -> bool:
        return len(set(self.contexts)) == 1


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: how to load its documents and how lm-eval scores and formats them."""

    name: str
    style: str
    load: Callable[[], list[Doc]]  # the evaluated split
    load_fewshot: Callable[[], list[Doc]] | None = None  # None: draw from the evaluated split
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    sampler: str = "random"  # "random" | "first_n"
    description: Callable[[Doc], str] | None = None
    source: str = ""  # data source and split, for the protocol record
    prompt: str = ""  # the lm-eval prompt, for the protocol record
    notes: str = ""  # how this differs from lm-eval, if at all

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"task {self.name}: style {self.style!r} is not one of {STYLES}")
        if self.sampler not in ("random", "first_n"):
            raise ValueError(f"task {self.name}: sampler {self.sampler!r} is not 'random' or 'first_n'")


@dataclass
class Task:
    """A task with its documents loaded."""

    spec: TaskSpec
    docs: list[Doc]
    fewshot_docs: list[Doc] | None = None
    _pools: dict[str, list[Doc]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_spec(cls, spec: TaskSpec) -> Task:
        docs = spec.load()
        if not docs:
            raise LeanfmError(f"task {spec.name} has no documents; check its data ({spec.source})")
        return cls(spec, docs, spec.load_fewshot() if spec.load_fewshot else None)

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.docs)

    def select(self, limit: int | None, seed: int) -> list[int]:
        """Indices to evaluate: all, or a seeded random subset of `limit` (sorted; same seed, same subset)."""
        n = len(self.docs)
        if limit is None or limit >= n:
            return list(range(n))
        if limit <= 0:
            raise LeanfmError(f"limit must be a positive number of items (got {limit}); omit it to use all {n}")
        return sorted(random.Random(seed).sample(range(n), limit))

    def _pool(self, doc: Doc) -> list[Doc] | None:
        if self.fewshot_docs is None:
            return None
        if not doc.group:
            return self.fewshot_docs
        if doc.group not in self._pools:
            self._pools[doc.group] = [d for d in self.fewshot_docs if d.group == doc.group]
        return self._pools[doc.group]

    def fewshot_examples(self, index: int, k: int, seed: int) -> list[Doc]:
        """The K demonstrations for document `index` (never the document itself)."""
        if k <= 0:
            return []
        doc = self.docs[index]
        pool = self._pool(doc)
        if self.spec.sampler == "first_n" and pool is not None:
            if k > len(pool):
                raise LeanfmError(f"{self.name} ships {len(pool)} few-shot examples"
                                  f"{' for ' + doc.group if doc.group else ''}; use few_shot <= {len(pool)}")
            return pool[:k]
        rng = random.Random(f"{seed}:{self.name}:{index}")
        if pool is not None:
            if k > len(pool):
                raise LeanfmError(f"{self.name} has {len(pool)} few-shot examples; use few_shot <= {len(pool)}")
            return rng.sample(pool, k)
        if k > len(self.docs) - 1:
            raise LeanfmError(f"{self.name} has {len(self.docs)} items; use few_shot <= {len(self.docs) - 1}")
        picks = rng.sample(range(len(self.docs) - 1), k)  # indices into the split without `index`
        return [self.docs[i + (i >= index)] for i in picks]

    def prefix(self, index: int, k: int, seed: int) -> str:
        """Description plus K demonstrations, ready to prepend to the document's own text."""
        doc = self.docs[index]
        description = self.spec.description(doc) if self.spec.description else ""
        shots = [d.demonstration(self.spec.style) for d in self.fewshot_examples(index, k, seed)]
        return description + "".join(s + FEWSHOT_DELIMITER for s in shots)

    def request(self, index: int, k: int = 0, seed: int = 0) -> Request:
        """The (context, continuation) pairs lm-eval scores for document `index`."""
        doc, style = self.docs[index], self.spec.style
        prefix = self.prefix(index, k, seed)
        if style == "partial":
            cont = TARGET_DELIMITER + doc.target
            return Request(tuple(prefix + c for c in doc.choices), (cont,) * len(doc.choices))
        if style == "greedy":
            return Request((prefix + doc.query,), (TARGET_DELIMITER + doc.target,))
        ctx = prefix + doc.query
        return Request((ctx,) * len(doc.choices), tuple(TARGET_DELIMITER + c for c in doc.choices))


def check_docs(name: str, docs: Sequence[Doc]) -> None:
    """Sanity checks every loader's output passes (gold in range, at least one choice)."""
    for i, d in enumerate(docs):
        if not d.choices or not 0 <= d.gold < len(d.choices):
            raise LeanfmError(f"task {name}: item {i} ({d.id}) has gold {d.gold} for {len(d.choices)} choices; "
                              f"fix the data")
