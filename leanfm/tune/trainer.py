"""The fine-tuning loop: gradient accumulation, warmup + cosine/linear schedules, bf16 autocast, gradient
checkpointing, held-out evaluation, checkpoints and exact resume, a progress bar with loss and tokens/s.

    result = train(model, train_set, eval_set, TrainConfig(steps=200, lr=2e-4), pad_id=0, out_dir="out")

`model` already carries its (active) adapter; only trainable parameters are optimised. The loss is the
mean over the step's completion tokens (summed, then divided by the global token count), so a step is
the same computation however the batch is split across micro-batches and processes. Runs in one
process, or in each process of a torch.distributed job (see leanfm.tune.distributed: `parallel`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from leanfm.tune import api
from leanfm.tune.config import AdapterError
from leanfm.tune.data import Example, collate, step_batches
from leanfm.tune.loss import DEFAULT_CHUNK, CausalLMLoss
from leanfm.tune.optim import AdamW8bit, MeZO, lr_lambda
from leanfm.tune.parallel import Parallel

__all__ = ["TrainConfig", "TrainResult", "enable_gradient_checkpointing", "evaluate", "train"]

OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "mezo")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # examples per optimizer step, over all micro-batches and processes
    grad_accum: int = 1  # micro-batches per step (per process)
    lr: float = 2e-4
    schedule: str = "cosine"  # cosine | linear | constant, after linear warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (8-bit states) | sgd | mezo (zeroth-order, forward only)
    mezo_eps: float = 1e-3
    bf16: bool = False  # bfloat16 autocast for the model's forward (the loss stays fp32)
    grad_checkpointing: bool = False  # recompute each decoder layer in backward instead of storing it
    eval_every: int = 0  # steps between held-out evaluations (0: before and after only)
    eval_batch_size: int = 8
    save_every: int = 0  # steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 2
    seed: int = 0
    loss_chunk: int = DEFAULT_CHUNK  # vocabulary rows per chunk of the fused LM-head loss

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise AdapterError(f"training config: {message}")

        for key in ("steps", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "loss_chunk"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                fail(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, key) < 0:
                fail(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            fail(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if not self.lr > 0 or not self.mezo_eps > 0:
            fail(f"lr and mezo_eps must be > 0, got {self.lr}, {self.mezo_eps}")
        if self.optimizer not in OPTIMIZERS:
            fail(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            fail(f"schedule must be cosine, linear or constant, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    steps: int
    trainable_parameters: int
    train_tokens: int  # input tokens processed (all processes), pads excluded
    seconds: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds > 0 else 0.0


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer during backward (torch.utils.checkpoint, non-reentrant): only the layer
    inputs are kept, not every intermediate activation. Parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        if "forward" in layer.__dict__:
            continue
        run = layer.forward

        def forward(*args: Any, _run=run, **kwargs: Any) -> Tensor:
            return checkpoint(_run, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _autocast(config: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


@torch.no_grad()
def evaluate(runner: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 8,
             par: Parallel | None = None, bf16: bool = False) -> float:
    """Mean next-token loss over the completion tokens of `examples` (split across processes). `runner`
    maps (input_ids, labels) to (summed loss, token count): a CausalLMLoss, or its parallel wrapper."""
    par = par or Parallel()
    mine = examples[par.rank::par.world]
    n_batches = -(-len(examples) // (par.world * batch_size))  # the same count on every process
    total = torch.zeros(2, dtype=torch.float64)
    was_training = runner.training
    runner.eval()
    for b in range(n_batches):
        batch = mine[b * batch_size: (b + 1) * batch_size]
        weight = 1.0 if batch else 0.0  # a process out of examples still joins the collective forward
        ids, labels = collate(batch or examples[:1], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = runner(ids, labels)
        total += torch.tensor([float(loss) * weight, float(n) * weight], dtype=torch.float64)
    runner.train(was_training)
    total = par.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _build_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        return AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "mezo":
        return MeZO(params, lr=config.lr, eps=config.mezo_eps, weight_decay=config.weight_decay, seed=config.seed)
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


def _micro_batches(examples: list[Example], idx: list[int], config: TrainConfig, par: Parallel) -> list[list[Example]]:
    per_rank = config.batch_size // par.world
    mine = idx[par.rank * per_rank: (par.rank + 1) * per_rank]
    size = per_rank // config.grad_accum
    return [[examples[i] for i in mine[k * size: (k + 1) * size]] for k in range(config.grad_accum)]


def _train_step(runner: nn.Module, micro: list[list[Example]], pad_id: int, opt: torch.optim.Optimizer,
                config: TrainConfig, par: Parallel) -> tuple[float, int]:
    """One optimizer step over the micro-batches; returns (mean loss over all processes, input tokens here)."""
    batches = [collate(m, pad_id) for m in micro]
    n_total = par.all_reduce(torch.tensor(float(sum(int((lab != -100).sum()) for _, lab in batches))))
    n_inputs = sum(int((ids != pad_id).sum()) for ids, _ in batches)
    if config.optimizer == "mezo":
        def closure() -> Tensor:
            with torch.no_grad(), _autocast(config):
                s = sum(float(runner(ids, lab)[0]) for ids, lab in batches)
            return par.all_reduce(torch.tensor(s, dtype=torch.float64)) / n_total

        return float(opt.step(closure)), n_inputs
    total = 0.0
    for ids, labels in batches:
        with _autocast(config):
            loss, _ = runner(ids, labels)
        (loss * (par.world / n_total)).backward()  # data-parallel averaging divides by world again
        total += float(loss.detach())
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in runner.parameters() if p.requires_grad], config.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(par.all_reduce(torch.tensor(total, dtype=torch.float64)) / n_total), n_inputs


def _fingerprint(model: nn.Module, config: TrainConfig, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (eval/save cadence may change)."""
    keep = {k: v for k, v in config.to_dict().items()
            if k not in ("eval_every", "eval_batch_size", "save_every", "keep_checkpoints")}
    adapter = api.adapter_configs(model)[api.active_adapter(model)].to_dict()
    return {"adapter": adapter, "train": keep, **(extra or {})}


