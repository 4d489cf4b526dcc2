"""Training checkpoints: everything a run needs to continue where it stopped.

    OUT/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors, leanfm_adapter.json   (a usable adapter)
        trainer_state.pt   step, adapter tensors, optimizer and scheduler state, RNG states, history

Each checkpoint directory is written under a temporary name and renamed when complete, so a run killed
mid-save leaves the previous checkpoint as the latest. `fingerprint` (adapter config, data and the
settings that shape the run) must match on resume.
"""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.tune import api
from leanfm.tune.config import AdapterError
from leanfm.tune.peft_format import save_adapter

__all__ = ["latest_checkpoint", "load_checkpoint", "publish_adapter", "restore_rng", "rng_state", "save_checkpoint"]

CKPT_DIR, STATE_NAME = "checkpoints", "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any, history: list[dict], fingerprint: dict[str, Any], keep: int = 2,
                    adapter_meta: dict[str, Any] | None = None) -> Path:
    root = Path(out_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_adapter(model, tmp, extra=adapter_meta)
        torch.save({"step": step, "adapter": api.adapter_state_dict(model), "optimizer": None if optimizer is None else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": history,
                    "fingerprint": fingerprint}, tmp / STATE_NAME)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = Path(out_dir) / CKPT_DIR
    done = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The saved trainer state; AdapterError if it was made by a run with other settings."""
    state = torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=True)
    saved = state.get("fingerprint", {})
    diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if diff:
        raise AdapterError(f"{path} was written by a run with different {', '.join(diff)}; resume with the same "
                           "settings, or start over with a new output directory (or --no-resume)")
    return state


def publish_adapter(out_dir: Path) -> Path:
    """Copy the latest checkpoint's adapter into out_dir itself (beside checkpoints/): staged in a temporary
    directory, then moved in file by file with adapter_config.json last, so a reader that finds the config
    finds a complete adapter. (From the checkpoint, not the model: a sharded model need not be gathered.)"""
    from leanfm.tune.peft_format import CONFIG_NAME, LEANFM_NAME, WEIGHTS_NAME

    out_dir = Path(out_dir)
    last = latest_checkpoint(out_dir)
    if last is None:
        raise AdapterError(f"{out_dir}: no checkpoint to publish")
    tmp = out_dir / f".final-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = (WEIGHTS_NAME, LEANFM_NAME, CONFIG_NAME)
        for name in names:
            shutil.copy2(last / name, tmp / name)
        (out_dir / CONFIG_NAME).unlink(missing_ok=True)
        for name in names:
            (tmp / name).replace(out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
