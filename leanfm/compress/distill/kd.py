"""Knowledge distillation: train a compressed student towards its uncompressed teacher.

    recipe = Recipe([Step(SVDConfig(param_ratio=0.6)), Step(DistillConfig(steps=200))])
    report = compress_(model, recipe, calibration=tokens)   # compress_ keeps the teacher (a copy)
    report.steps[-1]["kl_before"], report.steps[-1]["kl_after"]

The student (the model as the earlier steps left it) is trained in place with AdamW on the calibration
tokens to match the teacher's next-token distributions (forward KL, reverse KL or JSD on the logits,
leanfm.ops.distill), optionally plus the relative MSE of the final hidden states. The last `holdout`
fraction of the calibration samples is never trained on: the KL(teacher || student) per token on those
samples, before and after, is the quality the distillation recovered.

What trains (`trainable`): "float" = every floating-point parameter except the embedding and LM head
(factors of LowRankLinear, remaining float linears, norms), "linear" = weights and biases of linear
layers, "lowrank" = LowRankLinear factors only, "norms" = normalization weights only. Quantized layers
(QuantLinear & co: integer buffers) are always frozen. The step's include/exclude patterns and
skip-overrides narrow the trainable modules further (default: the decoder layers and the final norm).

Logits are computed for `logits_chunk` tokens at a time: the loss of each slice is backpropagated to
the final hidden states at once, so (tokens, vocab) logits (262k wide for Gemma 3) never exist whole.
Cost per training token: a teacher forward, a student forward and backward, and three (vocab x hidden)
products for the logits; with a 262k vocabulary the logits dominate (~1 GFLOP per token for
gemma-3-270m, whose decoder layers cost ~0.6), so budget steps * batch_size * seq_len accordingly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, ConfigError, MethodConfig, register
from leanfm.models.blocks import RMSNorm
from leanfm.models.lowrank_layers import LowRankLinear
from leanfm.ops.distill import DISTILL_LOSSES, distill_loss

__all__ = ["DistillConfig", "apply_distill", "heldout_kl", "trainable_parameters"]

TRAINABLE = ("float", "linear", "lowrank", "norms")


@dataclass(frozen=True)
class DistillConfig(MethodConfig):
    method = "distill"
    needs_calibration = True
    needs_teacher = True
    default_include = ("model.layers.*", "model.norm")

    steps: int = 200
    lr: float = 5e-5  # gemma-3-270m, 2 layers removed: 30 steps x 128 tokens recovered 55% of the lost ppl
    batch_size: int = 4
    seq_len: int | None = None  # tokens per training sequence; None = the calibration samples' length
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    hidden_weight: float = 0.0  # weight of ||h_s - h_t||^2 / ||h_t||^2 on the final hidden states (0: off)
    trainable: str = "float"  # float | linear | lowrank | norms
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    warmup_steps: int = 10  # linear warm-up, then cosine decay to lr / 10
    holdout: float = 0.1  # fraction of calibration samples held out to measure KL before/after
    logits_chunk: int = 128  # tokens per logits slice

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                self._fail(f"{name} must be an integer >= {0 if allow_zero else 1}, got {v!r}")

        for name in ("steps", "batch_size", "logits_chunk"):
            positive_int(name)
        positive_int("warmup_steps", allow_zero=True)
        if self.seq_len is not None:
            positive_int("seq_len")
            if self.seq_len < 2:
                self._fail(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        if self.loss not in DISTILL_LOSSES:
            self._fail(f"loss must be one of {DISTILL_LOSSES}, got {self.loss!r}")
        if self.trainable not in TRAINABLE:
            self._fail(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not self.lr > 0:
            self._fail(f"lr must be positive (e.g. 1e-4), got {self.lr}")
        if not self.temperature > 0:
            self._fail(f"temperature must be positive (1.0 = the plain distributions), got {self.temperature}")
        if self.hidden_weight < 0 or self.weight_decay < 0:
            self._fail("hidden_weight and weight_decay must be >= 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            self._fail(f"grad_clip must be positive or null (no clipping), got {self.grad_clip}")
        if not 0 <= self.holdout < 1:
            self._fail(f"holdout must be in [0, 1) (fraction of calibration samples held out), got {self.holdout}")


# --- what trains ---------------------------------------------------------------------------------------
def _is_quantized(module: nn.Module) -> bool:
    """Packed/quantized layers hold integer buffers (codes); their parameters (biases) stay frozen."""
    return any(not b.is_floating_point() for b in module.buffers(recurse=False))


def _wanted(module: nn.Module, mode: str) -> bool:
    if mode == "float":
        return True
    if mode == "lowrank":
        return isinstance(module, LowRankLinear)
    if mode == "norms":
        return isinstance(module, (RMSNorm, nn.LayerNorm))
    return isinstance(module, (nn.Linear, LowRankLinear))  # "linear"


def trainable_parameters(model: nn.Module, ctx: CompressContext, mode: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything `mode` trains among the step's selected modules (never the
    embedding, the LM head or quantized layers)."""
    frozen = {id(p) for p in model.model.embed_tokens.parameters()} | {id(p) for p in model.lm_head.parameters()}
    out, seen = [], set()
    for mname, module in model.named_modules():
        if _is_quantized(module) or not _wanted(module, mode):
            continue
        if not (ctx.selected(mname, module) and ctx.config_for(mname) is not None):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and id(p) not in frozen and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{mname}.{pname}", p))
    return out


