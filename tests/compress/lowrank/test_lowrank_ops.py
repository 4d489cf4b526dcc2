"""Reference tests of leanfm.ops.lowrank: exactness, Eckart-Young, and the output-error ordering
whitened SVD <= ASVD, SVD on correlated inputs."""

import math

import pytest
import torch

from leanfm.ops.lowrank import (
    asvd_factors,
    cholesky_damped,
    rank_for_budget,
    rank_for_energy,
    saves_parameters,
    svd_factors,
    whitened_svd_factors,
)


def _w(out=48, inp=32, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(n=2048, k=32, seed=1):
    """Inputs with strongly correlated channels and a few outlier channels (as in real LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)[:, None]
    x = torch.randn(n, k, generator=g) @ mix
    x[:, :3] *= 10.0
    return x


def _out_err(x, w, b, a):
    return float(torch.linalg.norm(x.double() @ (w.double() - b.double() @ a.double()).T))


def test_full_rank_reconstructs_exactly():
    w = _w()
    x = _correlated_inputs()
    for b, a in (svd_factors(w, 32), asvd_factors(w, x.abs().mean(0), 32), whitened_svd_factors(w, x.T @ x, 32)):
        assert b.shape == (48, 32) and a.shape == (32, 32) and b.dtype == w.dtype
        torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 16, 31])
def test_svd_truncation_error_is_the_tail_singular_values(rank):
    w = _w().double()
    s = torch.linalg.svdvals(w)
    b, a = svd_factors(w, rank)
    err = torch.linalg.norm(w - b @ a)
    assert math.isclose(float(err), float(s[rank:].pow(2).sum().sqrt()), rel_tol=1e-9)
    # factors are balanced: both carry sqrt(sigma)
    torch.testing.assert_close(torch.linalg.norm(b, dim=0), torch.linalg.norm(a, dim=1))


def test_whitened_minimises_output_error_on_correlated_inputs():
    w, x = _w(), _correlated_inputs()
    rank = 8
    e_svd = _out_err(x, w, *svd_factors(w, rank))
    e_asvd = _out_err(x, w, *asvd_factors(w, x.abs().mean(0), rank, 0.5))
    e_white = _out_err(x, w, *whitened_svd_factors(w, x.T @ x, rank))
    assert e_white < e_asvd < e_svd
    assert e_white < 0.5 * e_svd
    # and it is optimal: the output error equals the tail singular values of (W S)
    s = cholesky_damped(x.T @ x)
    tail = torch.linalg.svdvals(w.double() @ s)[rank:]
    assert math.isclose(e_white, float(tail.pow(2).sum().sqrt()), rel_tol=1e-3)


def test_asvd_alpha_zero_is_plain_svd():
    w, x = _w(), _correlated_inputs()
    b0, a0 = svd_factors(w, 6)
    b1, a1 = asvd_factors(w, x.abs().mean(0), 6, alpha=0.0)
    torch.testing.assert_close(b1 @ a1, b0 @ a0, atol=1e-5, rtol=1e-5)


def test_whitening_survives_rank_deficient_and_dead_channels():
    w = _w()
    x = _correlated_inputs(n=16)  # 16 samples < 32 channels: X^T X is singular
    x[:, 5] = 0.0  # a dead channel
    b, a = whitened_svd_factors(w, x.T @ x, 8)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    assert _out_err(x, w, b, a) <= _out_err(x, w, *svd_factors(w, 8)) + 1e-6
    b, a = asvd_factors(w, x.abs().mean(0), 8)
    assert torch.isfinite(a).all()


def test_rank_for_budget():
    assert rank_for_budget(100, 100, 0.5) == 25  # 25 * 200 = 5000 = 0.5 * 10000
    assert rank_for_budget(100, 300, 0.5) == 37  # 37 * 400 = 14800 <= 15000 < 38 * 400
    assert rank_for_budget(10, 10, 1e-6) == 1
    assert rank_for_budget(10, 20, 5.0) == 10
    for out, inp, f in ((640, 2048, 0.6), (1024, 640, 0.3), (7, 9, 0.9)):
        r = rank_for_budget(out, inp, f)
        assert r * (out + inp) <= f * out * inp < (r + 1) * (out + inp) or r == min(out, inp)
    with pytest.raises(ValueError):
        rank_for_budget(10, 10, 0.0)


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1: cumulative 9/14, 13/14, 1
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 0.99) == 3
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(torch.zeros(4), 0.9) == 1
    with pytest.raises(ValueError):
        rank_for_energy(s, 1.5)


def test_saves_parameters():
    assert saves_parameters(100, 100, 49) and not saves_parameters(100, 100, 50)
    assert not saves_parameters(100, 100, 0)


def test_rank_rule_sees_the_truncated_spectrum():
    w, x = _w(), _correlated_inputs()
    seen = []

    def rule(s):
        seen.append(s)
        return rank_for_energy(s, 0.9)

    b, a = whitened_svd_factors(w, x.T @ x, rule)
    s = torch.linalg.svdvals(w.double() @ cholesky_damped(x.T @ x))
    torch.testing.assert_close(seen[0], s)
    assert b.shape[1] == a.shape[0] == rank_for_energy(s, 0.9)
    b, a = svd_factors(w, lambda s: 3)
    assert a.shape == (3, 32)
