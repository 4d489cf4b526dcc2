"""HellaSwag, PIQA and WinoGrande as lm-evaluation-harness defines them (validation splits, as lm-eval).

- hellaswag: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices =
  preprocess(ending) — lm-eval's `preprocess` strips, turns " [title]" into ". ", deletes other
  "[...]" WikiHow artifacts and collapses double spaces (an ending that began with "[title]" keeps its
  leading space, as in lm-eval).
- piqa: "Question: {goal}\\nAnswer:" with choices [sol1, sol2].
- winogrande (winogrande_xl): partial scoring — one context per option, sentence[:blank] + option; the
  scored continuation is the rest of the sentence after the blank (stripped), shared by both options.
"""

from __future__ import annotations

import re

from leanfm.bench.tasks.base import Doc, TaskSpec, check_docs
from leanfm.bench.tasks.datasets import hf_rows


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag text cleanup."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> Doc:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Doc(query=hellaswag_preprocess(row["activity_label"] + ": " + ctx),
               choices=tuple(hellaswag_preprocess(e) for e in row["endings"]),
               gold=int(row["label"]), id=str(row.get("ind", "")))


def piqa_doc(row: dict, index: int) -> Doc:
    return Doc(query=f"Question: {row['goal']}\nAnswer:", choices=(row["sol1"], row["sol2"]),
               gold=int(row["label"]), id=str(index))


def winogrande_doc(row: dict, index: int) -> Doc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    return Doc(query="", choices=(sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]),
               gold={"1": 0, "2": 1}[str(row["answer"])], target=sentence[blank + 1:].strip(), id=str(index))


def _hellaswag() -> list[Doc]:
    docs = [hellaswag_doc(r) for r in hf_rows("hellaswag", "none", "validation")]
    check_docs("hellaswag", docs)
    return docs


def _piqa() -> list[Doc]:
    docs = [piqa_doc(r, i) for i, r in enumerate(hf_rows("piqa", "plain_text", "validation"))]
    check_docs("piqa", docs)
    return docs


def _winogrande() -> list[Doc]:
    docs = [winogrande_doc(r, i) for i, r in enumerate(hf_rows("winogrande", "winogrande_xl", "validation"))]
    check_docs("winogrande", docs)
    return docs


_NO_TRAIN = "lm-eval draws few-shot examples from the train split, which is not shipped: drawn from this split"
SPECS = [
    TaskSpec("hellaswag", "mc", _hellaswag, source="hellaswag validation (10042)",
             prompt="{preprocessed activity_label: ctx} -> ' {ending}'", notes=_NO_TRAIN),
    TaskSpec("piqa", "mc", _piqa, source="piqa plain_text validation (1838)",
             prompt="Question: {goal}\\nAnswer: -> ' {sol}'", notes=_NO_TRAIN),
    TaskSpec("winogrande", "partial", _winogrande, metrics=("acc",),
             source="winogrande winogrande_xl validation (1267)",
             prompt="{sentence up to _ with option} -> ' {rest of sentence}' (partial scoring)", notes=_NO_TRAIN),
]
