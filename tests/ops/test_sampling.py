import pytest
import torch

from leanfm.ops.sampling import (
    apply_repetition_penalty,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits, temperature=0.0).tolist() == [1, 0]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isinf(out[0, [0, 3]]).all() and out[0, 1] == 4.0 and out[0, 2] == 3.0


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = ~torch.isinf(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]
    # always at least the most likely token
    assert (~torch.isinf(top_p_filter(logits, 0.01))).sum() == 1


def test_top_p_on_unsorted_logits():
    probs = torch.tensor([[0.05, 0.3, 0.5, 0.15]])
    kept = ~torch.isinf(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[False, True, True, False]]


def test_min_p_threshold_relative_to_max():
    probs = torch.tensor([[0.6, 0.3, 0.06, 0.04]])
    kept = ~torch.isinf(min_p_filter(probs.log(), 0.1))
    assert kept.tolist() == [[True, True, False, False]]


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_seeded_sampling_reproducible_and_follows_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = sample(logits, 1.0, generator=g1), sample(logits, 1.0, generator=g2)
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / a.numel()
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    assert torch.allclose(freq, expected, atol=0.015)


def test_temperature_sharpens():
    logits = torch.tensor([[0.0, 1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(1)
    cold = sample(logits, 0.25, generator=g).float().mean()
    hot = sample(logits, 4.0, generator=g).float().mean()
    assert cold > 0.95 and 0.5 < hot < 0.6


@pytest.mark.parametrize("k", [0, 10])
def test_top_k_noop_cases(k):
    logits = torch.randn(2, 5)
    assert torch.equal(top_k_filter(logits, k), logits)


def test_presence_frequency_penalty_is_openai_rule():
    from leanfm.ops.sampling import apply_presence_frequency_penalty

    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert torch.equal(out, torch.tensor([[1.0, 2.0 - 0.75 - 0.5, -1.0 - 0.25 - 0.5, 0.5]]))
    assert apply_presence_frequency_penalty(logits, counts, 0.0, 0.0) is logits
    # negative values encourage repeats
    assert apply_presence_frequency_penalty(logits, counts, -1.0, 0.0)[0, 1] == 3.0
