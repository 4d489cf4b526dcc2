"""`leanfm finetune`: train an adapter on a JSONL file and save it in the PEFT layout.

    leanfm finetune -m gemma-3-270m --method lora --data train.jsonl -o out/lora --steps 200
    leanfm finetune -m gemma-3-270m --method qlora --rank 16 --set bits=4 --data chat.jsonl -o out/q
    torchrun --nproc_per_node 2 -m leanfm.cli finetune ... --distributed ddp    # or fsdp
    leanfm generate -m gemma-3-270m --adapter out/lora "Question: ..."

Data lines are {"prompt", "completion"}, {"messages": [...]} (the model's chat template; loss on the
assistant turns) or {"text"}. Everything is checked before training: options, the output directory,
the target modules (against a weightless copy of the model), every data line and both splits. The
predicted peak memory is printed before training and the measured one after. An interrupted run
resumes from OUT/checkpoints when started again with the same settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from leanfm.cli_common import DtypeOpt, ModelOpt, ThreadsOpt, setup_torch
from leanfm.utils.errors import LeanfmError

DEFAULT_LR = {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "ia3": 3e-3, "prompt": 3e-2, "prefix": 1e-2,
              "bottleneck": 1e-3, "bitfit": 1e-3}
MEZO_LR = 1e-4


def _adapter_config(method: str, rank: int | None, alpha: float | None, dropout: float | None,
                    targets: list[str] | None, sets: list[str] | None):
    from leanfm.cli_compress import _parse_set
    from leanfm.tune.config import config_from_dict

    d: dict[str, Any] = {"method": method, **_parse_set(sets or [])}
    for key, value in (("r", rank), ("alpha", alpha), ("dropout", dropout), ("target_modules", targets or None)):
        if value is not None:
            d[key] = value
    return config_from_dict(d)


def _check_output(out: Path, overwrite: bool, resume: bool) -> bool:
    """Raise if OUT cannot take this run; True when OUT must be cleared first (--overwrite). Every process
    checks (so all fail together); only rank 0 clears."""
    if out.exists() and not out.is_dir():
        raise LeanfmError(f"{out} exists and is not a directory; choose another -o")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    finished = (out / "adapter_config.json").is_file()
    ckpts = (out / "checkpoints").is_dir()
    if overwrite:
        return True
    if finished:
        raise LeanfmError(f"{out} already holds a finished adapter; choose a new -o or pass --overwrite")
    if not ckpts:
        raise LeanfmError(f"{out} is not empty and holds no fine-tuning run; choose a new -o")
    if not resume:
        raise LeanfmError(f"{out} holds checkpoints of an earlier run; drop --no-resume to continue it, or "
                          "pass --overwrite to start over")
    return False


def _check_targets(model_ref: str, adapter) -> Any:
    """The model config; target patterns are checked against a weightless (meta) copy of the model."""
    from leanfm.checkpoint.inspect import read_config
    from leanfm.models import build_model
    from leanfm.tune.api import find_targets

    config, _ = read_config(model_ref)
    if adapter.level == "module":
        find_targets(build_model(config, device="meta"), adapter)
    return config


def _load_data(data: Path, eval_data: Path | None, eval_fraction: float, tokenizer, max_len: int, seed: int):
    from leanfm.tune.data import DataError, load_examples, split_examples

    examples, stats = load_examples(data, tokenizer, max_len)
    if eval_data is not None:
        held, _ = load_examples(eval_data, tokenizer, max_len)
        train_set = examples
    else:
        train_set, held = split_examples(examples, eval_fraction, seed)
    if not train_set or not held:
        raise DataError("a data split is empty; add examples")
    return train_set, held, {**stats, "train": len(train_set), "held_out": len(held)}


def _plan(config, adapter, train_cfg, train_set, dtype):
    from leanfm.tune.memory import plan_memory

    seq = max(len(e.input_ids) for e in train_set)
    labeled = sum(e.n_labels for e in train_set) / max(1, sum(len(e.input_ids) for e in train_set))
    return plan_memory(config, adapter, train_cfg, seq_len=seq, labeled_fraction=labeled, dtype=dtype)


def _summary(res, plan, peak: int, out: Path) -> str:
    mb = 1 << 20
    return (f"held-out loss {res.eval_loss_before:.4f} -> {res.eval_loss_after:.4f} | {res.trainable_parameters:,} "
            f"trainable parameters | {res.tokens_per_second:.0f} tokens/s | peak memory {peak / mb:.0f} MB "
            f"measured, {plan.total / mb:.0f} MB predicted | adapter: {out}")


def finetune_cmd(
    data: Annotated[Path, typer.Option(help="training data, JSONL: prompt/completion, messages or text lines")],
    output: Annotated[Path, typer.Option("--output", "-o", help="adapter directory (checkpoints inside)")],
    model: ModelOpt = "gemma-3-270m",
    method: Annotated[str, typer.Option(help="lora | dora | qlora | ia3 | prompt | prefix | bottleneck | bitfit")] = "lora",
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="LoRA rank")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha")] = None,
    dropout: Annotated[float | None, typer.Option(help="LoRA dropout")] = None,
    target: Annotated[list[str] | None, typer.Option(help="module name pattern to adapt (repeatable)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="adapter option key=value (repeatable)")] = None,
    eval_data: Annotated[Path | None, typer.Option(help="held-out JSONL (default: split from --data)")] = None,
    eval_fraction: Annotated[float, typer.Option(help="held-out share of --data")] = 0.1,
    max_len: Annotated[int, typer.Option(help="tokens per example at most")] = 512,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 100,
    batch_size: Annotated[int, typer.Option(help="examples per step (all processes)")] = 4,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per step")] = 1,
    lr: Annotated[float | None, typer.Option(help="learning rate [default: per method]")] = None,
    schedule: Annotated[str, typer.Option(help="cosine | linear | constant")] = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    optimizer: Annotated[str, typer.Option(help="adamw | adamw8bit | sgd | mezo")] = "adamw",
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast")] = False,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="recompute layers in backward")] = False,
    eval_every: Annotated[int, typer.Option(help="steps between held-out evaluations (0: start and end)")] = 0,
    save_every: Annotated[int, typer.Option(help="steps between checkpoints (0: end only)")] = 0,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoints when present")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
    distributed: Annotated[str | None, typer.Option(help="ddp | fsdp (under torchrun)")] = None,
    threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32",
) -> None:
    """Fine-tune an adapter (LoRA, DoRA, QLoRA, IA3, prompt/prefix tuning, bottleneck, BitFit) and save it."""
    from leanfm.tune.memory import limit_heap_retention
    from leanfm.tune.trainer import TrainConfig

    torch_dtype, _ = setup_torch(threads, dtype, None)
    adapter = _adapter_config(method, rank, alpha, dropout, target, set_)
    default_lr = MEZO_LR if optimizer == "mezo" else DEFAULT_LR.get(method, 2e-4)
    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr or default_lr,
                            schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
                            optimizer=optimizer, bf16=bf16, grad_checkpointing=grad_checkpointing,
                            eval_every=eval_every, save_every=save_every, seed=seed)
    par = _parallel(distributed)
    try:
        if _check_output(output, overwrite, resume) and par.is_main:
            shutil.rmtree(output)
        par.barrier()
        config = _check_targets(model, adapter)
        limit_heap_retention()
        _run(model, adapter, train_cfg, config, data, eval_data, eval_fraction, max_len, output, resume,
             torch_dtype, par)
    finally:
        if par.world > 1:
            from leanfm.tune.distributed import teardown

            teardown()


def _parallel(distributed: str | None):
    from leanfm.tune.distributed import launched_by_torchrun, setup
    from leanfm.tune.parallel import Parallel

    if distributed is None and not launched_by_torchrun():
        return Parallel()
    return setup(distributed or "ddp")


def tokenizer_only(model_ref: str):
    """The model's tokenizer without loading its weights (alias, .gguf, HF directory or artifact)."""
    from leanfm.checkpoint.loader import cached_alias_dir, resolve
    from leanfm.checkpoint.tokenizer import Tokenizer

    cached = cached_alias_dir(model_ref)
    kind, path = ("hf", cached) if cached else resolve(model_ref)
    return Tokenizer.from_hf_dir(path) if kind == "hf" else Tokenizer.from_gguf(path)