def _resume(model: nn.Module, out_dir: Path | None, fingerprint: dict, par: Parallel) -> dict[str, Any] | None:
    from leanfm.tune.state import latest_checkpoint, load_checkpoint, restore_rng

    last = latest_checkpoint(out_dir) if out_dir is not None else None
    if last is None:
        return None
    state = load_checkpoint(last, fingerprint)
    api.load_adapter_state_dict(model, state["adapter"])
    restore_rng(state["rng"])
    if par.is_main:
        from tqdm import tqdm

        tqdm.write(f"resuming from {last} (step {state['step']})")
    return state


@dataclass
class _Session:
    """One train() call's moving parts: what evaluation and checkpointing need between steps."""

    model: nn.Module
    runner: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    config: TrainConfig
    par: Parallel
    eval_set: list[Example]
    pad_id: int
    out_dir: Path | None
    fingerprint: dict[str, Any]
    adapter_meta: dict[str, Any] | None
    progress: bool
    history: list[dict[str, Any]] = field(default_factory=list)

    def evaluate(self, step: int) -> None:
        if not self.eval_set:  # e.g. a federated client's local round: the server evaluates
            return
        loss = evaluate(self.runner, self.eval_set, self.pad_id, self.config.eval_batch_size, self.par,
                        self.config.bf16)
        self.history.append({"step": step, "eval_loss": loss})
        if self.par.is_main and self.progress:
            from tqdm import tqdm

            tqdm.write(f"step {step}: held-out loss {loss:.4f}")

    def save(self, step: int) -> None:
        from leanfm.tune.state import save_checkpoint

        if self.out_dir is None:
            return
        with self.par.full_params(self.runner):
            if self.par.is_main:
                sharded = self.par.kind == "fsdp"  # its optimizer state is sharded DTensors: not saved
                save_checkpoint(self.out_dir, step, self.model, None if sharded else self.opt, self.sched,
                                self.history, self.fingerprint, self.config.keep_checkpoints, self.adapter_meta)
        self.par.barrier()


