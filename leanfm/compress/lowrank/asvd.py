"""Activation-aware low-rank factorization: ASVD and SVD-LLM's truncation-aware whitening.

    compress_(model, ASVDConfig(param_ratio=0.6), calibration=tokens)                    # ASVD
    compress_(model, ASVDConfig(param_ratio=0.6, variant="whiten"), calibration=tokens)  # SVD-LLM

Plain SVD keeps the directions of largest *weight* energy; what matters is the layer's *output* on real
inputs. Both variants look at the calibration activations X each layer sees:

- "asvd" (Yuan et al. 2023): scale input channel j by s_j = mean|x_j|^alpha before the SVD and undo it
  on the A factor, so channels with large activations are truncated less.
- "whiten" (SVD-LLM, Wang et al. 2024): factor W S with S the Cholesky factor of X^T X, which makes the
  truncation minimise ||X W^T - X (B A)^T|| exactly (leanfm.ops.lowrank.whitened_svd_factors).

Statistics come from a layer-by-layer walk (leanfm.compress.calibrate), so each layer calibrates on the
inputs produced by the already-factored layers before it. Rank options as in SVDConfig (with `energy`,
the energy of the scaled / whitened spectrum is what is kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from leanfm.compress.api import CompressContext, ConfigError, register
from leanfm.compress.calibrate import LayerwiseCalibration
from leanfm.compress.lowrank.svd import LowRankConfig, LowRankTally
from leanfm.ops.lowrank import asvd_factors, whitened_svd_factors

__all__ = ["ASVDConfig", "apply_asvd"]

VARIANTS = ("asvd", "whiten")


@dataclass(frozen=True)
class ASVDConfig(LowRankConfig):
    method = "asvd"
    needs_calibration = True

    variant: str = "asvd"  # "asvd": activation-scaled SVD; "whiten": SVD-LLM's whitening
    alpha: float = 0.5  # ASVD's scaling exponent s = mean|x|^alpha (0 = plain SVD)
    damp: float = 1e-5  # whitening: X^T X + damp * mean(diag) I before the Cholesky factorization

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            self._fail(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0 <= self.alpha <= 1:
            self._fail(f"alpha must be in [0, 1] (0.5 in the ASVD paper), got {self.alpha}")
        if not 0 <= self.damp < 1:
            self._fail(f"damp must be in [0, 1) (a small relative damping such as 1e-5), got {self.damp}")


class _Stats:
    """Running per-module input statistics: sum |x| per channel (asvd) or X^T X (whiten), in float64.

    Modules fed the very same input (q/k/v, gate/up) share one computation through `memo`: it holds
    the last input seen with its statistic, and keeps that tensor alive so its address cannot be reused."""

    def __init__(self, whiten: bool, memo: dict):
        self.whiten, self.memo, self.total, self.n = whiten, memo, None, 0

    def _part(self, x: Tensor) -> Tensor:
        last = self.memo.get(self.whiten)
        if last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape:
            return last[1]
        xf = x.detach().float()
        part = (xf.T @ xf if self.whiten else xf.abs().sum(0)).double()  # fp32 per sample, summed in fp64
        self.memo[self.whiten] = (x, part)
        return part

    def __call__(self, x: Tensor) -> None:
        part = self._part(x)
        self.total = part.clone() if self.total is None else self.total + part
        self.n += x.shape[0]

    def mean(self) -> Tensor:
        return self.total / max(self.n, 1)


def _factorize(module: nn.Linear, cfg: ASVDConfig, stats: _Stats) -> tuple[Tensor, Tensor]:
    rule = cfg.rank_rule(*module.weight.shape)
    if cfg.variant == "whiten":
        return whitened_svd_factors(module.weight, stats.mean(), rule, cfg.damp)
    return asvd_factors(module.weight, stats.mean(), rule, cfg.alpha)


def _group_by_step(targets: list, n_layers: int) -> tuple[dict[str, list], list[str]]:
    """{step prefix: [(relative name, full name, module, cfg)]} for targets in a decoder layer or the LM
    head ("" prefix), and the names of targets the layer walk cannot reach."""
    groups: dict[str, list] = {}
    unreachable = []
    prefixes = [f"model.layers.{i}." for i in range(n_layers)]
    for name, module, cfg in targets:
        if name == "lm_head":
            groups.setdefault("", []).append(("lm_head", name, module, cfg))
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            unreachable.append(name)
        else:
            groups.setdefault(prefix[:-1], []).append((name[len(prefix):], name, module, cfg))
    return groups, unreachable


@register(ASVDConfig)
def apply_asvd(model: nn.Module, config: ASVDConfig, ctx: CompressContext) -> dict:
    tokens = ctx.require_calibration()
    grouped, unreachable = _group_by_step(ctx.targets(), len(model.model.layers))
    if unreachable:
        raise ConfigError(f"asvd calibrates decoder layers and lm_head only; exclude {unreachable} or use svd")
    tally = LowRankTally()
    groups: dict[str, list] = {}
    for prefix, items in grouped.items():
        for rel, name, module, cfg in items:  # tied head / ranks that save nothing: no statistics needed
            reason = tally.skip_reason(model, name, module, cfg)
            if reason is None:
                groups.setdefault(prefix, []).append((rel, name, module, cfg))
            else:
                tally.keep_dense(name, module, reason)
    remaining = set(groups)
    walk = LayerwiseCalibration(model, tokens, include_head="" in groups)
    bar = ctx.bar(range(walk.n_layers + int("" in groups)), f"asvd[{config.variant}]")
    for step in walk:
        items = groups.get(step.prefix, [])
        if items:
            memo: dict = {}
            stats = {rel: _Stats(cfg.variant == "whiten", memo) for rel, _, _, cfg in items}
            hooks: dict[str, Callable[[Tensor], None]] = dict(stats)
            step.feed(hooks)
            memo.clear()
            for rel, name, module, cfg in items:
                tally.replace(model, name, module, *_factorize(module, cfg, stats[rel]))
            remaining.discard(step.prefix)
        bar.update(1)
        if not remaining:
            break  # later layers hold no targets: no need to walk them
    bar.close()
    return {"variant": config.variant, **tally.summary(), "calibration_samples": int(tokens.shape[0]),
            "calibration_tokens": int(tokens.numel())}
