"""Fine-tuning data: JSONL lines -> token ids with labels (loss on completions only) -> padded batches.

Each line is one JSON object, one of:
    {"prompt": "...", "completion": "..."}       loss on the completion (and the EOS after it)
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
                                                 rendered with the model's chat template; loss on the
                                                 assistant turns (their text and end-of-turn marker)
    {"text": "..."}                              plain causal LM: loss on every token

Labels are -100 where no loss is taken. Everything is checked up front: a bad line raises DataError
naming the file and line before any training starts. The tokenizer is leanfm's Tokenizer (or anything
with encode / apply_chat_template / backend / eos_token_ids / pad_token_id).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from leanfm.utils.errors import LeanfmError

__all__ = ["DataError", "Example", "collate", "encode_row", "load_examples", "read_jsonl", "split_examples",
           "step_batches"]

IGNORE = -100
SHAPES = '{"prompt", "completion"}, {"messages": [...]} or {"text"}'


class DataError(LeanfmError, ValueError):
    """Training data that cannot be used (raised before training starts)."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_labels(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)  # position 0 is never predicted


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """[(where, row)] for every non-blank line; where = 'file:line'."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such data file; give a JSONL file with one example per line")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object ({SHAPES}), got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_spans(messages: list, tokenizer: Any, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{j}] must be {{\"role\": str, \"content\": str}}")
    render = tokenizer.apply_chat_template
    try:
        text = render(messages, add_generation_prompt=False)
        spans = []
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:j], add_generation_prompt=True) if j else ""
            upto = render(messages[: j + 1], add_generation_prompt=False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise DataError(f"{where}: the chat template does not render turn {j} as a prefix of the "
                                "conversation; use prompt/completion lines instead")
            spans.append((len(before), len(upto)))
    except LeanfmError as e:
        raise DataError(f"{where}: {e}") from None
    if not spans:
        raise DataError(f"{where}: no assistant message to learn from; add one with role 'assistant'")
    return text, spans


def encode_row(row: dict[str, Any], tokenizer: Any, where: str = "row") -> Example:
    """Token ids and labels of one data row (see the module docstring for the accepted shapes)."""
    if "messages" in row:
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        text, spans = _chat_spans(row["messages"], tokenizer, where)
        enc = tokenizer.backend.encode(text, add_special_tokens=False)
        labels = [t if any(a <= start < b for a, b in spans) else IGNORE
                  for t, (start, _) in zip(enc.ids, enc.offsets, strict=True)]
        return Example(tuple(enc.ids), tuple(labels))
    if "text" in row and "prompt" not in row:
        ids = tokenizer.encode(_text(row, "text", where)) + list(tokenizer.eos_token_ids[:1])
        return Example(tuple(ids), tuple(ids))
    missing = [k for k in ("prompt", "completion") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}; each line needs {SHAPES} (found keys: "
                        f"{', '.join(sorted(row)) or 'none'})")
    prompt = tokenizer.encode(_text(row, "prompt", where))
    completion = tokenizer.encode(_text(row, "completion", where), add_special_tokens=False)
    completion += list(tokenizer.eos_token_ids[:1])
    return Example(tuple(prompt + completion), tuple([IGNORE] * len(prompt) + completion))


def load_examples(path: str | os.PathLike, tokenizer: Any, max_len: int = 512) -> tuple[list[Example], dict]:
    """Every line of `path` encoded and cut to `max_len` tokens; lines left with nothing to learn are
    dropped (counted in the returned stats). DataError if the file holds no usable example."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: the data file is empty; add one JSON example per line ({SHAPES})")
    examples, dropped = [], 0
    for where, row in rows:
        ex = encode_row(row, tokenizer, where)
        ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
        if ex.n_labels == 0:
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no example keeps a completion token within max_len={max_len}; raise "
                        "--max-len or shorten the prompts")
    return examples, {"lines": len(rows), "examples": len(examples), "dropped_too_long": dropped,
                      "tokens": sum(len(e.input_ids) for e in examples)}


def split_examples(examples: list[Example], eval_fraction: float, seed: int = 0
                   ) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle split into (train, held-out); DataError if either side is empty."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval fraction must be in (0, 1), got {eval_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(examples) * eval_fraction)
    if n_eval == 0 or n_eval == len(examples):
        raise DataError(f"the held-out split is empty: {len(examples)} example(s) with eval fraction "
                        f"{eval_fraction} leave {'none for evaluation' if n_eval == 0 else 'none for training'}; "
                        "add data, change --eval-fraction or pass --eval-data")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def step_batches(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step `step` (0-based): epochs are seeded permutations of range(n),
    so the data order is a pure function of (seed, step) and a resumed run continues it exactly."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch_size: (k + 1) * batch_size]


def collate(examples: list[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (input_ids, labels), both (B, T) int64. Labels are shifted: labels[:, t] is the
    target for position t (the token at t + 1), -100 where there is none."""
    t = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, : n - 1] = torch.tensor(e.labels[1:])
    return ids, labels


def eval_batches(examples: list[Example], batch_size: int) -> Iterator[list[Example]]:
    for i in range(0, len(examples), batch_size):
        yield examples[i: i + batch_size]
