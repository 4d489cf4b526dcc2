"""Reference tests of leanfm.ops.distill.distill_loss against torch's kl_div and float64 formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from leanfm.ops.distill import distill_loss


def _logits(seed, shape=(3, 5, 17), scale=3.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_forward_and_reverse_kl_match_kl_div():
    s, t = _logits(0), _logits(1)
    fwd = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum")
    rev = F.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="sum")
    torch.testing.assert_close(distill_loss(s, t, "forward_kl"), fwd)
    torch.testing.assert_close(distill_loss(s, t, "reverse_kl"), rev)


def test_jsd_matches_float64_formula_and_is_bounded():
    s, t = _logits(2), _logits(3, scale=10.0)
    p, q = t.double().softmax(-1), s.double().softmax(-1)
    m = (p + q) / 2
    ref = 0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum())
    torch.testing.assert_close(distill_loss(s, t, "jsd").double(), ref, rtol=1e-5, atol=1e-6)
    assert float(distill_loss(s, t, "jsd")) <= math.log(2) * 15 + 1e-5  # <= log 2 per token
    torch.testing.assert_close(distill_loss(s, t, "jsd"), distill_loss(t, s, "jsd"))  # symmetric


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_zero_iff_equal_and_temperature_scaling(kind):
    s, t = _logits(4), _logits(5)
    assert abs(float(distill_loss(s, s + 1.0, kind))) < 1e-5  # softmax is shift-invariant
    assert float(distill_loss(s, t, kind)) > 0
    ref = distill_loss(s / 2.0, t / 2.0, kind) * 4.0
    torch.testing.assert_close(distill_loss(s, t, kind, temperature=2.0), ref)


def test_gradient_reaches_the_student_only_when_asked():
    s, t = _logits(6).requires_grad_(), _logits(7)
    distill_loss(s, t).backward()
    # d KL(p || q) / d student logits = q - p per token
    torch.testing.assert_close(s.grad, s.detach().softmax(-1) - t.softmax(-1))


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown"):
        distill_loss(_logits(0), _logits(1), "mse")
    with pytest.raises(ValueError, match="shape"):
        distill_loss(_logits(0), _logits(1, shape=(3, 5, 16)))
