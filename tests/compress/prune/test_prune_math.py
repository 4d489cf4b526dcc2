"""Pruning numerics on one layer: exact masks, and reconstruction error SparseGPT < Wanda < magnitude
on correlated inputs with uneven feature scales (what real activations look like)."""

from __future__ import annotations

import pytest
import torch

from leanfm.compress.prune.magnitude import MagnitudeConfig, magnitude_mask
from leanfm.compress.prune.sparsegpt import sparsegpt_prune
from leanfm.compress.prune.wanda import WandaConfig, wanda_mask
from leanfm.ops.sparsity import check_nm, mask_stats

pytestmark = pytest.mark.usefixtures("single_thread")
ROWS, K, TOKENS = 48, 128, 1024


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(TOKENS, K // 4, generator=g) @ torch.randn(K // 4, K, generator=g)
    x = latent + 0.3 * torch.randn(TOKENS, K, generator=g)
    x = x * torch.exp(0.5 * torch.randn(K, generator=g))  # uneven feature scales
    w = torch.randn(ROWS, K, generator=g) / K**0.5
    return w, x


def recon_error(w, w_new, x):
    return ((x @ (w - w_new).T) ** 2).sum().item() / ((x @ w.T) ** 2).sum().item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(pattern):
    w, x = layer()
    mag = w * magnitude_mask(w, MagnitudeConfig(0.5, pattern))
    wan = w * wanda_mask(w, x.norm(dim=0), WandaConfig(0.5, pattern))
    nm = MagnitudeConfig(0.5, pattern).nm or (None, None)
    sgpt, keep = sparsegpt_prune(w, x.T @ x / TOKENS, 0.5, *nm)
    errs = [recon_error(w, v, x) for v in (sgpt, wan, mag)]
    assert errs[0] < errs[1] < errs[2], errs
    assert errs[0] < 0.7 * errs[1]  # reconstruction is worth a lot, not a rounding difference


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
@pytest.mark.parametrize("block_size", [128, 32, 50])
def test_sparsegpt_unstructured_zeroes_exactly_round_sparsity_numel(sparsity, block_size):
    w, x = layer(1)
    new, keep = sparsegpt_prune(w, x.T @ x / TOKENS, sparsity, block_size=block_size)
    assert mask_stats(keep)["pruned"] == round(sparsity * w.numel())
    assert (new[~keep] == 0).all() and (new[keep] != 0).all()
    assert new.dtype == w.dtype and new.shape == w.shape


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_sparsegpt_nm_pattern_is_exact_and_independent_of_blocking(n, m):
    w, x = layer(2)
    h = x.T @ x / TOKENS
    new, keep = sparsegpt_prune(w, h, 0.0, n, m, block_size=128)
    assert check_nm(keep, n, m) and check_nm(new, n, m)
    # the lazy block updates are an exact reordering of the column-by-column OBS sweep
    new8, keep8 = sparsegpt_prune(w, h, 0.0, n, m, block_size=8)
    assert torch.equal(keep8, keep)
    torch.testing.assert_close(new8, new, rtol=1e-4, atol=1e-5)


def test_sparsegpt_with_zero_sparsity_changes_nothing_and_handles_dead_inputs():
    w, x = layer(3)
    new, keep = sparsegpt_prune(w, x.T @ x / TOKENS, 0.0)
    assert keep.all() and torch.equal(new, w)
    x[:, 5] = 0  # an input that never fires
    new, keep = sparsegpt_prune(w, x.T @ x / TOKENS, 0.5)
    assert (new[:, 5] == 0).all() and mask_stats(keep)["pruned"] == round(0.5 * w.numel())


def test_sparsegpt_first_column_update_is_the_obs_optimum():
    """Pruning only input 0 of a row (it is swept first): the other weights move to the least-squares
    optimum min ||X (w - w')||^2 s.t. w'_0 = 0, which is w' = w - w_0 H^-1[:, 0] / H^-1[0, 0]."""
    w, x = layer(4)
    h = x.T @ x / TOKENS
    w1 = w[:1].clone()
    w1[0, 1:] = 10.0  # everything but input 0 dominates the saliency: exactly one weight is pruned
    new, keep = sparsegpt_prune(w1, h, 1 / K, damp=0.0, block_size=K)
    assert keep.sum() == K - 1 and not keep[0, 0]
    hinv = torch.linalg.inv(h.double())
    expect = w1.double() - w1[0, 0].double() * hinv[:, 0] / hinv[0, 0]
    torch.testing.assert_close(new.double(), expect, rtol=1e-3, atol=1e-3)
