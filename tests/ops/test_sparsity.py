"""Sparsity masks are exact (count and pattern), deterministic on ties; the N:M storage round-trips."""

from __future__ import annotations

import pytest
import torch

from leanfm.ops.sparsity import (
    check_nm,
    is_nm_sparse,
    mask_stats,
    nm_compress,
    nm_decompress,
    nm_group_counts,
    nm_mask,
    pack_indices_2bit,
    parse_pattern,
    prune_lowest,
    unpack_indices_2bit,
    unstructured_mask,
    wanda_scores,
)


def scores(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.999])
def test_unstructured_per_row_prunes_exactly_round_sparsity_k_per_row(sparsity):
    s = scores(37, 129)
    keep = unstructured_mask(s, sparsity, per_row=True)
    assert ((~keep).sum(1) == round(sparsity * 129)).all()
    # the pruned entries are the smallest of their row
    for r in range(37):
        if (~keep[r]).any() and keep[r].any():
            assert s[r][~keep[r]].max() <= s[r][keep[r]].min()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_per_matrix_prunes_exactly_round_sparsity_numel(sparsity):
    s = scores(33, 70, seed=1)
    keep = unstructured_mask(s, sparsity, per_row=False)
    assert mask_stats(keep)["pruned"] == round(sparsity * s.numel())
    assert s[~keep].max() <= s[keep].min() if sparsity else keep.all()


def test_sparsity_outside_range_is_rejected():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            unstructured_mask(scores(2, 4), bad)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_keeps_exactly_n_largest_in_every_group(n, m):
    s = scores(16, 64, seed=2)
    keep = nm_mask(s, n, m)
    assert check_nm(keep, n, m)
    assert (nm_group_counts(keep, m) == n).all()
    g, gk = s.reshape(16, -1, m), keep.reshape(16, -1, m)
    kept_min = torch.where(gk, g, torch.inf).min(-1).values
    pruned_max = torch.where(~gk, g, -torch.inf).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_ties_prune_the_lower_index_first():
    flat = torch.ones(2, 8)
    keep = unstructured_mask(flat, 0.5, per_row=True)
    assert keep.tolist() == [[False] * 4 + [True] * 4] * 2
    keep = unstructured_mask(flat, 0.25, per_row=False)
    assert keep.flatten().tolist() == [False] * 4 + [True] * 12
    keep = nm_mask(flat, 2, 4)
    assert keep.tolist() == [[False, False, True, True] * 2] * 2
    # partial ties: equal scores inside a group that straddle the cut
    s = torch.tensor([[1.0, 0.5, 0.5, 0.5]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, False, True]]
    assert torch.equal(nm_mask(s, 2, 4), nm_mask(s.clone(), 2, 4))


def test_nm_needs_width_multiple_of_m():
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(scores(2, 10), 2, 4)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    for bad in ("4:4", "5:4", "0:4", "2-4", "a:b", "2:4:8", ""):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


def test_wanda_scores_and_stats():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    assert torch.equal(wanda_scores(w, torch.tensor([2.0, 0.5])), torch.tensor([[2.0, 1.0], [6.0, 0.0]]))
    assert mask_stats(w) == {"numel": 4, "kept": 3, "pruned": 1, "sparsity": 0.25}


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_compress_round_trips(n, m):
    w = scores(12, 48, seed=3)
    w = w * nm_mask(w.abs(), n, m)
    w[0, :m] = 0  # a group with fewer than n nonzeros pads with zeros
    values, idx = nm_compress(w, n, m)
    assert values.shape == idx.shape == (12, 48 * n // m) and idx.dtype == torch.uint8
    assert torch.equal(nm_decompress(values, idx, n, m, 48), w)
    assert is_nm_sparse(w, n, m) and not is_nm_sparse(scores(2, 8), n, m)
    with pytest.raises(ValueError, match="sparse"):
        nm_compress(scores(2, 8), n, m)


@pytest.mark.parametrize("length", [8, 10, 1])
def test_2bit_index_packing_round_trips(length):
    idx = torch.randint(0, 4, (5, length), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_indices_2bit(idx)
    assert packed.shape == (5, (length + 3) // 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_indices_2bit(packed, length), idx)
    assert pack_indices_2bit(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)).item() == 1 | 2 << 2 | 3 << 4


@pytest.mark.parametrize("width", [5, 64, 65, 300])
@pytest.mark.parametrize("per_row", [True, False])
def test_prune_lowest_equals_a_stable_sort_selection_with_many_ties(width, per_row):
    s = torch.randint(0, 4, (9, width), generator=torch.Generator().manual_seed(width)).float()  # many ties
    for k in (0, 1, width // 3, width - 1, width):
        keep = prune_lowest(s, k, per_row)
        flat = s if per_row else s.reshape(1, -1)
        expect = torch.ones(flat.shape, dtype=torch.bool)
        expect.scatter_(-1, torch.sort(flat, dim=-1, stable=True).indices[..., :k], False)
        assert torch.equal(keep, expect.reshape(s.shape)), k