def _run(model_ref, adapter, train_cfg, config, data, eval_data, eval_fraction, max_len, output, resume,
         dtype, par) -> None:
    from leanfm.checkpoint.loader import load_model
    from leanfm.tune.api import add_adapter
    from leanfm.tune.memory import peak_rss_bytes
    from leanfm.tune.state import publish_adapter
    from leanfm.tune.trainer import train

    tokenizer = tokenizer_only(model_ref)
    train_set, held, stats = _load_data(data, eval_data, eval_fraction, tokenizer, max_len, train_cfg.seed)
    plan = _plan(config, adapter, train_cfg, train_set, dtype)  # before the weights load: runtime = RSS now
    if par.is_main:
        typer.echo(plan.table(), err=True)
    loaded = load_model(model_ref, dtype=dtype, progress=par.is_main)
    add_adapter(loaded.model, adapter, seed=train_cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data_id = {"data": stats, "model": model_ref}
    res = train(loaded.model, train_set, held, train_cfg, pad_id=pad, out_dir=output, par=par, resume=resume,
                fingerprint=data_id, adapter_meta={"base_model": model_ref})
    peak = peak_rss_bytes()  # this process (rank 0 under torchrun)
    if not par.is_main:
        return
    publish_adapter(output)
    record = {"model": model_ref, "adapter": adapter.to_dict(), "train": train_cfg.to_dict(), "data": stats,
              "processes": par.world, "distributed": par.kind, "eval_loss_before": res.eval_loss_before,
              "eval_loss_after": res.eval_loss_after, "trainable_parameters": res.trainable_parameters,
              "train_tokens": res.train_tokens, "train_seconds": res.seconds,
              "tokens_per_second": res.tokens_per_second,
              "memory": {"measured_peak_rss_bytes": peak, "predicted_peak_bytes": plan.total,
                         **{k: getattr(plan, k) for k in ("weights", "adapter", "gradients", "optimizer",
                                                          "activations", "loss", "runtime", "load_transient")}},
              "history": res.history}
    (Path(output) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(_summary(res, plan, peak, Path(output)))
