"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight reconstruction.

For a layer with inputs X and H = X^T X / tokens, the columns are processed left to right in blocks of
`block_size`. With U the upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, each block picks
its mask from the *current* (already updated) weights by the OBS saliency w^2 / U_jj^2 (adaptive mask
selection), then zeroes its pruned weights one column at a time, spreading each column's error onto
the columns to its right: W[:, j:] -= (w_j - q_j) / U_jj * U[j, j:]. N:M patterns choose each group of
M columns' mask when the sweep reaches it.

Unstructured masks are exact over the matrix: block b prunes round(s * rows * end_b) minus what the
blocks before it pruned, and within a block the lowest saliencies are taken over all its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, ConfigError, register
from leanfm.compress.prune.common import (
    Hessian,
    InputStats,
    PruneConfig,
    PruneTally,
    calibrated_layers,
    layer_of,
)
from leanfm.ops.sparsity import nm_mask, prune_lowest

__all__ = ["SparseGPTConfig", "apply_sparsegpt", "sparsegpt_prune"]


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """block_size: columns per lazy-update block (a multiple of M for N:M). damp: added to H's diagonal,
    as a fraction of its mean."""

    method = "sparsegpt"
    needs_calibration = True

    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            self._fail(f"block_size must be a positive integer, got {self.block_size!r}")
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            self._fail(f"block_size {self.block_size} must be a multiple of M={nm[1]} for pattern {self.pattern}")
        if not isinstance(self.damp, int | float) or not 0.0 <= self.damp < 1.0:
            self._fail(f"damp must be in [0, 1) (a fraction of the Hessian's mean diagonal), got {self.damp!r}")

    def check_module(self, name: str, module: nn.Module) -> None:
        super().check_module(name, module)
        layer_of(name)


def _inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor U of h^-1 (h^-1 = U^T U)."""
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item():
        raise ValueError("the damped Hessian is not positive definite; increase damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def sparsegpt_prune(w: Tensor, h: Tensor, sparsity: float = 0.5, n: int | None = None, m: int | None = None,
                    block_size: int = 128, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """Prune w [N, K] given the input Hessian h [K, K]; returns (new weight in w's dtype, keep-mask).

    Unstructured (n = m = None): exactly round(sparsity * numel) weights are zeroed; with n:m every group
    of m consecutive inputs keeps exactly n. The kept weights are updated to reconstruct w @ X^T.
    """
    nm = (n, m) if n is not None else None
    W = w.detach().float().clone()
    rows, cols = W.shape
    H = h.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = _inverse_cholesky_upper(H)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    pruned = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if nm is None:
            count = min(round(sparsity * rows * i2) - pruned, W1.numel())
            mask1 = prune_lowest(W1.pow(2) / d.pow(2), count, per_row=False)
            pruned += count
        else:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                mask1[:, j] = nm_mask(W1[:, j].pow(2) / d[j].pow(2), *nm)
            col = W1[:, i]
            q = col * mask1[:, i]
            err = (col - q) / d[i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            Q1[:, i], E1[:, i] = q, err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = mask1
        W[:, i2:].sub_(E1 @ U[i1:i2, i2:])
    return W.to(w.dtype), keep


@register(SparseGPTConfig)
def apply_sparsegpt(model: nn.Module, config: SparseGPTConfig, ctx: CompressContext) -> dict:
    tally = PruneTally()
    for step, targets in calibrated_layers(model, ctx, "sparsegpt"):
        stats = InputStats(Hessian)
        step.feed(stats.hooks([sub for sub, *_ in targets]))
        stats.done()
        for sub, name, module, cfg in targets:
            nm = cfg.nm or (None, None)
            try:
                new, keep = sparsegpt_prune(module.weight, stats[sub].mean(), cfg.sparsity, *nm, cfg.block_size,
                                            cfg.damp)
            except ValueError as e:
                raise ConfigError(f"sparsegpt: {name}: {e}") from None
            module.weight.data.copy_(new)
            tally.add(name, keep, cfg)
    return tally.summary(model, config)
