"""leanfm.ops.kernels.sparse: the 2:4 C++ kernel against its fp32 reference, and the dispatch.

Kernel tests build the library on first use (cached afterwards) and are skipped with the reason
where it cannot be built; the fallback path is tested everywhere.
"""

from __future__ import annotations

import pytest
import torch

from leanfm.ops import kernels
from leanfm.ops.kernels import sparse
from leanfm.ops.sparsity import nm_compress, nm_mask, pack_indices_2bit

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def built():
    if not sparse.sparse_kernel_available():
        pytest.skip(f"leanfm C++ kernels unavailable: {kernels.status().get('error') or 'disabled'}")


def compressed(n_out, k, dtype=torch.float32, n=2, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k, generator=g)
    w = (w * nm_mask(w.abs(), n, m)).to(dtype)
    values, idx = nm_compress(w, n, m)
    return w, values, (pack_indices_2bit(idx) if m == 4 else idx)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n_out, k", [(7, 32), (64, 96), (37, 640)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(built, rows, n_out, k, wdtype):
    w, values, idx = compressed(n_out, k, wdtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n_out)
    assert sparse._use_kernel(x, values, idx, 2, 4, k, bias)
    got = sparse.linear_nm(x, values, idx, 2, 4, k, bias)
    ref = sparse.linear_nm_reference(x, values, idx, 2, 4, k, bias)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # fp32 sums of K/2 products, another order
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, w.float(), bias), rtol=1e-5, atol=1e-5)


def test_kernel_with_bf16_activations_and_batch_dims(built):
    _, values, idx = compressed(24, 64)
    x = torch.randn(2, 1, 64).bfloat16()
    got = sparse.linear_nm(x, values, idx, 2, 4, 64)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 1, 24)
    torch.testing.assert_close(got, sparse.linear_nm_reference(x, values, idx, 2, 4, 64), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", ["prefill", "odd_width", "4:8", "grad"])
def test_fallback_is_exact_dense_linear(case):
    n, m, k, rows = 2, 4, 64, 3
    if case == "prefill":
        rows = kernels.max_rows() + 1
    elif case == "odd_width":
        k = 36
    elif case == "4:8":
        n, m = 4, 8
    w, values, idx = compressed(10, k, n=n, m=m)
    x = torch.randn(rows, k, requires_grad=case == "grad")
    assert not sparse._use_kernel(x, values, idx, n, m, k, None)
    torch.testing.assert_close(sparse.linear_nm(x, values, idx, n, m, k), torch.nn.functional.linear(x, w),
                               rtol=0, atol=0)
