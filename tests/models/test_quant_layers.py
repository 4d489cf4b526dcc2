"""QuantLinear / QuantEmbedding: the module forms agree with the ops.quant reference."""

import pytest
import torch
from torch import nn

from leanfm.models.forms import form_spec, module_from_spec
from leanfm.models.quant_layers import QuantEmbedding, QuantLinear
from leanfm.ops.quant import fake_quantize


def _linear(k=128, n=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 32), (4, 128), (3, 32), (2, 64)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quant_linear_matches_fake_quant(bits, group, rows):
    lin = _linear()
    q = QuantLinear.from_linear(lin, bits, group, symmetric=False)
    x = torch.randn(2, rows, 128)
    ref = nn.functional.linear(x, fake_quantize(lin.weight.detach(), bits, group, False), lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)
    assert q.qweight.numel() == 96 * 128 * bits // 8


def test_weight_bits_counts_scales():
    q = QuantLinear.from_linear(_linear(bias=False), 4, 32)
    assert q.weight_bits == pytest.approx(4 + 64 / 32)  # fp32 scale + zero per 32 weights


def test_spec_round_trip_identical_output():
    q = QuantLinear.from_linear(_linear(), 4, 64)
    spec = form_spec(q)
    assert spec == {"form": "quant_linear", "in_features": 128, "out_features": 96, "bits": 4, "group_size": 64,
                    "bias": True}
    empty = module_from_spec(spec, torch.float32)
    empty.load_state_dict(q.state_dict(), assign=True)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(empty(x), q(x))


def test_embedding_tied_and_standalone():
    emb = nn.Embedding(50, 64)
    qe = QuantEmbedding.from_embedding(emb, 8, 32)
    ids = torch.tensor([[1, 7, 49]])
    torch.testing.assert_close(qe(ids), fake_quantize(emb.weight.detach(), 8, 32)[ids])
    head = QuantLinear.from_linear(nn.Linear(64, 50, bias=False), 4, 32)
    tied = QuantEmbedding.tied_to(head)
    assert tied.qweight is head.qweight and tied.tied
    torch.testing.assert_close(tied(ids), head.dequantized_weight()[ids])