def _start(model: nn.Module, train_set: list[Example], config: TrainConfig, par: Parallel, out_dir: Path | None,
           resume: bool, fingerprint: dict[str, Any]) -> tuple[nn.Module, Any, Any, int, list[dict]]:
    """Checks, then (runner, optimizer, scheduler, first step, history), restored from a checkpoint if any."""
    if config.batch_size % (config.grad_accum * par.world):
        raise AdapterError(f"batch_size {config.batch_size} must divide into grad_accum {config.grad_accum} x "
                           f"{par.world} process(es)")
    if len(train_set) < config.batch_size:
        raise AdapterError(f"the training split has {len(train_set)} example(s), fewer than one batch of "
                           f"{config.batch_size}; add data or lower --batch-size")
    if config.grad_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    state = _resume(model, out_dir, fingerprint, par) if resume else None
    if state is None:  # a fresh run is a function of its seed (dropout masks...); a resumed one restores RNG
        torch.manual_seed(config.seed)
    runner = par.wrap(CausalLMLoss(model, config.loss_chunk))
    params = [p for p in runner.parameters() if p.requires_grad]
    if not params:
        raise AdapterError("the model has no trainable parameters; add_adapter() before training")
    opt = _build_optimizer(params, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config.schedule, config.warmup_steps, config.steps))
    if state is None:
        return runner, opt, sched, 0, []
    sched.load_state_dict(state["scheduler"])
    if state["optimizer"] is not None:  # None from a sharded run: its moments restart (see distributed)
        opt.load_state_dict(state["optimizer"])
    return runner, opt, sched, state["step"], state["history"]


def train(model: nn.Module, train_set: list[Example], eval_set: list[Example], config: TrainConfig, *,
          pad_id: int, out_dir: str | Path | None = None, par: Parallel | None = None, resume: bool = True,
          progress: bool = True, fingerprint: dict[str, Any] | None = None,
          adapter_meta: dict[str, Any] | None = None) -> TrainResult:
    """Train the model's active adapter; checkpoints go to out_dir/checkpoints (resumed from when present
    and `resume`). Returns losses before/after on `eval_set`, token counts and timing."""
    from tqdm import tqdm

    par = par or Parallel()
    out_dir = None if out_dir is None else Path(out_dir)
    fingerprint = _fingerprint(model, config, fingerprint)
    runner, opt, sched, start, history = _start(model, train_set, config, par, out_dir, resume, fingerprint)
    run = _Session(model, runner, opt, sched, config, par, eval_set, pad_id, out_dir, fingerprint, adapter_meta,
                   progress, history)
    if start == 0:
        run.evaluate(0)
    bar = tqdm(total=config.steps, initial=start, desc="finetune", disable=not (progress and par.is_main),
               dynamic_ncols=True)
    tokens, seconds = 0, 0.0
    for step in range(start, config.steps):
        micro = _micro_batches(train_set, step_batches(len(train_set), config.batch_size, config.seed, step),
                               config, par)
        t0 = time.perf_counter()
        loss, n_in = _train_step(runner, micro, pad_id, opt, config, par)
        sched.step()
        seconds += time.perf_counter() - t0
        tokens += int(par.all_reduce(torch.tensor(n_in)))
        lr = sched.get_last_lr()[0]
        run.history.append({"step": step + 1, "loss": loss, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(seconds, 1e-9):.1f}", lr=f"{lr:.2e}")
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            run.evaluate(step + 1)
        if config.save_every and (step + 1) % config.save_every == 0:
            run.save(step + 1)
    bar.close()
    if "eval_loss" not in run.history[-1]:  # (a resumed, already finished run has its final evaluation)
        run.evaluate(config.steps)
    if start < config.steps:
        run.save(config.steps)
    evals = [h["eval_loss"] for h in run.history if "eval_loss" in h] or [None]
    n_trainable = sum(p.numel() for _, p in api.adapter_parameters(model))
    return TrainResult(config.steps - start, n_trainable, tokens, seconds, evals[0], evals[-1], run.history)
