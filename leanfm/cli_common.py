"""What every `leanfm` verb shares: the common options, torch set-up and model loading."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from leanfm.utils.errors import LeanfmError

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="alias, .gguf file or HF directory")]
AdapterOpt = Annotated[str | None, typer.Option(help="adapter directory (leanfm finetune or PEFT) to apply")]
ThreadsOpt = Annotated[int, typer.Option(help="CPU threads (0 = torch default)")]
DtypeOpt = Annotated[str, typer.Option(help="float32 | bfloat16")]

DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def setup_torch(threads: int, dtype: str, seed: int | None) -> tuple[Any, str]:
    """Validate the common options, apply threads and seed; return (torch dtype, canonical dtype name)."""
    import torch

    if dtype not in DTYPES:
        raise LeanfmError(f"unknown --dtype {dtype!r}; use float32 or bfloat16")
    if threads < 0:
        raise LeanfmError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(torch, DTYPES[dtype]), DTYPES[dtype]


def load_for_inference(model: str, dtype: Any, adapter: str | None = None, for_generation: bool = False) -> Any:
    """load_model (+ the adapter at `adapter`, merged when it can be) + prepare_for_inference; Ctrl-C while
    loading exits 130 with one line."""
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    try:
        loaded = load_model(model, dtype=dtype, progress=True)
    except KeyboardInterrupt:
        typer.echo("interrupted while loading the model", err=True)
        raise typer.Exit(130) from None
    if adapter is not None:
        from leanfm.tune.inference import apply_adapter

        apply_adapter(loaded.model, adapter, for_generation=for_generation)
    prepare_for_inference(loaded.model)
    return loaded
