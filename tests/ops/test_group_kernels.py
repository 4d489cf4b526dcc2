"""The int8-activation quantized kernels and the grouped linear kernels against their references.

* linear_q8 / linear_q4 with act=1: x quantized per block of 32 (quantize_activations_q8), integer dot
  products; the reference is linear_quant_reference(..., act="int8") (the fp32 product with x').
* linear_group / linear_group_quant: several weights on one x (q/k/v), or a gated pair with the
  activation applied (gate/up), against the per-layer references.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanfm.ops import kernels
from leanfm.ops.kernels import fused, quant
from leanfm.ops.kernels.quant import dequantize, linear_quant, linear_quant_reference, pack_codes


def make_quant(n, k, bits, group_size, seed=0, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group_size, generator=g) * 0.05 + 0.005
    zeros = (torch.full_like(scales, 2.0 ** (bits - 1)) if symmetric
             else torch.randint(0, 2**bits, scales.shape, generator=g).float())
    return pack_codes(q, bits), scales, zeros


def assert_close_fp32(y, ref, x, w):
    scale = (x.reshape(-1, x.shape[-1]).abs().double() @ w.abs().double().T).max().item()
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= 1e-5 * scale + 1e-30, f"max err {err:.3g} vs output scale {scale:.3g}"


def test_quantize_activations_q8():
    x = torch.randn(3, 96) * torch.logspace(-3, 2, 96)
    x[1, :32] = 0.0  # an all-zero block
    xq = quant.quantize_activations_q8(x)
    d = x.reshape(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    codes = (xq.reshape(3, 3, 32) / torch.where(d > 0, d, torch.ones_like(d)))
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3
    assert torch.equal(xq[1, :32], torch.zeros(32))
    assert ((xq - x).abs() <= d.repeat_interleave(32, -1).reshape(3, 96) / 2 + 1e-6).all()


KG = [(32, 32), (64, 32), (640, 32), (640, 64), (640, 128), (640, 640), (2048, 128), (2048, 2048)]


@pytest.mark.parametrize("k,group_size", KG)
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_activation_kernel_matches_reference(built, bits, k, group_size):
    op = built.linear_q8 if bits == 8 else built.linear_q4
    for n in (1, 5, 37, 264):
        qw, s, z = make_quant(n, k, bits, group_size, seed=n + k, symmetric=n == 37)
        w = dequantize(qw, s, z, bits, group_size)
        b = torch.randn(n) if n == 5 else None
        for m in (1, 2, 3, 8):
            x = torch.randn(m, k) * 3
            x[0, :7] = 40.0  # an outlier block
            y = op(x, qw, s, z, group_size, b, 1)
            ref = linear_quant_reference(x, qw, s, z, bits, group_size, b, act="int8")
            assert_close_fp32(y, ref, x, w)


def test_activation_mode_setting(built, monkeypatch):
    qw, s, z = make_quant(16, 64, 4, 32)
    x = torch.randn(1, 64)
    old = quant.set_activation_mode("int8")
    try:
        assert quant.activation_mode() == "int8"
        y8 = linear_quant(x, qw, s, z, 4, 32)
        torch.testing.assert_close(y8, linear_quant_reference(x, qw, s, z, 4, 32, act="int8"))
        quant.set_activation_mode("fp32")
        torch.testing.assert_close(linear_quant(x, qw, s, z, 4, 32), linear_quant_reference(x, qw, s, z, 4, 32))
        monkeypatch.setenv("LEANFM_QUANT_ACT", "int8")
        kernels.reload_settings()
        assert quant.activation_mode() == "int8"
        with pytest.raises(ValueError, match="activation mode"):
            quant.set_activation_mode("int4")
    finally:
        monkeypatch.undo()
        quant.set_activation_mode(old)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_group(built, wdtype):
    g = torch.Generator().manual_seed(0)
    k = 96
    ws = [torch.randn(n, k, generator=g).to(wdtype) for n in (64, 17, 16)]
    bs = [torch.randn(64, generator=g), None, torch.randn(16, generator=g)]
    for m in (1, 3, 8, 17):  # fp32 from 8 rows on: x transposed once for the outer-product tiles
        x = torch.randn(m, 1, k, generator=g)
        ys = built.linear_group(x, ws, bs, -1)
        for y, w, b in zip(ys, ws, bs, strict=True):
            assert y.shape == (m, 1, w.shape[0])
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            assert_close_fp32(y, ref, x, w.float())


@pytest.mark.parametrize("act", sorted(fused.ACTS))
def test_linear_group_gated(built, act):
    g = torch.Generator().manual_seed(1)
    k, n = 64, 77
    wg, wu = torch.randn(n, k, generator=g) / 8, torch.randn(n, k, generator=g) / 8
    for m in (1, 2, 5, 16):
        x = torch.randn(m, k, generator=g)
        (h,) = built.linear_group(x, [wg, wu], [None, None], fused.ACTS[act])
        ref = fused.gated_act_reference(F.linear(x, wg), F.linear(x, wu), act)
        torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [0, 1], ids=["x_fp32", "x_int8"])
@pytest.mark.parametrize("bits,group_size", [(8, 96), (8, 32), (4, 32), (4, 96)])
def test_linear_group_quant(built, bits, group_size, act):
    k = 96
    layers = [make_quant(n, k, bits, group_size, seed=n) for n in (40, 8, 9)]
    bias = [None, torch.randn(8), None]
    mode = quant.ACT_MODES[act]
    for m in (1, 4):
        x = torch.randn(m, k)
        ys = built.linear_group_quant(x, [w[0] for w in layers], [w[1] for w in layers], [w[2] for w in layers],
                                      bits, group_size, bias, -1, act)
        for y, (qw, s, z), b in zip(ys, layers, bias, strict=True):
            ref = linear_quant_reference(x, qw, s, z, bits, group_size, b, act=mode)
            assert_close_fp32(y, ref, x, dequantize(qw, s, z, bits, group_size))
        gate, up = layers[1], make_quant(8, k, bits, group_size, seed=99)
        (h,) = built.linear_group_quant(x, [gate[0], up[0]], [gate[1], up[1]], [gate[2], up[2]], bits, group_size,
                                        [None, None], 1, act)
        ref = F.silu(linear_quant_reference(x, *gate, bits, group_size, act=mode)) * linear_quant_reference(
            x, *up, bits, group_size, act=mode)
        torch.testing.assert_close(h, ref, atol=1e-4, rtol=1e-4)


def test_group_ops_reject_bad_arguments(built):
    x = torch.randn(1, 32)
    with pytest.raises(RuntimeError, match="epilogue"):
        built.linear_group(x, [torch.randn(4, 32)], [None], 0)
    with pytest.raises(RuntimeError, match="all float32, all bfloat16"):
        built.linear_group(x, [torch.randn(4, 32), torch.randn(4, 32).bfloat16()], [None, None], -1)
    with pytest.raises(RuntimeError, match="one bias"):
        built.linear_group(x, [torch.randn(4, 32)], [], -1)


def test_activation_mode_set_before_first_use_sticks():
    """Regression: the lazy first read of the kernel settings reset a mode set explicitly before it."""
    import subprocess
    import sys

    code = ("from leanfm.ops.kernels import quant; from leanfm.ops import kernels; quant.set_activation_mode('int8'); "
            "kernels.kernels_enabled(); kernels.max_rows(); print(quant.activation_mode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "int8"