# --- losses --------------------------------------------------------------------------------------------
def _chunked_logit_loss(student: nn.Module, teacher: nn.Module, h_s: Tensor, h_t: Tensor, kind: str,
                        temperature: float, chunk: int) -> tuple[Tensor, float]:
    """Mean per-token distillation loss of hidden states h_s (student, with grad) vs h_t, computed
    `chunk` tokens at a time. Returns (d loss / d h_s, loss): each slice is backpropagated to a detached
    copy of h_s at once, so only one slice's logits exist at a time."""
    leaf = h_s.detach().reshape(-1, h_s.shape[-1]).requires_grad_()
    flat_t = h_t.reshape(-1, h_t.shape[-1])
    n, total = leaf.shape[0], 0.0
    for i in range(0, n, chunk):
        with torch.no_grad():
            t_logits = teacher.compute_logits(flat_t[i:i + chunk])
        loss = distill_loss(student.compute_logits(leaf[i:i + chunk]), t_logits, kind, temperature) / n
        loss.backward()
        total += loss.detach().item()
    return leaf.grad.reshape(h_s.shape), total


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher: nn.Module, tokens: Tensor, batch_size: int = 4,
               chunk: int = 128) -> float:
    """Mean KL(teacher || student) per token (nats, temperature 1) on token ids (n, T)."""
    positions = torch.arange(tokens.shape[1])
    total = 0.0
    for batch in tokens.split(batch_size):
        hs = student(batch, positions).reshape(-1, student.config.hidden_size)
        ht = teacher(batch, positions).reshape(-1, teacher.config.hidden_size)
        for i in range(0, hs.shape[0], chunk):
            total += float(distill_loss(student.compute_logits(hs[i:i + chunk]),
                                        teacher.compute_logits(ht[i:i + chunk])))
    return total / tokens.numel()


# --- training ------------------------------------------------------------------------------------------
def _batches(tokens: Tensor, cfg: DistillConfig, seed: int):
    """Endless (batch_size, seq_len) batches: samples in a seeded random order (an epoch at a time),
    each cut at a random offset when seq_len is shorter than the samples. When every sample starts
    with the same token (a BOS), each cut keeps it in front."""
    g = torch.Generator().manual_seed(seed)
    n, length = tokens.shape
    seq = cfg.seq_len or length
    keep = int(seq < length and n > 1 and bool((tokens[:, 0] == tokens[0, 0]).all()))
    order: list[int] = []
    while True:
        rows = []
        for _ in range(cfg.batch_size):
            if not order:
                order = torch.randperm(n, generator=g).tolist()
            rows.append(order.pop())
        starts = torch.randint(keep, length - seq + keep + 1, (len(rows),), generator=g).tolist()
        yield torch.stack([torch.cat([tokens[r, :keep], tokens[r, s:s + seq - keep]])
                           for r, s in zip(rows, starts, strict=True)])


