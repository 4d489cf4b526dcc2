"""leanfm.ops.kernels: the C++ skinny-GEMM kernels against F.linear, the dispatch and FastLinear.

Kernel tests build the library on first use (cached afterwards); where it cannot be built (no
compiler, no ninja, a CPU without AVX2) they are skipped with the reason and only the fallback
paths are tested.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanfm.models.layers import FastLinear, use_fast_linear, use_plain_linear
from leanfm.ops import kernels


def reference64(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def assert_fp32_close(y, x, w, b=None):
    """fp32 dot products of length K: error grows ~ sqrt(K) * eps * sum|x_i w_i|; bound it loosely."""
    ref = reference64(x, w, b)
    scale = F.linear(x.double().abs(), w.double().abs()) + (0 if b is None else b.double().abs())
    k = w.shape[1]
    tol = 4 * k**0.5 * torch.finfo(torch.float32).eps * scale + 1e-30
    err = (y.double() - ref).abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (err <= tol).all(), f"max err {err.max():.3g}, max tol {tol.max():.3g}"


KS = (16, 17, 640, 1000, 2048)
NS = (1, 7, 256, 1000)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
def test_fp32_matches_reference(built, k, n, bias):
    g = torch.Generator().manual_seed(k * 101 + n)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    # every path of the x-row blocking: dot-product tiles below 8 rows, outer-product tiles of 8 and
    # 16 rows from 8 on (one or more groups, a padded last group), and past the threshold
    for m in (*range(1, 10), 13, 16, 17, 24, 33):
        x = torch.randn(m, k, generator=g)
        assert_fp32_close(built.linear_fp32(x, w, b), x, w, b)


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("k", KS)
def test_bf16_matches_reference(built, k, n, bias, xdtype):
    g = torch.Generator().manual_seed(k * 31 + n)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    for m in (*range(1, 10), 13):
        x = torch.randn(m, k, generator=g).to(xdtype)
        y = built.linear_bf16(x, w, b)
        assert y.dtype == xdtype and y.shape == (m, n)
        # the bf16 values are exact in fp32/fp64: the kernel may only add fp32 summation error
        xf, wf, bf = x.float(), w.float(), None if b is None else b.float()
        if xdtype == torch.float32:
            assert_fp32_close(y, xf, wf, bf)
        else:  # output rounded to bf16 (8 bits of mantissa), like F.linear's
            tol = dict(rtol=2**-7, atol=2**-7 * k**0.5)
            torch.testing.assert_close(y.double(), reference64(xf, wf, bf), **tol)
            torch.testing.assert_close(y, F.linear(x, w, b), **tol)


def test_leading_dims_empty_and_k0(built):
    x = torch.randn(2, 3, 640)
    w = torch.randn(300, 640)
    assert built.linear_fp32(x, w, None).shape == (2, 3, 300)
    assert_fp32_close(built.linear_fp32(x, w, None).reshape(6, 300), x.reshape(6, 640), w)
    assert built.linear_fp32(torch.randn(0, 640), w, None).shape == (0, 300)
    b = torch.randn(5)
    torch.testing.assert_close(built.linear_fp32(torch.randn(2, 0), torch.randn(5, 0), b), b.expand(2, 5))


def test_large_n_uses_threads_and_matches(built):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 640), torch.randn(20011, 640), torch.randn(20011)
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            assert_fp32_close(built.linear_fp32(x, w, b), x, w, b)
            assert_fp32_close(built.linear_bf16(x, w.bfloat16(), b), x, w.bfloat16().float(), b)
        finally:
            torch.set_num_threads(old)


def test_kernel_rejects_bad_arguments(built):
    with pytest.raises(RuntimeError, match="features"):
        built.linear_fp32(torch.randn(1, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="bias"):
        built.linear_fp32(torch.randn(1, 8), torch.randn(4, 8), torch.randn(5))
    with pytest.raises(RuntimeError, match="contiguous"):
        built.linear_fp32(torch.randn(1, 8), torch.randn(8, 4).t(), None)


def test_meta_shapes(built):
    x = torch.empty(3, 1, 640, device="meta")
    w = torch.empty(77, 640, device="meta", dtype=torch.bfloat16)
    assert built.linear_bf16(x, w, None).shape == (3, 1, 77)


# ---- dispatch -------------------------------------------------------------------------------------


def counting(monkeypatch):
    """Patch the kernel table so calls that reach a kernel are counted (and still computed)."""
    calls = []
    table = kernels._kernel_ops()
    patched = {dt: (lambda *a, _op=op: calls.append(1) or _op(*a)) for dt, op in table.items()}
    monkeypatch.setattr(kernels, "_ops", patched)
    return calls


def test_dispatch_uses_kernel_for_decode_shapes(built, monkeypatch):
    calls = counting(monkeypatch)
    x, w, b = torch.randn(1, 1, 640), torch.randn(256, 640), torch.randn(256)
    assert_fp32_close(kernels.linear(x, w, b).reshape(1, 256), x.reshape(1, 640), w, b)
    y16 = kernels.linear(x, w.bfloat16())  # fp32 x, bf16 weight -> fp32 output
    assert y16.dtype == torch.float32
    assert_fp32_close(y16.reshape(1, 256), x.reshape(1, 640), w.bfloat16().float())
    assert len(calls) == 2


def test_dispatch_falls_back(built, monkeypatch, env_settings):
    calls = counting(monkeypatch)
    w = torch.randn(64, 32)
    cases = [
        (torch.randn(kernels.max_rows() + 1, 32), w),  # too many rows: BLAS GEMM
        (torch.randn(1, 32, dtype=torch.float64), w.double()),  # unsupported dtype
        (torch.randn(1, 32), torch.randn(32, 64).t()),  # non-contiguous weight
        (torch.randn(1, 32, requires_grad=True), w),  # autograd needed
    ]
    for x, wt in cases:
        torch.testing.assert_close(kernels.linear(x, wt), F.linear(x, wt))
    assert calls == []
    # a non-contiguous x is small: it is copied and still goes to the kernel
    xt = torch.randn(32, 2).t()
    assert_fp32_close(kernels.linear(xt, w), xt.contiguous(), w)
    assert len(calls) == 1
    env_settings(LEANFM_KERNELS_MAX_ROWS="1")
    kernels.linear(torch.randn(2, 32), w)
    assert len(calls) == 1


def test_disabled_by_env(env_settings, monkeypatch):
    env_settings(LEANFM_KERNELS="0")
    assert not kernels.kernels_available()
    monkeypatch.setattr(kernels, "_kernel_ops", lambda: pytest.fail("kernel table consulted"))
    x, w, b = torch.randn(2, 40), torch.randn(10, 40), torch.randn(10)
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b))
    torch.testing.assert_close(kernels.linear(x, w.bfloat16()), F.linear(x, w.bfloat16().float()))


def test_import_does_not_build():
    code = (
        "import leanfm, leanfm.models.layers, leanfm.ops.kernels as k\n"
        "import torch\n"
        "assert not hasattr(torch.ops.leanfm_kernels, 'linear_fp32') or print('loaded')\n"
        "print(k.status())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "loaded" not in out.stdout and "'ok'" not in out.stdout, out.stdout


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """A broken toolchain: one warning line, correct results, no exception."""
    code = (
        "import torch, leanfm.ops.kernels as k\n"
        "x, w = torch.randn(1, 16), torch.randn(4, 16)\n"
        "for _ in range(3): torch.testing.assert_close(k.linear(x, w), torch.nn.functional.linear(x, w))\n"
        "print('available', k.kernels_available())\n"
    )
    env = {"PATH": "/nonexistent", "LEANFM_CACHE": str(tmp_path), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "available False" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "kernels unavailable" in line]
    assert len(warnings) == 1, out.stderr


# ---- FastLinear -----------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 96)
        self.down = nn.Linear(96, 48, bias=False)
        self.blocks = nn.ModuleList([nn.Linear(48, 48) for _ in range(2)])
        self.other = nn.Embedding(10, 48)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.down(torch.relu(self.up(x)))


def test_fast_linear_swap_keeps_outputs_and_state_dict():
    torch.manual_seed(0)
    model = Tiny()
    keys = list(model.state_dict())
    x = torch.randn(1, 3, 48)
    with torch.no_grad():
        ref = model(x)
        assert use_fast_linear(model) == 4
        assert use_fast_linear(model) == 0  # already swapped
        assert all(type(m) is FastLinear for m in model.modules() if isinstance(m, nn.Linear))
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    model.load_state_dict(Tiny().state_dict())  # loads like nn.Linear
    assert use_plain_linear(model) == 4
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_fast_linear_trains_through_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    fast = nn.Linear(16, 4)
    fast.load_state_dict(layer.state_dict())
    use_fast_linear(fast)
    x = torch.randn(2, 16)
    layer(x).square().sum().backward()
    fast(x).square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, layer.weight.grad)
    torch.testing.assert_close(fast.bias.grad, layer.bias.grad)
