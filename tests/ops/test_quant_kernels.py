"""leanfm.ops.kernels.quant: the int8 / packed int4 weight-only kernels against the reference.

Kernel tests build the library on first use (cached afterwards); where it cannot be built they are
skipped with the reason, and only the pure-PyTorch paths (packing, reference, fallback) run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leanfm.ops import kernels
from leanfm.ops.kernels import quant
from leanfm.ops.kernels.quant import (
    dequantize,
    linear_quant,
    linear_quant_reference,
    pack_codes,
    unpack_codes,
)


def make_quant(n, k, bits, group_size, seed=0, symmetric=False):
    """Random codes, scales and zeros in the storage format: (qweight, scales, zeros, codes)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group_size, generator=g) * 0.05 + 0.005
    if symmetric:
        zeros = torch.full_like(scales, 2.0 ** (bits - 1))
    else:
        zeros = torch.randint(0, 2**bits, scales.shape, generator=g).float()
    return pack_codes(q, bits), scales, zeros, q


def op_for(built, bits):
    return built.linear_q8 if bits == 8 else built.linear_q4


def assert_close_fp32(y, ref, x, w):
    """fp32 summation error only: bounded by a small multiple of eps * sum_k |x_k w_k|."""
    assert y.dtype == torch.float32 and y.shape == ref.shape
    scale = (x.reshape(-1, x.shape[-1]).abs().double() @ w.abs().double().T).max().item()
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= 1e-5 * scale + 1e-30, f"max err {err:.3g} vs output scale {scale:.3g}"


# ---- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (5, 96), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 96 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 96), q)


