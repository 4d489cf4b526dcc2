"""The fused, vocabulary-chunked LM loss equals cross-entropy on full logits, value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from leanfm.models.quant_layers import QuantLinear
from leanfm.tune.loss import CausalLMLoss, fused_linear_cross_entropy, lm_loss_sum

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("quant", [False, True])
def test_fused_matches_full_logits(softcap, quant):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    if quant:
        head = QuantLinear.from_linear(head, 8, 32)
    w = head.dequantized_weight() if quant else head.weight.detach()
    h = torch.randn(37, 64, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (37,), generator=g)
    ref_h = h.detach().clone().requires_grad_(True)
    logits = ref_h @ w.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits, y, reduction="sum")
    ref.backward()
    out = fused_linear_cross_entropy(h, y, head, softcap, chunk=64)
    (out * 0.5).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad, 0.5 * ref_h.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_model_loss_matches_compute_logits(variant):
    model = make_tiny_model(variant)
    ids = torch.randint(3, 120, (2, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    labels[0, :4] = -100
    loss, n = CausalLMLoss(model, chunk=32)(ids, labels)
    logits = model.compute_logits(model(ids, torch.arange(11)))
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    assert int(n) == int((labels != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    loss_sum, n2 = lm_loss_sum(model, model(ids, torch.arange(11)), torch.full_like(labels, -100))
    assert n2 == 0 and float(loss_sum.detach()) == 0.0
