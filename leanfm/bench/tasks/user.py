"""User multiple-choice tasks from a JSONL file, scored exactly like the built-in ones.

One JSON object per line (blank lines are skipped):

    {"context": "Question: What is 2 + 2?\\nAnswer:", "choices": ["4", "5", "22"], "answer": 0, "id": "q1"}

- "context" (string): the prompt; may be empty.
- "choices" (list of >= 2 non-empty strings): each is scored as the continuation " " + choice
  (`target_delimiter`, lm-eval's default " ").
- "answer" (integer): the 0-based index of the correct choice.
- "id" (string or integer, optional): shown in per-item results; defaults to the line number.
Metrics are acc and acc_norm (log-likelihood divided by the choice's length in characters). With
few_shot=K, demonstrations ("{context} {gold choice}") are drawn from the same file, never the item itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from leanfm.bench.tasks.base import Doc, Task, TaskSpec
from leanfm.utils.errors import LeanfmError

SCHEMA = '{"context": str, "choices": [str, ...], "answer": int, "id": str (optional)}'


def _fail(path: Path, line: int, field: str, problem: str) -> LeanfmError:
    return LeanfmError(f"{path}:{line}: field {field!r} {problem}; each line must be {SCHEMA}")


def _parse_line(path: Path, line: int, text: str) -> Doc:
    try:
        rec: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LeanfmError(f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno}); "
                          f"each line must be {SCHEMA}") from exc
    if not isinstance(rec, dict):
        raise LeanfmError(f"{path}:{line}: expected a JSON object, got {type(rec).__name__}; "
                          f"each line must be {SCHEMA}")
    for name in ("context", "choices", "answer"):
        if name not in rec:
            raise _fail(path, line, name, "is missing")
    context, choices, answer = rec["context"], rec["choices"], rec["answer"]
    if not isinstance(context, str):
        raise _fail(path, line, "context", f"must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise _fail(path, line, "choices", "must be a list of at least 2 strings")
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise _fail(path, line, "choices", f"item {j} must be a non-empty string, got {c!r}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise _fail(path, line, "answer", f"must be an integer index in [0, {len(choices) - 1}], got {answer!r}")
    item_id = rec.get("id", str(line))
    if not isinstance(item_id, str | int) or isinstance(item_id, bool):
        raise _fail(path, line, "id", f"must be a string or integer, got {type(item_id).__name__}")
    return Doc(query=context, choices=tuple(choices), gold=answer, id=str(item_id))


def read_user_docs(path: str | os.PathLike[str]) -> list[Doc]:
    """Parse and validate a user JSONL task file."""
    path = Path(path)
    if not path.is_file():
        raise LeanfmError(f"user task file {path} not found; give the path of a JSONL file with lines {SCHEMA}")
    docs = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                docs.append(_parse_line(path, line, text))
    if not docs:
        raise LeanfmError(f"{path}: no items; add lines of the form {SCHEMA}")
    return docs


def load_user_task(path: str | os.PathLike[str], name: str | None = None) -> Task:
    """A multiple-choice Task from a JSONL file (schema in this module's docstring); `name` defaults to
    the file's stem."""
    docs = read_user_docs(path)
    spec = TaskSpec(name or Path(path).stem, "mc", lambda: docs, source=f"user file {Path(path).resolve()}",
                    prompt="{context} -> ' {choice}'", notes="user task")
    return Task(spec, docs)
