"""BoolQ and LAMBADA as lm-evaluation-harness defines them.

- boolq: super_glue/boolq validation (its passages start with the article title, "Title -- ..."):
  "{passage}\\nQuestion: {question}?\\nAnswer:" with choices ["no", "yes"], metric acc. The OLMES
  dump's `query` is exactly that prompt (checked against the raw boolq rows in the tests).
- lambada (lm-eval's lambada_openai, test split, 5153 passages): context = the text without its last
  word, continuation = " " + last word. acc = every token of the word is the argmax (greedy);
  perplexity = exp(-mean over passages of the word's log-likelihood), lm-eval's `perplexity`
  aggregation (a per-word perplexity; the per-token one is reported too).
"""

from __future__ import annotations

from leanfm.bench.tasks.base import Doc, TaskSpec, check_docs
from leanfm.bench.tasks.datasets import oe_docs


def boolq_doc(doc: dict) -> Doc:
    """An OLMES boolq document (query, choices ['yes', 'no'], gold) in lm-eval's ['no', 'yes'] order."""
    answer_yes = doc["choices"][int(doc["gold"])] == "yes"
    return Doc(query=doc["query"], choices=("no", "yes"), gold=int(answer_yes), id=str(doc.get("idx", "")))


def lambada_doc(doc: dict) -> Doc:
    target = doc["answers_text"][0]
    return Doc(query=doc["query"], choices=(target,), gold=0, target=target, id=str(doc["id"]))


def _boolq() -> list[Doc]:
    docs = [boolq_doc(d) for d in oe_docs("boolq", "rc_0shot")]
    check_docs("boolq", docs)
    return docs


def _lambada() -> list[Doc]:
    docs = [lambada_doc(d) for d in oe_docs("lambada", "bpb_0shot")]
    check_docs("lambada", docs)
    return docs


SPECS = [
    TaskSpec("boolq", "mc", _boolq, metrics=("acc",), source="super_glue boolq validation (3270, OLMES dump)",
             prompt="{passage}\\nQuestion: {question}?\\nAnswer: -> ' no' | ' yes'",
             notes="lm-eval draws few-shot examples from train, not shipped: drawn from this split"),
    TaskSpec("lambada", "greedy", _lambada, metrics=("acc",),
             source="lambada_openai test (5153, OLMES dump)",
             prompt="{text without last word} -> ' {last word}'",
             notes="lm-eval's lambada_openai is 0-shot; few-shot examples would come from this split"),
]
