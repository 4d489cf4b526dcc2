"""LowRankLinear: forward formula, form spec round trip, parameter count, trainable factors."""

import json

import torch

from leanfm.models.forms import FORMS
from leanfm.models.lowrank_layers import LowRankLinear


def _layer(bias=True):
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(12, 3, generator=g), torch.randn(3, 8, generator=g)
    return LowRankLinear.from_factors(b, a, torch.randn(12, generator=g) if bias else None), b, a


def test_forward_is_x_at_bt_plus_bias():
    layer, b, a = _layer()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), (x @ a.T) @ b.T + layer.bias)
    torch.testing.assert_close(layer.dense_weight(), b @ a)
    assert layer.num_parameters == 3 * (8 + 12) + 12 == sum(p.numel() for p in layer.parameters())
    assert _layer(bias=False)[0].num_parameters == 60


def test_form_spec_round_trip():
    layer, _, _ = _layer()
    spec = json.loads(json.dumps(layer.form_spec()))
    assert spec == {"form": "lowrank_linear", "in_features": 8, "out_features": 12, "rank": 3, "bias": True}
    assert FORMS["lowrank_linear"] is LowRankLinear
    empty = FORMS[spec["form"]].from_form_spec(spec, torch.bfloat16)
    assert isinstance(empty, LowRankLinear) and empty.A.is_meta and empty.A.dtype == torch.bfloat16
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(empty(x), layer(x))


def test_factors_are_trainable():
    layer, _, _ = _layer()
    assert all(p.requires_grad for p in layer.parameters())
    layer(torch.randn(4, 8)).square().sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None and layer.bias.grad is not None


def test_fresh_layer_starts_at_zero_output():
    layer = LowRankLinear(8, 6, 2)
    assert torch.count_nonzero(layer(torch.randn(3, 8))) == 0
