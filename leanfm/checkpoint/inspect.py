"""Read a model's config without loading its weights (for `leanfm info` and planning)."""

from __future__ import annotations

import json
from pathlib import Path

from leanfm.checkpoint.loader import cached_alias_dir, resolve
from leanfm.models.config import ModelConfig
from leanfm.utils.errors import CheckpointError


def read_config(ref: str) -> tuple[ModelConfig, Path]:
    """(config, file or dir it came from) for an alias, a .gguf file or an HF directory."""
    cached = cached_alias_dir(ref)
    kind, path = ("hf", cached) if cached else resolve(ref)
    if kind in ("alias", "gguf"):
        from leanfm.checkpoint.gguf_reader import read_gguf_config

        return read_gguf_config(path), path
    from leanfm.checkpoint.hf import config_from_hf

    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json; give an HF model directory or a .gguf file")
    try:
        return config_from_hf(json.loads(cfg.read_text())), path
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: invalid JSON ({e}); fix or re-create the file") from None
