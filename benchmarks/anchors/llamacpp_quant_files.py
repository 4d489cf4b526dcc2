"""The GGUF files of the llama.cpp quantization anchor (llamacpp_quant.py): export, quantize, cache.

leanfm writes its float base as GGUF F16 (`export_f16`, tokenizer metadata copied from the model's source
GGUF: `source_gguf`, `tokenizer_fields`); llama.cpp's quantizer (`quantize_gguf`, default params, no imatrix)
makes Q8_0, Q4_0, Q4_K_M... from it, its log captured (`captured_stderr`). `cached_files` keeps them under
`~/.cache/leanfm/llamacpp_quant/<model>-<key>/`, the key (`cache_key`) hashing the float base's files, the
source GGUF and the GGUF writer's source (quantized files also name the llama-cpp-python version), so an
unchanged source is never re-exported nor re-quantized; a new key replaces the model's older cache
directories. bench_decode_llamacpp.py and bench_serve.py reuse these files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

FTYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
          "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}


# ------------------------------------------------------------------ files: export, quantize, cache
def source_gguf(lm) -> Path:
    """The GGUF the model came from (its tokenizer metadata is copied into the export)."""
    from leanfm.checkpoint.loader import ALIASES
    from leanfm.utils.errors import LeanfmError

    if lm.gguf_path is not None:
        return Path(lm.gguf_path)
    if lm.source in ALIASES:
        return Path(ALIASES[lm.source].gguf_path())
    raise LeanfmError(f"{lm.source}: llama.cpp export needs the tokenizer metadata of a source GGUF; "
                      "load the model from an alias or a .gguf file")


def tokenizer_fields(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """Every `tokenizer.*` key of a GGUF, to write into another GGUF of the same model."""
    from leanfm.checkpoint.gguf_tokenizer import read_gguf_metadata

    return read_gguf_metadata(gguf_path, prefixes=("tokenizer.",))


def export_f16(model, fields: dict[str, Any], path: str | os.PathLike) -> Path:
    """leanfm's float model as GGUF F16 (atomic write), with the given tokenizer metadata."""
    from leanfm.checkpoint.gguf_writer import write_gguf

    return write_gguf(path, model.config, model.state_dict(), tokenizer_fields=fields, qtype="F16")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Send fd 2 and sys.stderr (llama.cpp's log) to a temp file for the block; the yielded list receives the
    text on exit, and on an exception the log's tail is written to the real stderr."""
    import sys

    fd, name = tempfile.mkstemp(prefix="llamacpp-", suffix=".log")
    saved, out, failed = os.dup(2), [], False
    sys.stderr.flush()
    os.dup2(fd, 2)
    try:
        with open(fd, "w", closefd=False) as log, contextlib.redirect_stderr(log):
            yield out
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        out.append(Path(name).read_text(errors="replace"))
        os.unlink(name)
        if failed:
            sys.stderr.write("".join(out[0].splitlines(keepends=True)[-20:]))


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer with its default params (per-tensor type rules, no imatrix): src -> dst, atomically."""
    import llama_cpp

    if qtype not in FTYPES:
        raise ValueError(f"unknown llama.cpp type {qtype!r}; use one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, FTYPES[qtype]), threads
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp quantize to {qtype} failed (rc {rc}):\n" + "\n".join(log[0].splitlines()[-20:]))
    os.replace(tmp, dst)
    return dst


def cache_key(lm, src: Path) -> str:
    """Hash of the float base's files, the source GGUF (tokenizer) and the GGUF writer's source."""
    from leanfm.checkpoint import gguf_writer

    h = hashlib.sha256()
    files = sorted(p for p in Path(lm.path).iterdir() if p.is_file()) if Path(lm.path).is_dir() else [Path(lm.path)]
    for p in [*files, src]:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(Path(gguf_writer.__file__).read_bytes())
    return h.hexdigest()[:12]


def cached_files(lm, types: Sequence[str], threads: int = 2, cache: Path | None = None,
                 log=print) -> dict[str, Path]:
    """{"F16": path, type: path...}: exported / quantized on first use, reused while the source is unchanged."""
    import llama_cpp

    from leanfm.utils.paths import cache_dir

    src = source_gguf(lm)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(lm.source)).name.removesuffix(".gguf"))
    root = Path(cache) if cache is not None else cache_dir("llamacpp_quant")
    d = root / f"{name}-{cache_key(lm, src)}"
    if not d.is_dir():
        for old in root.glob(f"{name}-*"):  # one cache per model: drop the outdated ones
            if re.fullmatch(re.escape(name) + r"-[0-9a-f]{12}", old.name):
                shutil.rmtree(old, ignore_errors=True)
        d.mkdir(parents=True)
    out = {"F16": d / "F16.gguf"}
    if not out["F16"].exists():
        t0 = time.perf_counter()
        export_f16(lm.model, tokenizer_fields(src), out["F16"])
        log(f"leanfm wrote {out['F16']} ({time.perf_counter() - t0:.0f} s)")
    for qtype in types:
        if qtype == "F16":
            continue
        out[qtype] = d / f"{qtype}.llama-cpp-python-{llama_cpp.__version__}.gguf"
        if not out[qtype].exists():
            t0 = time.perf_counter()
            quantize_gguf(out["F16"], out[qtype], qtype, threads)
            log(f"llama.cpp quantized {qtype} -> {out[qtype]} ({time.perf_counter() - t0:.0f} s)")
    return out