def _schedule(cfg: DistillConfig):
    warm = min(cfg.warmup_steps, cfg.steps - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _split(tokens: Tensor, cfg: DistillConfig) -> tuple[Tensor, Tensor | None]:
    n = tokens.shape[0]
    if cfg.holdout == 0:
        return tokens, None
    n_hold = max(1, round(cfg.holdout * n))
    if n - n_hold < 1:
        raise ConfigError(f"distill: {n} calibration sample(s) leave none to train on after holding out "
                          f"{n_hold}; pass more samples or set holdout: 0")
    return tokens[:n - n_hold], tokens[n - n_hold:]


def _check(model: nn.Module, teacher: nn.Module | None, tokens: Tensor, cfg: DistillConfig) -> nn.Module:
    if teacher is None or teacher is model:
        raise ConfigError("distill needs a teacher model distinct from the student (compress_ keeps a copy "
                          "of the model before the first step when a step needs one)")
    if teacher.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"distill: teacher vocabulary {teacher.config.vocab_size} != student "
                          f"{model.config.vocab_size}")
    if cfg.seq_len is not None and cfg.seq_len > tokens.shape[1]:
        raise ConfigError(f"distill: seq_len {cfg.seq_len} exceeds the calibration samples' length "
                          f"{tokens.shape[1]}; lower seq_len or draw longer samples")
    return teacher


@register(DistillConfig)
def apply_distill(model: nn.Module, config: DistillConfig, ctx: CompressContext) -> dict:
    tokens = ctx.require_calibration()
    teacher = _check(model, ctx.teacher, tokens, config).eval()
    train, held = _split(tokens, config)
    params = trainable_parameters(model, ctx, config.trainable)
    if not params:
        raise ConfigError(f"distill: nothing to train with trainable={config.trainable!r} among the selected "
                          "modules; choose another trainable option or widen include")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    kl_before = heldout_kl(model, teacher, held, config.batch_size, config.logits_chunk) if held is not None \
        else None
    losses = []
    try:
        model.requires_grad_(False)
        for _, p in params:
            p.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            losses = _train(model, teacher, train, [p for _, p in params], config, ctx)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), p.requires_grad))
            p.grad = None
    kl_after = heldout_kl(model, teacher, held, config.batch_size, config.logits_chunk) if held is not None \
        else None
    k = max(1, min(10, len(losses) // 10))
    summary = {"steps": config.steps, "loss": config.loss, "trainable": config.trainable,
               "trainable_params": sum(p.numel() for _, p in params),
               "train_samples": int(train.shape[0]), "heldout_samples": 0 if held is None else int(held.shape[0]),
               "loss_first": round(sum(losses[:k]) / k, 5), "loss_last": round(sum(losses[-k:]) / k, 5),
               "kl_before": kl_before, "kl_after": kl_after}
    if kl_before:
        summary["kl_recovered"] = round(1 - kl_after / kl_before, 4)
    return summary


def _train(model: nn.Module, teacher: nn.Module, tokens: Tensor, params: list[nn.Parameter],
           cfg: DistillConfig, ctx: CompressContext) -> list[float]:
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    batches = _batches(tokens, cfg, ctx.seed)
    losses = []
    bar = ctx.bar(range(cfg.steps), f"distill[{cfg.loss}]")
    for _ in bar:
        ids = next(batches)
        positions = torch.arange(ids.shape[1])
        with torch.no_grad():
            h_t = teacher(ids, positions)
        h_s = model(ids, positions)
        grad, loss = _chunked_logit_loss(model, teacher, h_s, h_t, cfg.loss, cfg.temperature, cfg.logits_chunk)
        surrogate = (h_s * grad).sum()  # backpropagates the logits loss through the model
        if cfg.hidden_weight:
            hidden = (h_s - h_t).pow(2).sum() / h_t.pow(2).sum().clamp_min(1e-12)
            surrogate = surrogate + cfg.hidden_weight * hidden
            loss += cfg.hidden_weight * hidden.detach().item()
        surrogate.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
    return losses
