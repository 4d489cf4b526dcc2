"""SVD: replace linear layers by the rank-r truncation of their weight (two thin LowRankLinear factors).

    compress_(model, SVDConfig(param_ratio=0.6))   # keep 60% of each targeted layer's parameters
    compress_(model, SVDConfig(energy=0.9))        # keep 90% of each weight's spectral energy
    compress_(model, SVDConfig(rank=64))

Exactly one of `rank`, `param_ratio` or `energy` sets each layer's rank. A layer whose rank would not
save parameters (r * (in + out) >= in * out) stays dense and is listed in the summary, as is a tied LM
head (its embedding keeps the full matrix, so factoring the head saves nothing). No calibration data:
see asvd.py for the activation-aware variants, which lose less at the same parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from leanfm.compress.api import CompressContext, MethodConfig, register, set_module
from leanfm.models.lowrank_layers import LowRankLinear
from leanfm.ops.lowrank import Rank, rank_for_budget, rank_for_energy, saves_parameters, svd_factors

__all__ = ["LowRankConfig", "LowRankTally", "SVDConfig", "apply_svd"]


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Rank options shared by the low-rank methods: exactly one of rank, param_ratio, energy."""

    rank: int | None = None  # the same rank for every targeted layer (capped at min(in, out))
    param_ratio: float | None = None  # fraction of each layer's weight parameters the factors keep
    energy: float | None = None  # fraction of the spectral energy sum(sigma^2) kept

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "param_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            self._fail(f"give exactly one of rank, param_ratio or energy (got {given or 'none'}), "
                       "e.g. param_ratio: 0.5")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool)
                                      or self.rank < 1):
            self._fail(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.param_ratio is not None and not 0 < self.param_ratio < 1:
            self._fail(f"param_ratio must be in (0, 1) (the fraction of parameters kept), got {self.param_ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            self._fail(f"energy must be in (0, 1] (the fraction of spectral energy kept), got {self.energy}")

    def replace(self, **changes: Any) -> MethodConfig:
        """As MethodConfig.replace, but setting one rank option (an override's {"rank": 8}) clears the
        other two."""
        options = ("rank", "param_ratio", "energy")
        if any(changes.get(k) is not None for k in options):
            changes = {**{k: None for k in options}, **changes}
        return super().replace(**changes)

    def fixed_rank(self, out_features: int, in_features: int) -> int | None:
        """The layer's rank when it does not depend on the spectrum (rank, param_ratio), else None."""
        if self.rank is not None:
            return min(self.rank, out_features, in_features)
        if self.param_ratio is not None:
            return rank_for_budget(out_features, in_features, self.param_ratio)
        return None

    def rank_rule(self, out_features: int, in_features: int) -> Rank:
        """What the factorization functions take: the fixed rank, or a rule on the singular values."""
        fixed = self.fixed_rank(out_features, in_features)
        if fixed is not None:
            return fixed
        energy = self.energy
        return lambda s: rank_for_energy(s, energy)


class LowRankTally:
    """Builds a low-rank method's summary: parameters before/after, ranks, layers left dense and why."""

    def __init__(self) -> None:
        self.before = self.after = 0
        self.ranks: dict[str, int] = {}
        self.dense: dict[str, str] = {}

    def skip_reason(self, model: nn.Module, name: str, module: nn.Linear, config: LowRankConfig) -> str | None:
        """Why `module` stays dense before any work (tied head, rank saving nothing), else None."""
        if name == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return "tied to the input embedding (factoring the head alone saves nothing)"
        out_f, in_f = module.weight.shape
        r = config.fixed_rank(out_f, in_f)
        if r is not None and not saves_parameters(out_f, in_f, r):
            return f"rank {r} saves no parameters (needs rank < {out_f * in_f / (out_f + in_f):.1f})"
        return None

    def keep_dense(self, name: str, module: nn.Linear, reason: str) -> None:
        self.dense[name] = reason
        self.before += module.weight.numel()
        self.after += module.weight.numel()

    def replace(self, model: nn.Module, name: str, module: nn.Linear, b: Tensor, a: Tensor) -> None:
        """Swap in LowRankLinear(b, a) unless its rank saves nothing (possible with an energy rule)."""
        out_f, in_f = module.weight.shape
        rank = a.shape[0]
        if not saves_parameters(out_f, in_f, rank):
            self.keep_dense(name, module, f"rank {rank} for the energy target saves no parameters")
            return
        set_module(model, name, LowRankLinear.from_factors(b, a, module.bias))
        self.ranks[name] = rank
        self.before += module.weight.numel()
        self.after += rank * (out_f + in_f)

    def summary(self) -> dict[str, Any]:
        ranks = list(self.ranks.values())
        return {"modules": len(self.ranks), "left_dense": self.dense,
                "params_before": self.before, "params_after": self.after,
                "param_ratio": round(self.after / max(self.before, 1), 4),
                "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                "rank_mean": round(sum(ranks) / max(len(ranks), 1), 1)}


@dataclass(frozen=True)
class SVDConfig(LowRankConfig):
    method = "svd"


@register(SVDConfig)
def apply_svd(model: nn.Module, config: SVDConfig, ctx: CompressContext) -> dict:
    tally = LowRankTally()
    for name, module, cfg in ctx.bar(ctx.targets(), "svd"):
        reason = tally.skip_reason(model, name, module, cfg)
        if reason is not None:
            tally.keep_dense(name, module, reason)
            continue
        b, a = svd_factors(module.weight, cfg.rank_rule(*module.weight.shape))
        tally.replace(model, name, module, b, a)
    return tally.summary()
