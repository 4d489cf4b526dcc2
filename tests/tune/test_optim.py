"""Optimizer pieces: 8-bit blockwise states (round trip, size, resume), MeZO's seeded noise, schedules, and
QLoRA's input gradient through the packed base."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from leanfm.models.quant_layers import QuantLinear
from leanfm.tune.functional import dequantize_blockwise, quantize_blockwise
from leanfm.tune.optim import AdamW8bit, MeZO, lr_lambda
from leanfm.tune.qlora import TrainableQuantLinear

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_round_trip(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.exp(torch.randn(1000, generator=g))
    x = x if signed else x.abs()
    codes, absmax = quantize_blockwise(x, 256, signed, 4.0)
    assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.numel() == 1024 and absmax.numel() == 4
    back = dequantize_blockwise(codes, absmax, x.shape, 256, signed, 4.0)
    assert ((back - x).norm() / x.norm()) < 0.03
    assert (back.sign() == x.sign()).float().mean() > 0.95


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(64, 128))
    a, b = torch.randn(256, 128, generator=g), torch.randn(256, 64, generator=g)
    return w, lambda: F.mse_loss(a @ w.T, b)


def test_adamw8bit_tracks_adamw_and_resumes():
    w32, loss32 = _problem()
    w8, loss8 = _problem()
    o32, o8 = torch.optim.AdamW([w32], lr=1e-2), AdamW8bit([w8], lr=1e-2)
    for _ in range(30):
        for o, loss in ((o32, loss32), (o8, loss8)):
            o.zero_grad()
            loss().backward()
            o.step()
    with torch.no_grad():
        assert abs(float(loss8()) - float(loss32())) < 0.05 * float(loss32())
    state = o8.state[w8]
    assert state["m_codes"].dtype == torch.int8 and "exp_avg" not in state
    assert sum(t.numel() * t.element_size() for t in state.values()) < 0.3 * 8 * w8.numel()
    w2, loss2 = _problem()
    w2.data.copy_(w8.data)
    o2 = AdamW8bit([w2], lr=1e-2)
    o2.load_state_dict(copy.deepcopy(o8.state_dict()))
    assert o2.state[w2]["m_codes"].dtype == torch.int8
    for o, loss in ((o8, loss8), (o2, loss2)):
        o.zero_grad()
        loss().backward()
        o.step()
    torch.testing.assert_close(w2, w8)


def test_mezo_regenerates_its_noise():
    target = torch.linspace(-1, 1, 8)
    w, w2 = torch.nn.Parameter(torch.zeros(8)), torch.nn.Parameter(torch.zeros(8))

    def loss():
        return ((w - target) ** 2).sum()

    def loss2():
        return ((w2 - target) ** 2).sum()

    o, o2 = MeZO([w], lr=2e-2, eps=1e-3, seed=3), MeZO([w2], lr=2e-2, eps=1e-3, seed=3)
    before = float(loss().detach())
    for _ in range(100):
        with torch.no_grad():
            o.step(loss)
            o2.step(loss2)
    torch.testing.assert_close(w, w2)  # same seed, same steps: the same noise, never stored
    assert not any(isinstance(v, torch.Tensor) and v.numel() > 1 for v in o.state["mezo"].values())
    assert float(loss().detach()) < 0.5 * before


def test_schedules():
    cos, lin, const = (lr_lambda(s, 2, 10) for s in ("cosine", "linear", "constant"))
    assert cos(0) < cos(1) < cos(2) == 1.0 and cos(10) == pytest.approx(0.0) and lin(6) == pytest.approx(0.5)
    assert const(9) == 1.0


def test_quant_input_gradient_matches_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(96, 40)
    q = TrainableQuantLinear.from_linear(dense, 4, 32)
    assert isinstance(q, QuantLinear)
    x = torch.randn(3, 5, 96, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    (q(x) ** 2).sum().backward()
    (F.linear(x_ref, q.dequantized_weight(), q.bias) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
