"""Where leanfm keeps its cache (XDG base directories) and how it writes files atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$LEANFM_CACHE` or `$XDG_CACHE_HOME/leanfm` or `~/.cache/leanfm`, joined with parts (created)."""
    root = os.environ.get("LEANFM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "leanfm"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(dest: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; on success it replaces `dest` in one rename.

    On any exception the temporary directory is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            if not overwrite:
                raise FileExistsError(f"{dest} already exists")
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(dest: Path | str, mode: str = "w") -> Iterator:
    """Open a temporary file beside `dest` for writing; rename over `dest` only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
