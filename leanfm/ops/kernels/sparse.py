"""N:M-sparse linear layers (leanfm.ops.sparsity's compressed format) with a C++ kernel for 2:4 decode.

    from leanfm.ops.kernels.sparse import linear_nm
    y = linear_nm(x, values, indices, n=2, m=4, in_features=K, bias=None)

values [N, K*n/m] are the kept weights, indices their in-group positions (uint8 [N, K*n/m], or for
m = 4 packed 2 bits each: [N, ceil(K*n/m / 4)]). `linear_nm` uses the C++ kernel
(csrc/sparse_nm.cpp: no gathers, 8.5 bytes per 4 fp32 inputs instead of 16) when all of these hold:
  * the kernels are enabled and built (same switches as `leanfm.ops.kernels.linear`);
  * n:m = 2:4, K % 32 == 0, everything on the CPU, values/indices contiguous, no autograd needed;
  * values and x fp32 or bf16; rows = x.numel() // K <= max_rows().
The kernel accumulates in fp32 and returns x's dtype. Otherwise (prefill, other patterns, no kernels)
the weight is scattered to dense once per call and F.linear runs in x's dtype.
`linear_nm_reference` is what the kernel is tested against: dense fp32 weight, fp32 F.linear, cast to
x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leanfm.ops import kernels as _kernels
from leanfm.ops.kernels import _build
from leanfm.ops.sparsity import nm_decompress, unpack_indices_2bit

__all__ = ["dense_weight", "linear_nm", "linear_nm_reference", "sparse_kernel_available"]

_FLOATS = (torch.float32, torch.bfloat16)
_op: object | None = None  # the torch op, False if unavailable


def dense_weight(values: Tensor, indices: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """The dense [N, K] weight (values' dtype) of the compressed format."""
    idx = unpack_indices_2bit(indices, values.shape[1]) if m == 4 else indices
    return nm_decompress(values, idx, n, m, in_features)


def linear_nm_reference(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, in_features: int,
                        bias: Tensor | None = None) -> Tensor:
    """fp32 meaning of linear_nm: F.linear on the dense fp32 weight, cast to x's dtype."""
    w = dense_weight(values, indices, n, m, in_features).float()
    return F.linear(x.float(), w, bias.float() if bias is not None else None).to(x.dtype)


@torch.compiler.disable
def _sparse_op():
    global _op
    if _op is None:
        _op = False
        if _build.load():
            _op = getattr(torch.ops.leanfm_kernels, "linear_sparse24", None) or False
    return _op


def sparse_kernel_available() -> bool:
    """True when the 2:4 kernel can run here (builds or loads the kernel library if not done yet)."""
    return _kernels.kernels_enabled() and bool(_sparse_op())


def _use_kernel(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, k: int, bias: Tensor | None) -> bool:
    if n != 2 or m != 4 or k % 32 or x.shape[-1] != k or x.dtype not in _FLOATS or values.dtype not in _FLOATS:
        return False
    if not (x.is_cpu and values.is_cpu and values.is_contiguous() and indices.is_contiguous()):
        return False
    rows = x.numel() // k
    if rows == 0 or rows > _kernels.max_rows() or not _kernels.kernels_enabled():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return bool(_sparse_op())


def linear_nm(x: Tensor, values: Tensor, indices: Tensor, n: int, m: int, in_features: int,
              bias: Tensor | None = None) -> Tensor:
    """y = x @ W^T + bias with W [N, in_features] n:m sparse in the compressed format (see module doc)."""
    if _use_kernel(x, values, indices, n, m, in_features, bias):
        return _op(x, values, indices, bias)
    w = dense_weight(values, indices, n, m, in_features).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
