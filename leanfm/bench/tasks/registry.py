"""The built-in tasks by name, and resolving a name (or a user .jsonl path) to a loaded `Task`."""

from __future__ import annotations

import os
from pathlib import Path

from leanfm.bench.tasks import commonsense, mmlu, reading, science
from leanfm.bench.tasks.base import Task, TaskSpec
from leanfm.utils.errors import LeanfmError

TASKS: dict[str, TaskSpec] = {s.name: s for s in [*commonsense.SPECS, *science.SPECS, *reading.SPECS, *mmlu.SPECS]}


def list_tasks() -> list[str]:
    """Every built-in task name (the 57 `mmlu_<subject>` tasks included), sorted."""
    return sorted(TASKS)


def _known() -> str:
    main = [n for n in sorted(TASKS) if not n.startswith("mmlu_")]
    return (", ".join(main) + f", mmlu_<subject> ({len(mmlu.SUBJECTS)} subjects, e.g. mmlu_anatomy)"
            ", or a path to a user .jsonl task")


def get_task(name: str) -> Task:
    """Load a built-in task's documents by name."""
    spec = TASKS.get(name)
    if spec is None:
        raise LeanfmError(f"unknown task {name!r}; known tasks: {_known()}")
    return Task.from_spec(spec)


def resolve_task(ref: str | Task | os.PathLike[str]) -> Task:
    """A Task as given, a built-in task by name, or a user task from a .jsonl path."""
    if isinstance(ref, Task):
        return ref
    ref_s = os.fspath(ref)
    if ref_s not in TASKS and (ref_s.endswith(".jsonl") or Path(ref_s).is_file()):
        from leanfm.bench.tasks.user import load_user_task

        return load_user_task(ref_s)
    return get_task(ref_s)
