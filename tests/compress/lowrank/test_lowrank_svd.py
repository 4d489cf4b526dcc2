"""SVDConfig end to end on tiny models: rank options, layers left dense, tied head, validation."""

import json

import pytest
import torch

from leanfm.compress import ConfigError, Recipe, Step, compress_, config_from_dict
from leanfm.compress.lowrank.svd import SVDConfig
from leanfm.models.lowrank_layers import LowRankLinear
from leanfm.ops.lowrank import svd_factors

pytestmark = pytest.mark.usefixtures("single_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_param_ratio_factors_every_decoder_linear(tiny_model):
    model = tiny_model("qwen2")  # biases on q/k/v
    weights = _weights(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    report = compress_(model, SVDConfig(param_ratio=0.6), progress=False)
    s = report.steps[0]
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lowrank) == 3 * 7 == s["modules"] and s["left_dense"] == {}
    assert s["params_after"] <= 0.6 * s["params_before"] and s["param_ratio"] > 0.5
    for name, m in lowrank.items():
        w = weights[name]
        assert m.rank * sum(w.shape) <= 0.6 * w.numel() < (m.rank + 1) * sum(w.shape)
        b, a = svd_factors(w, m.rank)
        torch.testing.assert_close(m.dense_weight(), b @ a, atol=1e-5, rtol=1e-5)
    assert lowrank["model.layers.0.self_attn.q_proj"].bias is not None
    assert not isinstance(model.lm_head, LowRankLinear)
    assert torch.isfinite(_logits(model, ids)).all()


def test_fixed_rank_and_ranks_that_save_nothing(tiny_model):
    model = tiny_model("llama")
    s = compress_(model, SVDConfig(rank=4), progress=False).steps[0]
    assert s["modules"] == 14 and s["rank_min"] == s["rank_max"] == 4
    assert s["params_after"] == sum(4 * (o + i) for o, i in [(64, 64), (32, 64), (32, 64), (64, 64),
                                                             (128, 64), (128, 64), (64, 128)]) * 2
    model = tiny_model("llama")
    s = compress_(model, SVDConfig(rank=30), progress=False).steps[0]
    # q/o (64x64: breakeven 32) and the MLP (64x128: breakeven 42.7) factor at rank 30; k/v (32x64:
    # breakeven 21.3) would not save parameters: they stay dense and are reported
    assert s["modules"] == 10
    assert set(s["left_dense"]) == {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.k_proj", "self_attn.v_proj")}
    assert "saves no parameters" in s["left_dense"]["model.layers.0.self_attn.k_proj"]


def test_energy_rank(tiny_model):
    model = tiny_model("llama")
    weights = _weights(model)
    s = compress_(model, SVDConfig(energy=0.3), progress=False).steps[0]
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            sv = torch.linalg.svdvals(weights[name].double()).pow(2)
            kept = sv.cumsum(0) / sv.sum()
            assert kept[m.rank - 1] >= 0.3 > kept[m.rank - 2]
    assert s["modules"] > 0
    model = tiny_model("llama")
    s = compress_(model, SVDConfig(energy=1.0), progress=False).steps[0]
    assert s["modules"] == 0 and len(s["left_dense"]) == 14 and s["param_ratio"] == 1.0


def test_tied_head_stays_dense(tiny_model):
    model = tiny_model("gemma3")
    step = Step(SVDConfig(param_ratio=0.5), include=("lm_head", "model.layers.0.mlp.*"))
    s = compress_(model, step, progress=False).steps[0]
    assert "tied" in s["left_dense"]["lm_head"] and s["modules"] == 3
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_overrides_and_recipe_round_trip(tiny_model):
    recipe = Recipe.from_dict([{"method": "svd", "param_ratio": 0.5,
                                "overrides": [{"pattern": "*.mlp.*", "rank": 2}, {"pattern": "*.v_proj", "skip": True}]}])
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    model = tiny_model("llama")
    compress_(model, recipe, progress=False)
    assert model.model.layers[1].mlp.up_proj.rank == 2
    assert isinstance(model.model.layers[1].self_attn.v_proj, torch.nn.Linear)
    assert model.model.layers[1].self_attn.q_proj.rank == 16


@pytest.mark.parametrize("bad,match", [
    ({}, "exactly one of"),
    ({"rank": 4, "energy": 0.9}, "exactly one of"),
    ({"rank": 0}, "rank must be"),
    ({"param_ratio": 1.0}, "param_ratio must be"),
    ({"energy": 0.0}, "energy must be"),
])
def test_bad_svd_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"method": "svd", **bad})


def test_lowrank_artifact_reloads_with_identical_logits(tiny_model, tmp_path):
    from leanfm.checkpoint.artifact import load_compressed, save_compressed

    model = tiny_model("qwen2")
    report = compress_(model, SVDConfig(param_ratio=0.5), progress=False)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    out = save_compressed(model, None, tmp_path / "svd", report)
    loaded = load_compressed(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, LowRankLinear)
    assert loaded.model.layers[0].self_attn.q_proj.rank == model.model.layers[0].self_attn.q_proj.rank
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
