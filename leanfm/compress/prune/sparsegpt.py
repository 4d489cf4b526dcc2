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

__all__ = ["SparseGPTConfig", "apply_sparsegpt", "prepare_hessian", "sparsegpt_prune"]


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


def prepare_hessian(h: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(U, dead) for a Hessian h [K, K]: U the upper Cholesky factor of (h + damp * mean(diag) I)^-1, with
    inputs that never fire (`dead`, zero diagonal) set to identity rows first. Shareable by every layer
    fed the same inputs (q/k/v, gate/up)."""
    H = h.detach().float().clone()
    dead = H.diagonal() == 0  # inputs that never fire: their weights do not matter
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(H)
    if info.item():
        raise ValueError("the damped Hessian is not positive definite; increase damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), dead


def sparsegpt_prune(w: Tensor, h: Tensor | None, sparsity: float = 0.5, n: int | None = None, m: int | None = None,
                    block_size: int = 128, damp: float = 0.01,
                    prepared: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Prune w [N, K] given the input Hessian h [K, K]; returns (new weight in w's dtype, keep-mask).

    Unstructured (n = m = None): exactly round(sparsity * numel) weights are zeroed; with n:m every group
    of m consecutive inputs keeps exactly n. The kept weights are updated to reconstruct w @ X^T.
    prepared: prepare_hessian(h, damp), when already computed (h is then not read).
    """
    U, dead = prepared if prepared is not None else prepare_hessian(h, damp)
    rows, cols = w.shape
    # the sweep runs on W^T (columns of W contiguous): each step is one rank-1 update (BLAS ger)
    Wt = w.detach().float().T.contiguous()
    Wt[dead] = 0.0
    keep_t = torch.ones(cols, rows, dtype=torch.bool)
    pruned = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        B, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        Q, E = torch.zeros_like(B), torch.zeros_like(B)
        mask = keep_t[i1:i2]
        if n is None:  # adaptive: this block's mask from its current weights, ties in W's index order
            count = min(round(sparsity * rows * i2) - pruned, B.numel())
            mask.copy_(prune_lowest((B.pow(2) / d.pow(2).unsqueeze(1)).T, count, per_row=False).T)
            pruned += count
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                j = slice(i, i + m)
                mask[j] = nm_mask((B[j].pow(2) / d[j].pow(2).unsqueeze(1)).T, n, m).T
            col = B[i]
            q = col * mask[i]
            err = (col - q) / d[i]
            B[i:].addr_(U1[i, i:], err, alpha=-1.0)
            Q[i], E[i] = q, err
        Wt[i1:i2] = Q
        Wt[i2:].sub_(U[i1:i2, i2:].T @ E)
    return Wt.T.to(w.dtype).contiguous(), keep_t.T.contiguous()


@register(SparseGPTConfig)
def apply_sparsegpt(model: nn.Module, config: SparseGPTConfig, ctx: CompressContext) -> dict:
    tally = PruneTally()
    for step, targets in calibrated_layers(model, ctx, "sparsegpt"):
        stats = InputStats(Hessian)
        step.feed(stats.hooks([sub for sub, *_ in targets]))
        stats.done()
        prepared: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}  # shared inputs -> one factorization
        for sub, name, module, cfg in targets:
            nm = cfg.nm or (None, None)
            acc = stats[sub]
            try:
                key = (id(acc), cfg.damp)
                if key not in prepared:
                    prepared[key] = prepare_hessian(acc.mean(), cfg.damp)
                new, keep = sparsegpt_prune(module.weight, None, cfg.sparsity, *nm, cfg.block_size, cfg.damp,
                                            prepared=prepared[key])
            except ValueError as e:
                raise ConfigError(f"sparsegpt: {name}: {e}") from None
            module.weight.data.copy_(new)
            tally.add(name, keep, cfg)
    return tally.summary(model, config)
