"""SparseLinear: an N:M-sparse linear layer (2:4, 4:8...) stored compressed.

Of every M consecutive input weights of a row only N are stored (leanfm.ops.sparsity's N:M format):

    values  [out, in*N/M]   the kept weights, in input order (model dtype)
    indices [out, in*N/M]   their positions inside each group of M, uint8 — or, for M = 4, packed
                            four to a byte (2 bits each): [out, ceil(in*N/M / 4)]

so a 2:4 fp32 weight takes 50% + 1/16 of its dense bytes. The forward scatters the values into a
dense weight and calls F.linear (nothing is cached, so memory stays compressed); at decode time a 2:4
layer runs leanfm's C++ kernel instead (leanfm.ops.kernels.sparse), which reads only the compressed
bytes: about half of a dense fp32 layer's. In a prepared model's decode step the whole block, 2:4
projections included, runs in one C++ call (leanfm.models.decode_plan).

    n = pack_nm_(model, 2, 4)      # every plain nn.Linear whose weight is 2:4 sparse -> SparseLinear
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from leanfm.models.forms import register_form
from leanfm.ops.kernels.sparse import linear_nm
from leanfm.ops.sparsity import (
    is_nm_sparse,
    nm_compress,
    nm_decompress,
    pack_indices_2bit,
    unpack_indices_2bit,
)

__all__ = ["SparseLinear", "pack_nm_"]


@register_form("sparse_nm_linear")
class SparseLinear(nn.Module):
    """y = x @ W^T + b with W [out, in] N:M sparse, stored as kept values + in-group indices."""

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= n < m <= 256 or in_features % m:
            raise ValueError(f"SparseLinear {n}:{m} needs 1 <= N < M <= 256 and M dividing in_features "
                             f"({in_features})")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        kept = in_features // m * n
        self.register_buffer("values", torch.empty(out_features, kept, device=device, dtype=dtype))
        idx_cols = (kept + 3) // 4 if self.packed_indices else kept
        self.register_buffer("indices", torch.empty(out_features, idx_cols, device=device, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @property
    def packed_indices(self) -> bool:
        """True when indices are stored 2 bits each (M = 4)."""
        return self.m == 4

    @classmethod
    def from_dense(cls, weight: Tensor, n: int, m: int, bias: Tensor | None = None) -> SparseLinear:
        """From a dense N:M-sparse weight [out, in] (ValueError if it is not N:M sparse)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, n, m, bias=bias is not None, dtype=weight.dtype)
        values, idx = nm_compress(weight.detach(), n, m)
        layer.values = values
        layer.indices = pack_indices_2bit(idx) if layer.packed_indices else idx
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int, m: int) -> SparseLinear:
        return cls.from_dense(linear.weight, n, m, linear.bias)

    def in_group_indices(self) -> Tensor:
        """uint8 [out, in*N/M]: each kept value's position inside its group of M."""
        if self.packed_indices:
            return unpack_indices_2bit(self.indices, self.values.shape[1])
        return self.indices

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        w = nm_decompress(self.values, self.in_group_indices(), self.n, self.m, self.in_features)
        return w if dtype is None else w.to(dtype)

    @property
    def weight(self) -> Tensor:
        """The dense weight (for code that reads `.weight`, e.g. to export); computed on every access."""
        return self.dense_weight()

    def forward(self, x: Tensor) -> Tensor:
        return linear_nm(x, self.values, self.indices, self.n, self.m, self.in_features, self.bias)

    @property
    def weight_bits(self) -> float:
        """Storage bits per dense weight (values and indices)."""
        stored = self.values.numel() * self.values.element_size() + self.indices.numel()
        return stored * 8 / (self.in_features * self.out_features)

    def form_spec(self) -> dict[str, Any]:
        return {"form": self.form, "in_features": self.in_features, "out_features": self.out_features,
                "n": self.n, "m": self.m, "bias": self.bias is not None,
                "index_bits": 2 if self.packed_indices else 8}

    @classmethod
    def from_form_spec(cls, spec: dict[str, Any], dtype: torch.dtype) -> SparseLinear:
        return cls(spec["in_features"], spec["out_features"], spec["n"], spec["m"], bias=spec["bias"],
                   device="meta", dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
                f"bias={self.bias is not None}")


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (a tied embedding / LM head)."""
    counts = Counter(id(p) for mod in model.modules() for p in mod.parameters(recurse=False))
    return {k for k, c in counts.items() if c > 1}


def pack_nm_(model: nn.Module, n: int = 2, m: int = 4, names: Iterable[str] | None = None) -> int:
    """Replace nn.Linear modules by SparseLinear in place; returns how many.

    names=None: every nn.Linear whose weight is n:m sparse (dense ones are left alone). With names, each
    named module must be an n:m-sparse nn.Linear (ValueError otherwise). A weight shared with another
    module (a tied LM head) is never packed (and not counted): the embedding still needs it dense.
    """
    shared = _shared_weights(model)
    wanted = None if names is None else set(names)
    count = 0
    for name, mod in list(model.named_modules()):
        if wanted is not None and name not in wanted:
            continue
        ok = isinstance(mod, nn.Linear) and is_nm_sparse(mod.weight, n, m)
        if not ok and wanted is not None:
            raise ValueError(f"{name} is not an nn.Linear with {n}:{m} sparse weights; cannot pack it")
        if not ok or id(mod.weight) in shared:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, SparseLinear.from_linear(mod, n, m))
        count += 1
    return count
