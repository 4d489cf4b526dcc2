"""Fine-tuning data: label masks for prompt/completion, chat and text lines; clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from conftest import make_byte_tokenizer

from leanfm.tune.data import (
    IGNORE,
    DataError,
    collate,
    encode_row,
    load_examples,
    split_examples,
    step_batches,
)


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_completion_masks_the_prompt(tok):
    ex = encode_row({"prompt": "Q: 2+2?", "completion": " 4"}, tok)
    n_prompt = len(tok.encode("Q: 2+2?"))
    assert ex.labels[:n_prompt] == (IGNORE,) * n_prompt
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == " 4"
    assert ex.input_ids[-1] == tok.eos_token_ids[0] == ex.labels[-1]


def test_chat_learns_assistant_turns_only(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    ex = encode_row({"messages": msgs}, tok)
    learned = tok.decode([t if t != IGNORE else 0 for t in ex.labels], skip_special_tokens=False)
    kept = "".join(ch for ch in learned.replace("<pad>", "\0").split("\0") if ch)
    assert kept == "hello<end_of_turn>ciao<end_of_turn>"
    assert tok.decode(ex.input_ids, skip_special_tokens=False).startswith("<bos><user>hi<end_of_turn>")


def test_text_learns_everything(tok):
    ex = encode_row({"text": "abc"}, tok)
    assert ex.labels == ex.input_ids and ex.n_labels == len(ex.input_ids) - 1


def test_collate_shifts_and_pads(tok):
    a, b = encode_row({"prompt": "x", "completion": "yz"}, tok), encode_row({"text": "abcdef"}, tok)
    ids, labels = collate([a, b], pad_id=0)
    assert ids.shape == labels.shape == (2, len(b.input_ids))
    assert labels[0, : len(a.input_ids) - 1].tolist() == list(a.labels[1:])
    assert (labels[0, len(a.input_ids) - 1:] == IGNORE).all() and (ids[0, len(a.input_ids):] == 0).all()


def test_load_and_split(tok, tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)] + [{"prompt": "x" * 50, "completion": "y"}]
    examples, stats = load_examples(write(tmp_path / "d.jsonl", rows), tok, max_len=20)
    assert stats == {"lines": 11, "examples": 10, "dropped_too_long": 1, "tokens": sum(len(e.input_ids) for e in examples)}
    train, held = split_examples(examples, 0.2, seed=3)
    assert len(train) == 8 and len(held) == 2 and not set(map(id, train)) & set(map(id, held))
    assert sorted(step_batches(8, 4, 0, 0) + step_batches(8, 4, 0, 1)) == list(range(8))


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], r"d\.jsonl:2: missing field 'completion'"),
    ([{"question": "a"}], "missing field 'prompt'"),
    (["{not json"], r"d\.jsonl:1: not valid JSON"),
    ([[1, 2]], "expected a JSON object"),
    ([{"prompt": 3, "completion": "b"}], "'prompt' must be a string"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant message"),
    ([{"messages": [{"role": "user"}]}], r"messages\[0\] must be"),
    ([], "empty"),
])
def test_bad_data_is_reported_with_its_line(tok, tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_examples(write(tmp_path / "d.jsonl", rows), tok)


def test_empty_splits_are_refused(tok, tmp_path):
    examples, _ = load_examples(write(tmp_path / "d.jsonl", [{"text": "abc"}] * 3), tok)
    with pytest.raises(DataError, match="held-out split is empty"):
        split_examples(examples, 0.1)
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl", tok)
