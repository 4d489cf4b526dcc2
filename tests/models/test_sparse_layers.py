"""SparseLinear stores N:M weights compressed and computes exactly what the dense pruned linear does."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from leanfm.models.forms import FORMS, form_spec
from leanfm.models.sparse_layers import SparseLinear, pack_nm_
from leanfm.ops.sparsity import nm_mask

pytestmark = pytest.mark.usefixtures("single_thread")


def nm_linear(n, m, k=64, out=24, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), n, m))
    return lin


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_sparse_linear_matches_dense_pruned_linear(n, m):
    lin = nm_linear(n, m)
    sp = SparseLinear.from_linear(lin, n, m)
    assert torch.equal(sp.dense_weight(), lin.weight.data)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)  # 15 rows: the 2:4 kernel, fp32 rounding
    assert sp.values.shape == (24, 64 * n // m)
    if m == 4:  # indices two bits each
        assert sp.indices.shape == (24, 64 * n // m // 4) and sp.weight_bits == pytest.approx(32 * n / m + n / m * 2)


def test_form_spec_rebuilds_the_same_structure():
    sp = SparseLinear.from_linear(nm_linear(2, 4), 2, 4)
    spec = form_spec(sp)
    assert spec == {"form": "sparse_nm_linear", "in_features": 64, "out_features": 24, "n": 2, "m": 4,
                    "bias": True, "index_bits": 2}
    empty = FORMS[spec["form"]].from_form_spec(spec, torch.float32)
    assert isinstance(empty, SparseLinear)
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in sp.state_dict().items()}


def test_from_dense_rejects_a_weight_that_is_not_nm():
    with pytest.raises(ValueError, match="2:4"):
        SparseLinear.from_linear(nn.Linear(8, 4), 2, 4)
    with pytest.raises(ValueError, match="divid"):
        SparseLinear(10, 4, 2, 4)


def test_pack_nm_converts_only_nm_sparse_untied_linears():
    model = make_tiny_model("gemma3")  # tied embedding / LM head
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.startswith("model.layers.") and not name.endswith("o_proj"):
                mod.weight.mul_(nm_mask(mod.weight.abs(), 2, 4))
        model.lm_head.weight.mul_(nm_mask(model.lm_head.weight.abs(), 2, 4))  # tied: must stay dense
        ref = model.compute_logits(model(ids, torch.arange(12)))
        assert pack_nm_(model, 2, 4) == 6 * 6  # six layers x (q, k, v, gate, up, down)
        out = model.compute_logits(model(ids, torch.arange(12)))
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="o_proj"):
        pack_nm_(model, 2, 4, names=["model.layers.0.self_attn.o_proj"])
    assert pack_nm_(model, 2, 4, names=["lm_head"]) == 0  # tied to the embedding: stays dense
    assert type(model.lm_head) is nn.Linear