def test_q4_layout_is_q4_0_style():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_codes(q, 4)
    for b in range(2):
        for j in range(16):
            expect = q[:, 32 * b + j] | (q[:, 32 * b + 16 + j] << 4)
            assert torch.equal(packed[:, 16 * b + j], expect)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="K % 32"):
        pack_codes(torch.zeros(2, 48, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_codes(torch.full((2, 32), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(2, 32, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(2, 32, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="K=64"):
        unpack_codes(torch.zeros(2, 16, dtype=torch.uint8), 4, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_matches_formula(bits):
    qw, s, z, q = make_quant(4, 64, bits, 32)
    w = dequantize(qw, s, z, bits, 32)
    g = torch.arange(64) // 32
    torch.testing.assert_close(w, (q.float() - z[:, g]) * s[:, g], rtol=0, atol=0)
    assert dequantize(qw, s, z, bits, 32, torch.bfloat16).dtype == torch.bfloat16


# ---- kernels against the reference ----------------------------------------------------------------

KG = [(32, 32), (64, 32), (64, 64)] + [(k, g) for k in (640, 2048) for g in (32, 64, 128, k)]
NS = (1, 5, 37, 264)  # 5 and 37: leftovers of the 8-row blocks (and of the 4-row tiles)


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k,group_size", KG)
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_reference(built, bits, k, group_size, bias, xdtype):
    op = op_for(built, bits)
    for n in NS:
        qw, s, z, _ = make_quant(n, k, bits, group_size, seed=n + k, symmetric=n == 37)
        w = dequantize(qw, s, z, bits, group_size)
        b = torch.randn(n) if bias else None
        for m in (1, 2, 3, 8):
            x = torch.randn(m, k).to(xdtype)
            y = op(x, qw, s, z, group_size, b)
            ref = linear_quant_reference(x, qw, s, z, bits, group_size, b)
            assert y.dtype == xdtype and y.shape == (m, n)
            if xdtype == torch.float32:
                assert_close_fp32(y, ref, x, w)
            else:  # same fp32 result rounded to bf16: at most one rounding step apart
                scale = (x.float().abs() @ w.abs().T).max().item()
                torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=1e-5 * scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_precision_with_offset_activations(built, bits):
    """x with a large common offset: dot(q, x) and zeros * sum(x) nearly cancel (per-channel worst)."""
    for k, group_size in ((2048, 2048), (640, 32)):
        qw, s, z, _ = make_quant(64, k, bits, group_size, seed=k, symmetric=True)
        x = torch.randn(3, k) + 20
        y = op_for(built, bits)(x, qw, s, z, group_size, None)
        ref = x.double() @ dequantize(qw, s, z, bits, group_size).double().T
        assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_non_contiguous_and_leading_dims(built, bits):
    qw, s, z, _ = make_quant(40, 640, bits, 64, seed=3)
    w = dequantize(qw, s, z, bits, 64)
    xt = torch.randn(640, 3).t()  # non-contiguous rows
    x3 = torch.randn(2, 4, 1280)[:, :, ::2]  # (2, 4, 640), strided last dim
    for x in (xt, x3):
        y = op_for(built, bits)(x, qw, s, z, 64, None)
        assert y.shape == (*x.shape[:-1], 40)
        assert_close_fp32(y, F.linear(x, w), x, w)
        assert_close_fp32(linear_quant(x, qw, s, z, bits, 64), F.linear(x, w), x, w)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_threads_and_large_n(built, bits):
    qw, s, z, _ = make_quant(20011, 640, bits, 32, seed=5)
    w = dequantize(qw, s, z, bits, 32)
    x, b = torch.randn(1, 640), torch.randn(20011)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert_close_fp32(op_for(built, bits)(x, qw, s, z, 32, b), F.linear(x, w, b), x, w)
    finally:
        torch.set_num_threads(old)


def test_kernel_rejects_bad_arguments(built):
    qw, s, z, _ = make_quant(8, 64, 4, 32)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="group_size"):
        built.linear_q4(x, qw, s, z, 16, None)
    with pytest.raises(RuntimeError, match="qweight"):
        built.linear_q8(x, qw, s, z, 32, None)  # 4-bit packed rows are half as long
    with pytest.raises(RuntimeError, match="scales"):
        built.linear_q4(x, qw, s[:, :1], z, 32, None)
    with pytest.raises(RuntimeError, match="bias"):
        built.linear_q4(x, qw, s, z, 32, torch.randn(9))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        built.linear_q8(torch.randn(1, 48), torch.zeros(8, 48, dtype=torch.uint8), s, z, 48, None)


def test_meta_shapes(built):
    x = torch.empty(3, 1, 640, device="meta")
    qw = torch.empty(77, 320, dtype=torch.uint8, device="meta")
    s = torch.empty(77, 20, device="meta")
    assert built.linear_q4(x, qw, s, s, 32, None).shape == (3, 1, 77)


# ---- dispatch -------------------------------------------------------------------------------------


def counting(monkeypatch):
    """Patch the quant kernel table so calls that reach a kernel are counted (and still computed)."""
    calls = []
    table = quant._quant_ops()
    patched = {bits: (lambda *a, _op=op: calls.append(1) or _op(*a)) for bits, op in table.items()}
    monkeypatch.setattr(quant, "_qops", patched)
    return calls


@pytest.mark.parametrize("bits", [8, 4])
def test_dispatch_uses_kernel_for_decode_shapes(built, monkeypatch, bits):
    calls = counting(monkeypatch)
    qw, s, z, _ = make_quant(48, 640, bits, 128, seed=7)
    w = dequantize(qw, s, z, bits, 128)
    b = torch.randn(48)
    for m in (1, kernels.max_rows()):
        x = torch.randn(1, m, 640)
        assert_close_fp32(linear_quant(x, qw, s, z, bits, 128, b), F.linear(x, w, b), x, w)
    y16 = linear_quant(torch.randn(1, 640, dtype=torch.bfloat16), qw, s, z, bits, 128, b.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert len(calls) == 3


@pytest.mark.parametrize("bits", [8, 4])
def test_dispatch_falls_back_to_reference(built, monkeypatch, env_settings, bits):
    calls = counting(monkeypatch)
    qw, s, z, _ = make_quant(24, 64, bits, 32, seed=11)
    b = torch.randn(24)
    cases = [
        (torch.randn(kernels.max_rows() + 1, 64), s, b),  # prefill: dequantize once + GEMM
        (torch.randn(2, 64, requires_grad=True), s, b),  # autograd needed
        (torch.randn(1, 64), s.clone().requires_grad_(), b),
        (torch.randn(1, 64, dtype=torch.float64), s, b),  # x dtype the kernel does not take
    ]
    for x, scales, bias in cases:
        y = linear_quant(x, qw, scales, z, bits, 32, bias)
        assert y.dtype == x.dtype
        torch.testing.assert_close(y, linear_quant_reference(x, qw, scales, z, bits, 32, bias))
    if bits == 8:  # a group size the kernel does not take (the format allows any divisor of K)
        q = unpack_codes(qw, 8, 64)
        s16, z16 = s.repeat_interleave(2, dim=1), z.repeat_interleave(2, dim=1)
        x = torch.randn(1, 64)
        ref = linear_quant_reference(x, q, s16, z16, 8, 16)
        torch.testing.assert_close(linear_quant(x, q, s16, z16, 8, 16), ref)
    assert calls == []
    env_settings(LEANFM_KERNELS_MAX_ROWS="1")
    linear_quant(torch.randn(2, 64), qw, s, z, bits, 32)
    assert calls == []
    linear_quant(torch.randn(1, 64), qw, s, z, bits, 32)
    assert len(calls) == 1


def test_disabled_by_env(env_settings, monkeypatch):
    env_settings(LEANFM_KERNELS="0")
    monkeypatch.setattr(quant, "_quant_ops", lambda: pytest.fail("kernel table consulted"))
    monkeypatch.setattr(quant, "_qops", None)
    for bits in (4, 8):
        qw, s, z, _ = make_quant(10, 64, bits, 32)
        x, b = torch.randn(1, 64), torch.randn(10)
        torch.testing.assert_close(
            linear_quant(x, qw, s, z, bits, 32, b), linear_quant_reference(x, qw, s, z, bits, 32, b)
        )


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x32", "x16"])
def test_prefill_dequantizes_in_chunks(monkeypatch, xdtype):
    """Many rows: W is dequantized to x's dtype in chunks of rows, then F.linear; same result."""
    monkeypatch.setattr(quant, "_CHUNK_WEIGHTS", 7 * 64)  # 7 rows per chunk: 4 chunks + a remainder
    qw, s, z, _ = make_quant(30, 64, 4, 32, seed=2)
    x, b = torch.randn(2, 20, 64).to(xdtype), torch.randn(30)
    y = linear_quant(x, qw, s, z, 4, 32, b)
    ref = linear_quant_reference(x, qw, s, z, 4, 32, b)
    assert y.dtype == xdtype and y.shape == (2, 20, 30)
    if xdtype == torch.float32:
        torch.testing.assert_close(y, ref)
    else:  # W and the GEMM in bf16
        torch.testing.assert_close(y.float(), ref.float(), rtol=2**-6, atol=0.05)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_dequantize_op_is_bit_exact(built, bits, group_size):
    """csrc/dequant.cpp's one-pass dequantization equals quant.dequantize bit for bit."""
    qw, s, z, _ = make_quant(37, 256, bits, group_size, seed=bits + group_size)
    assert torch.equal(built.dequantize_weight(qw, s, z, bits, group_size), dequantize(qw, s, z, bits, group_size))
    with pytest.raises(RuntimeError, match="group_size"):
        built.dequantize_weight(qw, s, z, bits, 48)


def test_quantize_act_op_is_bit_exact(built):
    x = torch.randn(5, 3, 96) * torch.logspace(-3, 2, 96)
    x[0, 0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[1, 1, 5] = 1e30  # one huge value flattens its block
    assert torch.equal(built.quantize_act_q8(x), quant.quantize_activations_q8(x))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        built.quantize_act_q8(torch.randn(2, 40))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_row_result_independent_of_row_count(built, bits, mode):
    """A row's output is the same whether it runs alone (decode kernel) or among prefill rows (dequantize
    + GEMM): with int8 activations the GEMM path rounds x as the kernel does."""
    old = quant.set_activation_mode(mode)
    try:
        qw, s, z, _ = make_quant(40, 128, bits, 32, seed=5)
        x = torch.randn(kernels.max_rows() + 9, 128) * 2
        many = linear_quant(x, qw, s, z, bits, 32)
        alone = torch.cat([linear_quant(x[i : i + 1], qw, s, z, bits, 32) for i in range(3)])
        tol = 1e-5 * float(many.abs().max())  # fp32 rounding of sums in another order
        torch.testing.assert_close(many[:3], alone, rtol=1e-5, atol=tol)
        ref = linear_quant_reference(x, qw, s, z, bits, 32, act=mode)
        torch.testing.assert_close(many, ref, rtol=1e-5, atol=tol)
    finally:
        quant.set_activation_mode(old)


def test_int8_activations_keep_gradients_in_training():
    """Rounding x has no gradient, so with autograd recording through x the GEMM path keeps fp32 x."""
    old = quant.set_activation_mode("int8")
    try:
        qw, s, z, _ = make_quant(8, 64, 8, 32, seed=3)
        x = torch.randn(kernels.max_rows() + 1, 64, requires_grad=True)
        linear_quant(x, qw, s, z, 8, 32).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, dequantize(qw, s, z, 8, 32).sum(0).expand_as(x))
    finally:
        quant.set_activation_mode(old)
