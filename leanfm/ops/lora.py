"""Batched multi-LoRA deltas (the S-LoRA / Punica idea): many adapters over one base in one step.

The rows of a step (flattened tokens of several requests) each pick one adapter or none, and each row
gets its adapter's delta:

    out[rows] += s * (x[rows] A^T) B^T          A (r, in), B (out, r), s = alpha / r (rsLoRA: alpha / sqrt r)

Two ways compute it:
  * `stacked_lora_add_` (what the serving layers use): every adapter of a layer side by side, A (R, in)
    and B (out, R) with R the sum of their ranks; one GEMM x A^T for all rows, a (rows, R) mask that
    keeps each row's own adapter's columns (times its scaling) and zeroes the others, one GEMM into out.
    Three ops per layer whatever the number of adapters in the step (the extra FLOPs, rows x R x
    (in + out), are small next to the base layer's rows x in x out);
  * `segmented_lora_add_`: per adapter, gather its rows, two small GEMMs, index_add (SGMV).

Pure functions over tensors; the base layer's output `out` is whatever the base computed (dense,
quantized, sparse...): the base weights are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LoraFactors", "RowGroup", "StackedLora", "lora_rows_reference", "row_lora_ids", "rows_mask",
           "segmented_lora_add_", "stack_lora", "stacked_lora_add_"]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's factors on one linear layer: A (r, in), B (out, r), kept in float32 or the model's dtype."""

    a: Tensor
    b: Tensor
    scaling: float

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LoRA factors must be A (r, in) and B (out, r), got {tuple(self.a.shape)} and "
                             f"{tuple(self.b.shape)}")


@dataclass(frozen=True)
class RowGroup:
    """The rows of a step that use adapter `lora_id`: a contiguous range [start, stop) or an index tensor."""

    lora_id: int
    start: int = 0
    stop: int = 0
    index: Tensor | None = None  # long (n,), on the activations' device; None = the range


def segmented_lora_add_(out: Tensor, x: Tensor, groups: Sequence[tuple[RowGroup, LoraFactors]]) -> Tensor:
    """out (N, n) += the LoRA delta of each group's rows (x is (N, k)); in place, returns out.
    The delta is computed in the factors' dtype and cast to out's (as an unmerged LoRA layer does)."""
    for g, f in groups:
        xs = x[g.start:g.stop] if g.index is None else x.index_select(0, g.index)
        if xs.shape[0] == 0:
            continue
        delta = (F.linear(F.linear(xs.to(f.a.dtype), f.a), f.b) * f.scaling).to(out.dtype)
        if g.index is None:
            out[g.start:g.stop] += delta
        else:
            out.index_add_(0, g.index, delta)
    return out


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (a per-step mask cache keys on it)
class StackedLora:
    """A layer's adapters side by side: A rows (R, in), B columns stored as b_t (R, out), and per rank
    column the adapter id and scaling (R = the sum of the ranks)."""

    a: Tensor
    b_t: Tensor
    ids: Tensor  # long (R,)
    scales: Tensor  # (R,), a's dtype
    layout: tuple = ()  # ((lora_id, rank, scaling), ...), dtype: equal layouts give equal masks


def stack_lora(factors: Mapping[int, LoraFactors]) -> StackedLora:
    """Stack {lora_id: factors} of one layer (in id order); float32 unless every A and B share one dtype."""
    items = sorted(factors.items())
    dtypes = {t.dtype for _, f in items for t in (f.a, f.b)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    a = torch.cat([f.a.to(dtype) for _, f in items])
    b_t = torch.cat([f.b.to(dtype).t() for _, f in items]).contiguous()
    ids = torch.cat([torch.full((f.a.shape[0],), i, dtype=torch.long) for i, f in items]).to(a.device)
    scales = torch.cat([torch.full((f.a.shape[0],), f.scaling, dtype=dtype) for _, f in items]).to(a.device)
    layout = (tuple((i, f.a.shape[0], f.scaling) for i, f in items), dtype)
    return StackedLora(a, b_t, ids, scales, layout)


def row_lora_ids(groups: Sequence[RowGroup], n_rows: int, device: torch.device | str = "cpu") -> Tensor:
    """long (n_rows,): each row's adapter id, 0 for rows without one."""
    ids = torch.zeros(n_rows, dtype=torch.long, device=device)
    for g in groups:
        if g.index is None:
            ids[g.start:g.stop] = g.lora_id
        else:
            ids[g.index.to(device)] = g.lora_id
    return ids


def rows_mask(row_ids: Tensor, stacked: StackedLora) -> Tensor:
    """(rows, R): column j's scaling on the rows of its adapter, 0 elsewhere."""
    return (row_ids[:, None] == stacked.ids[None, :]).to(stacked.scales.dtype) * stacked.scales


def stacked_lora_add_(out: Tensor, x: Tensor, stacked: StackedLora, mask: Tensor) -> Tensor:
    """out (N, n) += each row's own adapter's delta (mask from rows_mask; x is (N, k)); in place, returns out.
    The delta is computed in the factors' dtype and cast to out's."""
    t = F.linear(x.to(stacked.a.dtype), stacked.a).mul_(mask)
    if out.dtype == t.dtype:
        return out.addmm_(t, stacked.b_t)
    out += (t @ stacked.b_t).to(out.dtype)
    return out


def lora_rows_reference(out: Tensor, x: Tensor, row_factors: Sequence[LoraFactors | None]) -> Tensor:
    """The same, one row at a time (row i uses row_factors[i], None = base only): the test oracle."""
    rows = []
    for i, f in enumerate(row_factors):
        y = out[i]
        if f is not None:
            y = y + ((x[i].to(f.a.dtype) @ f.a.T @ f.b.T) * f.scaling).to(out.dtype)
        rows.append(y)
    return torch.stack(rows) if rows else out.clone()
