"""MMLU as lm-evaluation-harness' `mmlu` group defines it (hails/mmlu_no_train, test split).

Prompt: "The following are multiple choice questions (with answers) about {subject with spaces}.\\n\\n"
+ "{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:", scored continuations
" A" / " B" / " C" / " D", metric acc. Few-shot: the first K items of the subject's dev split
(lm-eval's first_n sampler; 5 per subject). `mmlu` is all 57 subjects (14042 items); its acc is
the mean over items (lm-eval's weight_by_size), its stderr lm-eval's pooled_sample_stderr over subjects;
per-subject and per-category (stem, humanities, social_sciences, other) results go to `extra`.
`mmlu_<subject>` is one subject.
"""

from __future__ import annotations

import functools

from leanfm.bench.tasks.base import Doc, TaskSpec, check_docs
from leanfm.bench.tasks.datasets import hf_rows

DATASET = "hails/mmlu_no_train"
LETTERS = ("A", "B", "C", "D")
# lm-eval's mmlu/_generate_configs.py SUBJECTS: subject -> category
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem",
    "econometrics": "social_sciences", "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences", "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem", "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem", "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}


def mmlu_doc(row: dict, subject: str, index: int) -> Doc:
    c = row["choices"]
    query = (f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    return Doc(query=query, choices=LETTERS, gold=int(row["answer"]), id=f"{subject}/{index}", group=subject)


def description(doc: Doc) -> str:
    return f"The following are multiple choice questions (with answers) about {doc.group.replace('_', ' ')}.\n\n"


@functools.cache
def _subject(subject: str, split: str) -> tuple[Doc, ...]:
    docs = [mmlu_doc(r, subject, i) for i, r in enumerate(hf_rows(DATASET, subject, split))]
    check_docs(f"mmlu_{subject}", docs)
    return tuple(docs)


def _all(split: str) -> list[Doc]:
    return [d for s in SUBJECTS for d in _subject(s, split)]


def _spec(name: str, load, load_fewshot, source: str) -> TaskSpec:
    return TaskSpec(name, "mc", load, load_fewshot=load_fewshot, metrics=("acc",), sampler="first_n",
                    description=description, source=source,
                    prompt="<description>{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: -> ' A'..' D'")


SPECS = [_spec("mmlu", lambda: _all("test"), lambda: _all("dev"), f"{DATASET} test, 57 subjects (14042)")]
SPECS += [_spec(f"mmlu_{s}", functools.partial(lambda s: list(_subject(s, "test")), s),
                functools.partial(lambda s: list(_subject(s, "dev")), s), f"{DATASET}/{s} test")
          for s in SUBJECTS]
