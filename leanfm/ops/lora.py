"""Batched multi-LoRA deltas (the S-LoRA / Punica idea): many adapters over one base in one step.

The rows of a step (flattened tokens of several requests) each pick one adapter or none. For each
adapter present, its rows are gathered, pushed through the adapter's low-rank factors and added back
(SGMV, segmented gather-matrix-vector, done as one gather + two small GEMMs + one index_add per adapter):

    out[rows] += s * (x[rows] A^T) B^T          A (r, in), B (out, r), s = alpha / r (rsLoRA: alpha / sqrt r)

Pure functions over tensors; the base layer's output `out` is whatever the base computed (dense,
quantized, sparse...): the base weights are never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LoraFactors", "RowGroup", "lora_rows_reference", "segmented_lora_add_"]


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


def lora_rows_reference(out: Tensor, x: Tensor, row_factors: Sequence[LoraFactors | None]) -> Tensor:
    """The same, one row at a time (row i uses row_factors[i], None = base only): the test oracle."""
    rows = []
    for i, f in enumerate(row_factors):
        y = out[i]
        if f is not None:
            y = y + ((x[i].to(f.a.dtype) @ f.a.T @ f.b.T) * f.scaling).to(out.dtype)
        rows.append(y)
    return torch.stack(rows) if rows else out.clone()
