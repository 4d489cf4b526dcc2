"""leanfm.ops.quant: the weight format's numerics (reference tests: exactness and SQNR)."""

import pytest
import torch

from leanfm.ops.quant import (
    check_group_size,
    dequantize,
    fake_quantize,
    pack_bits,
    quantize,
    quantize_per_token_int8,
    sqnr_db,
    unpack_bits,
)


def _w(n=64, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group,min_db", [(8, None, 42.0), (4, 32, 20.0), (4, 128, 18.5), (3, 32, 13.5),
                                               (2, 32, 6.0)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_sqnr(bits, group, min_db, symmetric):
    # Gaussian weights: ~6 dB per bit, less for small groups' max/std ratio; asymmetric gains a little
    w = _w()
    assert sqnr_db(w, fake_quantize(w, bits, group, symmetric)) >= min_db


def test_codes_in_range_and_zero_point_exact():
    w = _w()
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            q, s, z = quantize(w, bits, 32, sym)
            assert q.dtype == torch.uint8 and int(q.max()) <= 2**bits - 1
            assert torch.equal(z, z.round()) and s.shape == z.shape == (64, 8)
    # 0.0 is exactly representable: a zero weight dequantizes to exactly 0
    w[:, :5] = 0
    q, s, z = quantize(w, 4, 32, symmetric=False)
    assert torch.all(dequantize(q, s, z)[:, :5] == 0)


def test_error_bounded_by_half_step():
    w = _w()
    q, s, z = quantize(w, 4, 64, symmetric=False)
    err = (dequantize(q, s, z) - w).abs().reshape(64, 4, 64)
    assert torch.all(err <= s.unsqueeze(-1) / 2 + 1e-6)


def test_clip_ratio_shrinks_range():
    w = _w()
    _, s1, _ = quantize(w, 4, 32)
    _, s2, _ = quantize(w, 4, 32, clip_ratio=0.8)
    torch.testing.assert_close(s2, s1 * 0.8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    p = pack_bits(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_bits(p, bits, 64), q)


def test_bad_shapes_are_clear():
    with pytest.raises(ValueError, match="does not divide"):
        check_group_size(100, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bits(torch.zeros(2, 48, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_bits(torch.zeros(2, 48, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="between 2 and 8"):
        quantize(_w(), 9)


def test_per_token_int8():
    x = _w(7, 100) * torch.linspace(0.1, 10, 7)[:, None]
    q, s = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and s.shape == (7, 1)
    assert int(q.abs().max()) == 127
    assert sqnr_db(x, q.float() * s) > 38
