"""Low-rank factorization numerics: pure functions, no module state.

A weight W [out, in] is replaced by two factors, W ~= B @ A with B [out, r] and A [r, in], so a linear
layer costs r * (in + out) parameters instead of in * out. Three ways to choose the factors:

- Plain SVD (`svd_factors`): the rank-r truncation of W, optimal in ||W - B A||_F (Eckart-Young).
- ASVD (`asvd_factors`, Yuan et al. 2023): channels with large activations matter more, so factor
  W diag(s) with s_j = mean|x_j|^alpha and undo the scaling on A: A = A' diag(1/s).
- SVD-LLM's truncation-aware whitening (`whitened_svd_factors`, Wang et al. 2024): with the Cholesky
  factor S of X^T X (X^T X = S S^T), ||X W^T - X (BA)^T||_F = ||(W - BA) S||_F, so the rank-r truncation
  of W S followed by A = A' S^{-1} minimises the layer's *output* error on the calibration inputs X.

The decompositions run in float64 (singular values of real layers span many orders of magnitude) and the
factors come back in W's dtype. The singular values are split evenly between the factors
(B = U sqrt(sigma), A = sqrt(sigma) V^T), which keeps both on the same scale for later training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "Rank", "asvd_factors", "asvd_scales", "cholesky_damped", "factor_params", "rank_for_budget",
    "rank_for_energy",
    "saves_parameters", "svd_factors", "whitened_svd_factors",
]

_MIN_SCALE = 1e-6  # relative floor of ASVD's channel scales (dead channels would divide by zero)


def factor_params(out_features: int, in_features: int, rank: int) -> int:
    """Parameters of the two factors (bias not included)."""
    return rank * (out_features + in_features)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank-`rank` factors hold fewer parameters than the dense weight."""
    return 0 < rank and factor_params(out_features, in_features, rank) < out_features * in_features


def rank_for_budget(out_features: int, in_features: int, param_fraction: float) -> int:
    """The largest rank whose factors keep at most `param_fraction` of the dense weight's parameters
    (at least 1, at most min(out, in))."""
    if not 0 < param_fraction:
        raise ValueError(f"param_fraction must be positive, got {param_fraction}")
    r = math.floor(param_fraction * out_features * in_features / (out_features + in_features) + 1e-9)
    return max(1, min(r, out_features, in_features))


def rank_for_energy(singular_values: Tensor, threshold: float) -> int:
    """The smallest rank r whose leading singular values keep a fraction >= `threshold` of the spectral
    energy sum(sigma^2) (threshold in (0, 1]; at least 1)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"energy threshold must be in (0, 1], got {threshold}")
    e = singular_values.double().pow(2)
    total = e.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(kept, torch.tensor([threshold - 1e-12], dtype=kept.dtype)).item()) + 1
    return max(1, min(r, singular_values.numel()))


Rank = int | Callable[[Tensor], int]
"""A rank, or a rule choosing it from the singular values (float64, descending) of the matrix that is
truncated, e.g. `lambda s: rank_for_energy(s, 0.9)`; the decomposition then runs only once."""


def _truncated(m: Tensor, rank: Rank) -> tuple[Tensor, Tensor]:
    """(B, A) of the rank-`rank` SVD truncation of the float64 matrix m, singular values split evenly.

    Through the eigendecomposition of the smaller Gram matrix (m^T m or m m^T) in float64: 4-6x faster
    than a full SVD on a CPU, and its singular values are accurate to ~1e-8 of the largest (float64
    eigenvalues to 1e-16 of sigma_max^2), well below float32 weights' own precision. B A is m projected
    on its top-r singular subspace, exactly m at full rank."""
    tall = m.shape[0] >= m.shape[1]
    evals, vecs = torch.linalg.eigh(m.T @ m if tall else m @ m.T)
    s = evals.flip(0).clamp_min(0).sqrt()  # descending singular values
    if callable(rank):
        rank = rank(s)
    if not 1 <= rank <= min(m.shape):
        raise ValueError(f"rank must be in [1, {min(m.shape)}] for a {tuple(m.shape)} matrix, got {rank}")
    vecs = vecs.flip(1)[:, :rank]  # right (tall) or left (wide) singular vectors
    root = s[:rank].sqrt()
    inv_root = 1 / root.clamp_min(float(s[0]) * 1e-12 + 1e-300)  # zero directions: (m v) is ~0 anyway
    if tall:
        return (m @ vecs) * inv_root, root[:, None] * vecs.T
    return vecs * root, inv_root[:, None] * (vecs.T @ m)


def svd_factors(w: Tensor, rank: Rank) -> tuple[Tensor, Tensor]:
    """(B [out, r], A [r, in]): the rank-r truncated SVD of w, B @ A minimising ||w - B A||_F."""
    b, a = _truncated(w.detach().double(), rank)
    return b.to(w.dtype), a.to(w.dtype)


def asvd_scales(act_scale: Tensor, alpha: float = 0.5) -> Tensor:
    """ASVD's per-input-channel scales s = act_scale^alpha, floored relative to their max (float64)."""
    s = act_scale.detach().double().clamp_min(0).pow(alpha)
    floor = max(float(s.max()) * _MIN_SCALE, 1e-30)
    return s.clamp_min(floor)


def asvd_factors(w: Tensor, act_scale: Tensor, rank: Rank, alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """ASVD: (B, A) from the SVD of w diag(s), s = act_scale^alpha (act_scale: mean |x| per input channel,
    [in]), then A = A' diag(1/s). alpha = 0 is plain SVD."""
    if act_scale.shape != (w.shape[1],):
        raise ValueError(f"act_scale must have shape ({w.shape[1]},), got {tuple(act_scale.shape)}")
    s = asvd_scales(act_scale, alpha)
    b, a = _truncated(w.detach().double() * s, rank)
    return b.to(w.dtype), (a / s).to(w.dtype)


def cholesky_damped(xtx: Tensor, damp: float = 1e-5, max_tries: int = 8) -> Tensor:
    """Lower Cholesky factor S of (xtx + lambda I) in float64, S S^T = xtx + lambda I, lambda = damp *
    mean(diag(xtx)); lambda grows 10x per failed attempt (rank-deficient X^T X, dead channels)."""
    h = xtx.detach().double()
    h = (h + h.T) / 2
    mean_diag = float(h.diagonal().mean())
    base = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * base
    for _ in range(max_tries):
        s, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return s
        lam = max(lam * 10, 1e-12 * base)
    raise ValueError(f"X^T X is not positive definite even with damping {lam:.3g}; check the calibration "
                     "inputs for NaN or infinite values")


def whitened_svd_factors(w: Tensor, xtx: Tensor, rank: Rank, damp: float = 1e-5) -> tuple[Tensor, Tensor]:
    """SVD-LLM: (B, A) minimising ||X w^T - X (B A)^T||_F given xtx = X^T X [in, in] (any positive scale).

    S = chol(xtx + damping) (lower); (B, A') = rank-r SVD truncation of w S; A = A' S^{-1}."""
    k = w.shape[1]
    if xtx.shape != (k, k):
        raise ValueError(f"xtx must have shape ({k}, {k}), got {tuple(xtx.shape)}")
    s = cholesky_damped(xtx, damp)
    b, a = _truncated(w.detach().double() @ s, rank)
    # A = A' S^{-1}  <=>  A S = A'  <=>  S^T A^T = A'^T  (S lower, so S^T is upper triangular)
    a = torch.linalg.solve_triangular(s.T, a.T, upper=True).T
    return b.to(w.dtype), a.to(w.dtype)
