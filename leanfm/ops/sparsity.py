"""Sparsity masks and the compressed N:M storage format: pure tensor functions.

A mask is a bool tensor shaped like the weight, True where the weight is KEPT. Every selection prunes
the lowest scores; among equal scores the lower index is pruned first (a stable sort), so a mask is a
deterministic function of its scores.

    keep = unstructured_mask(scores, 0.5, per_row=True)   # exactly round(0.5 * K) False per row
    keep = nm_mask(scores, 2, 4)                          # exactly 2 True in every 4 consecutive inputs
    mask_stats(keep) -> {"numel", "kept", "pruned", "sparsity"}

N:M storage (what SparseLinear keeps): for W [N, K] with at most n nonzeros in every group of m
consecutive inputs, `values` [N, K*n/m] holds n entries per group (in increasing input order) and
`indices` [N, K*n/m] (uint8) their positions inside the group; a group with fewer than n nonzeros pads
with zero values. For m = 4 the indices pack four to a byte, 2 bits each, lowest bits first
(`pack_indices_2bit`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_nm", "is_nm_sparse", "mask_stats", "nm_compress", "nm_decompress", "nm_group_counts", "nm_mask",
    "pack_indices_2bit", "parse_pattern", "prune_lowest", "unpack_indices_2bit", "unstructured_mask",
    "wanda_scores",
]


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" (e.g. "2:4", "4:8") -> (n, m) with 1 <= n < m <= 256.
    Raises ValueError saying what a valid pattern looks like."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"sparsity pattern {pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4', '4:8')")
    n, m = int(parts[0]), int(parts[1])
    if not 1 <= n < m or m > 256:
        raise ValueError(f"pattern {pattern!r}: N:M needs 1 <= N < M <= 256 (keep N of every M weights)")
    return n, m


def prune_lowest(scores: Tensor, k: int | Tensor, per_row: bool) -> Tensor:
    """Keep-mask pruning the k lowest scores of each row (per_row) or of the whole tensor.
    Ties: the lower (flattened) index is pruned first."""
    flat = scores if per_row else scores.reshape(1, -1)
    k, width = int(k), flat.shape[-1]
    if k <= 0 or k >= width:
        return torch.full(scores.shape, k <= 0, dtype=torch.bool, device=scores.device)
    if width <= 64:  # short rows (N:M groups): a stable sort is cheapest
        keep = torch.ones(flat.shape, dtype=torch.bool, device=scores.device)
        keep.scatter_(-1, torch.sort(flat, dim=-1, stable=True).indices[..., :k], False)
        return keep.reshape(scores.shape)
    # long rows: the k-th smallest value (linear time), then ties at it pruned in index order
    thresh = flat.kthvalue(k, dim=-1, keepdim=True).values
    below, tie = flat < thresh, flat == thresh
    need = k - below.sum(-1, keepdim=True)
    prune = below | (tie & (tie.cumsum(-1) <= need))
    return (~prune).reshape(scores.shape)


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool = True) -> Tensor:
    """Keep-mask with exactly round(sparsity * K) pruned entries in every row of scores [..., K]
    (per_row), or round(sparsity * numel) in the whole tensor."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    size = scores.shape[-1] if per_row else scores.numel()
    return prune_lowest(scores, round(sparsity * size), per_row)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask keeping the n largest of every m consecutive entries along the last dim (K % m == 0)."""
    k = scores.shape[-1]
    if k % m:
        raise ValueError(f"N:M needs the input width ({k}) to be a multiple of M={m}")
    groups = scores.reshape(*scores.shape[:-1], k // m, m)
    return prune_lowest(groups, m - n, per_row=True).reshape(scores.shape)


def wanda_scores(w: Tensor, act_norm: Tensor) -> Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2: w [N, K], act_norm [K] (L2 norm of input feature j)."""
    return w.abs().float() * act_norm.float().reshape(1, -1)


def mask_stats(mask: Tensor) -> dict[str, float | int]:
    """{"numel", "kept", "pruned", "sparsity"} of a keep-mask (or of a weight: nonzero = kept)."""
    kept = int(mask.count_nonzero())
    numel = mask.numel()
    return {"numel": numel, "kept": kept, "pruned": numel - kept, "sparsity": (numel - kept) / max(numel, 1)}


def nm_group_counts(mask: Tensor, m: int) -> Tensor:
    """Kept (nonzero) entries per group of m consecutive inputs: [..., K // m]."""
    k = mask.shape[-1]
    if k % m:
        raise ValueError(f"width {k} is not a multiple of M={m}")
    return (mask != 0).reshape(*mask.shape[:-1], k // m, m).sum(-1)


def check_nm(mask: Tensor, n: int, m: int, exact: bool = True) -> bool:
    """True when every group of m keeps exactly n (exact) or at most n entries."""
    counts = nm_group_counts(mask, m)
    return bool((counts == n).all() if exact else (counts <= n).all())


def is_nm_sparse(w: Tensor, n: int, m: int) -> bool:
    """True when w [..., K] has at most n nonzeros in every group of m consecutive inputs."""
    return w.shape[-1] % m == 0 and check_nm(w, n, m, exact=False)


def nm_compress(w: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """(values [N, K*n/m], indices uint8 [N, K*n/m]) of an N:M-sparse w [N, K] (see module docstring)."""
    rows, k = w.shape
    if not is_nm_sparse(w, n, m):
        raise ValueError(f"weight is not {n}:{m} sparse (more than {n} nonzeros in a group of {m}, "
                         f"or width {k} not a multiple of {m})")
    groups = w.reshape(rows, k // m, m)
    # nonzeros first (in input order), then zero slots as padding; keep the first n, then sort by position
    order = torch.sort((groups == 0).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    idx = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, idx)
    return values.reshape(rows, -1).contiguous(), idx.to(torch.uint8).reshape(rows, -1).contiguous()


def nm_decompress(values: Tensor, indices: Tensor, n: int, m: int, k: int) -> Tensor:
    """The dense [N, K] weight of nm_compress' output (indices unpacked uint8)."""
    rows = values.shape[0]
    dense = torch.zeros(rows, k // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, indices.reshape(rows, k // m, n).long(), values.reshape(rows, k // m, n))
    return dense.reshape(rows, k)


def pack_indices_2bit(idx: Tensor) -> Tensor:
    """uint8 [N, L] with values < 4 -> [N, ceil(L / 4)] bytes, entry j in bits 2*(j%4).. of byte j//4."""
    rows, length = idx.shape
    pad = (-length) % 4
    if pad:
        idx = torch.cat([idx, idx.new_zeros(rows, pad)], dim=1)
    g = idx.to(torch.uint8).reshape(rows, -1, 4)
    return (g[..., 0] | (g[..., 1] << 2) | (g[..., 2] << 4) | (g[..., 3] << 6)).contiguous()


def unpack_indices_2bit(packed: Tensor, length: int) -> Tensor:
    """Inverse of pack_indices_2bit: uint8 [N, L]."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    out = (packed.unsqueeze(-1) >> shifts) & 3
    return out.reshape(packed.shape[0], -1)[:, :length]
