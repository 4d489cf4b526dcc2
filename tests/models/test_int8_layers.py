"""W8A8Linear and Int8OutlierLinear: exact integer matmul, accuracy against float, save/load by form spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leanfm.models.forms import FORMS, module_from_spec
from leanfm.models.int8_layers import (
    Int8OutlierLinear,
    W8A8Linear,
    int8_matmul,
    int8_matmul_reference,
    quantize_rows_int8,
)
from leanfm.ops.quant import quantize_per_token_int8, sqnr_db


def _exact(a, b):
    return (a.long() @ b.long().T)


@pytest.mark.parametrize("m,k,n", [(1, 64, 128), (7, 33, 5), (32, 1024, 64), (3, 2500, 17)])
def test_int8_matmul_is_exact(m, k, n):
    g = torch.Generator().manual_seed(m + k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), _exact(a, b))
    assert torch.equal(int8_matmul_reference(a, b).long(), _exact(a, b))
    worst = torch.full((2, k), 127, dtype=torch.int8)  # largest possible partial sums
    assert torch.equal(int8_matmul(worst, -worst).long(), _exact(worst, -worst))


def test_int8_matmul_rejects_other_dtypes():
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.int8))


def _linear(k=256, n=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin


def test_w8a8_matches_its_formula_and_float():
    lin = _linear()
    layer = W8A8Linear.from_linear(lin)
    x = torch.randn(3, 5, 256)
    y = layer(x)
    assert y.shape == (3, 5, 96)
    xq, xs = quantize_per_token_int8(x.reshape(-1, 256))
    wq, ws = quantize_rows_int8(lin.weight)
    formula = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).T + lin.bias.double()
    torch.testing.assert_close(y.reshape(-1, 96).double(), formula, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert sqnr_db(lin(x), y) > 30


def test_outlier_layer_splits_columns():
    lin = _linear(bias=False)
    plain = W8A8Linear.from_linear(lin)
    mixed = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    x = torch.randn(4, 256)
    torch.testing.assert_close(mixed(x), plain(x))  # no outliers: the int8 path only
    x[:, [3, 100]] *= 40.0  # outlier feature dimensions, as in LLM.int8()
    with torch.no_grad():
        ref = lin(x)
    cols = [3, 100]
    rest = x.clone()
    rest[:, cols] = 0
    expect = plain(rest) + x[:, cols] @ mixed.dequantized_weight()[:, cols].T
    torch.testing.assert_close(mixed(x), expect, rtol=1e-5, atol=1e-5)
    assert sqnr_db(ref, mixed(x)) > sqnr_db(ref, plain(x)) + 10


@pytest.mark.parametrize("cls,kwargs", [(W8A8Linear, {}), (Int8OutlierLinear, {"threshold": 4.0})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_by_form_spec(cls, kwargs, dtype):
    lin = _linear(k=64, n=32).to(dtype)
    layer = cls.from_linear(lin, **kwargs)
    spec = layer.form_spec()
    assert FORMS[spec["form"]] is cls and spec["in_features"] == 64 and spec["bias"] is True
    empty = module_from_spec(spec, dtype)
    assert type(empty) is cls and empty.weight.is_meta
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(6, 64, dtype=dtype) * 3
    assert torch.equal(empty(x), layer(x))
    assert empty(x).dtype == dtype
    if cls is Int8OutlierLinear:
        assert empty.threshold == 4.0
