"""The run record: one versioned JSON file per `leanfm eval` / `leanfm bench` run, quality AND cost.

    rec = RunRecord(kind="bench", provenance=provenance(...), model=model_info(...), quality={...}, cost={...})
    save_record(rec, "runs/bench.json")          # atomic: temp file + os.replace
    rec = load_record("runs/bench.json")         # validated; a bad field -> LeanfmError naming file and field

Schema (version 1), every field required (None where it does not apply):
    schema_version: int; kind: "eval" | "bench"; complete: bool; notes: [str]
    provenance: leanfm_version, git_sha, git_dirty, torch_version, python, os, cpu {model, flags,
        logical_cores, physical_cores}, threads, ram_bytes, load_avg_1m (at the start), timestamp (ISO 8601 UTC), command,
        model_reference, weights_sha256, dtype, compression, dataset, split, seed, limit
    model: name, family, parameters, path, max_context
    quality: perplexity {ppl, nll, n_scored_tokens, n_windows, corpus, ctx, ...} | None;
             tasks {name: {n, acc, acc_stderr, acc_norm, acc_norm_stderr, ...}}
    cost: a dict (bench: measure_cost's output; eval: wall time, eval tokens/s, peak RSS, model bytes, energy)
Principle 8: cost is never shown without quality, nor quality without cost; both ride in every record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leanfm.utils.errors import LeanfmError
from leanfm.utils.paths import atomic_file, cache_dir

SCHEMA_VERSION = 1
KINDS = ("eval", "bench")
NONE = type(None)
NUM = (int, float)
_HASH_CHUNK = 1 << 22

SCHEMA: dict[str, Any] = {
    "schema_version": int, "kind": str, "complete": bool, "notes": list,
    "provenance": {
        "leanfm_version": str, "git_sha": (str, NONE), "git_dirty": (bool, NONE), "torch_version": str,
        "python": str, "os": str,
        "cpu": {"model": str, "flags": list, "logical_cores": (int, NONE), "physical_cores": (int, NONE)},
        "threads": int, "ram_bytes": (int, NONE), "load_avg_1m": (*NUM, NONE), "timestamp": str, "command": str,
        "model_reference": str, "weights_sha256": (str, NONE), "dtype": str, "compression": (dict, NONE),
        "dataset": (str, NONE), "split": (str, NONE), "seed": (int, NONE), "limit": (int, NONE),
    },
    "model": {"name": str, "family": str, "parameters": int, "path": (str, NONE), "max_context": int},
    "quality": {"perplexity": (dict, NONE), "tasks": dict},
    "cost": dict,
}
PERPLEXITY_SCHEMA = {"ppl": NUM, "n_scored_tokens": int, "corpus": str, "ctx": int}
TASK_SCHEMA = {"n": int, "acc": (*NUM, NONE), "acc_stderr": (*NUM, NONE)}


@dataclass
class RunRecord:
    kind: str  # "eval" | "bench"
    provenance: dict[str, Any]
    model: dict[str, Any]
    quality: dict[str, Any] = field(default_factory=lambda: {"perplexity": None, "tasks": {}})
    cost: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "record") -> RunRecord:
        validate(d, source)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------ validation
def _type_name(t: Any) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is NONE else x.__name__ for x in types)


def _check(value: Any, spec: Any, where: str, source: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise LeanfmError(f"{source}: field '{where}' must be an object, got {type(value).__name__}; "
                              "re-create the record with leanfm eval/bench")
        for key, sub in spec.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                raise LeanfmError(f"{source}: field '{path}' is missing; re-create the record with leanfm eval/bench")
            _check(value[key], sub, path, source)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise LeanfmError(f"{source}: field '{where}' must be {_type_name(spec)}, got {type(value).__name__} "
                          f"({value!r:.40}); fix the field or re-create the record")


def validate(d: Any, source: str = "record") -> None:
    """Raise LeanfmError naming `source` and the first missing or ill-typed field."""
    if not isinstance(d, dict):
        raise LeanfmError(f"{source}: a run record must be a JSON object; give a file written by leanfm eval/bench")
    version = d.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise LeanfmError(f"{source}: schema_version {version} is newer than this leanfm reads "
                          f"({SCHEMA_VERSION}); upgrade leanfm")
    _check(d, SCHEMA, "", source)
    if d["kind"] not in KINDS:
        raise LeanfmError(f"{source}: field 'kind' must be one of {list(KINDS)}, got {d['kind']!r}")
    if d["quality"]["perplexity"] is not None:
        _check(d["quality"]["perplexity"], PERPLEXITY_SCHEMA, "quality.perplexity", source)
    for name, task in d["quality"]["tasks"].items():
        _check(task, TASK_SCHEMA, f"quality.tasks.{name}", source)


# ------------------------------------------------------------------ files
def jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses, tuples, paths, dtypes and numpy/torch scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)  # strict JSON has no inf/nan
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def save_record(record: RunRecord, path: str | os.PathLike[str]) -> Path:
    """Validate and write `record` as JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    d = record.to_dict()
    validate(d, str(path))
    with atomic_file(path) as f:
        json.dump(d, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def load_record(path: str | os.PathLike[str]) -> RunRecord:
    path = Path(path)
    if not path.is_file():
        raise LeanfmError(f"{path}: no such record file; give a JSON file written by leanfm eval/bench")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeanfmError(f"{path}: not valid JSON ({e}); give a record written by leanfm eval/bench") from None
    return RunRecord.from_dict(d, str(path))


def default_record_path(kind: str, model_reference: str, root: str | os.PathLike[str] = "runs") -> Path:
    """runs/<kind>-<model>-<YYYYmmdd-HHMMSS>.json (UTC)."""
    name = Path(model_reference.rstrip("/")).name or "model"
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{kind}-{slug}-{stamp}.json"


# ------------------------------------------------------------------ checksums
def _digest_cache(path: Path) -> Path:
    beside = path.with_name(f".{path.name}.sha256")
    if os.access(path.parent, os.W_OK):
        return beside
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    return cache_dir("checksums") / f"{key}.json"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, cached beside it (or in the leanfm cache) keyed by size and mtime."""
    path = Path(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = _digest_cache(path)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("size") == key["size"] and cached.get("mtime_ns") == key["mtime_ns"]:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        with atomic_file(cache) as f:
            json.dump({**key, "sha256": digest}, f)
    except OSError:
        pass  # a read-only location: no cache, the digest is still right
    return digest


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of an HF model directory (all shards), sorted."""
    return sorted(Path(model_dir).glob("*.safetensors"))


def weights_sha256(files: list[Path]) -> str | None:
    """One file: its sha256. Several (shards): sha256 over "name digest" lines. None without files."""
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


# ------------------------------------------------------------------ provenance
def git_state() -> tuple[str | None, bool | None]:
    """(HEAD sha, dirty?) of the checkout leanfm runs from; (None, None) when not a git checkout."""
    import leanfm

    root = Path(leanfm.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha or None, bool(status.strip())


def provenance(model_reference: str, dtype: str, weight_paths: list[Path] | None = None, *,
               dataset: str | None = None, split: str | None = None, seed: int | None = None,
               limit: int | None = None, compression: dict | None = None,
               command: list[str] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce a run and to know what it ran on."""
    import torch

    import leanfm
    from leanfm.bench.system import machine_info

    machine = machine_info()
    sha, dirty = git_state()
    return {
        "leanfm_version": leanfm.__version__, "git_sha": sha, "git_dirty": dirty,
        "torch_version": torch.__version__, "python": machine["python"], "os": machine["os"],
        "cpu": machine["cpu"], "threads": machine["torch_threads"], "ram_bytes": machine["ram_bytes"],
        "load_avg_1m": machine["load_avg_1m"],
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command if command is not None else ["leanfm", *sys.argv[1:]]),
        "model_reference": model_reference, "weights_sha256": weights_sha256(list(weight_paths or [])),
        "dtype": dtype, "compression": compression, "dataset": dataset, "split": split, "seed": seed,
        "limit": limit,
    }


def model_info(model: Any, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """name, family, parameter count (tied weights once), path and context of a loaded leanfm model."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    return {"name": c.name or (Path(path).name if path else "model"), "family": c.family,
            "parameters": int(params), "path": str(path) if path else None,
            "max_context": int(c.max_position_embeddings)}
