"""compress_, recipes, overrides and validation (with RTN as the method under test)."""

import json

import pytest
import torch

from leanfm.compress import ConfigError, Recipe, Step, compress_, config_from_dict, method_names
from leanfm.compress.api import Override
from leanfm.compress.calibrate import LayerwiseCalibration
from leanfm.compress.quant.rtn import RTNConfig
from leanfm.models.quant_layers import QuantEmbedding, QuantLinear


def _logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def test_registry_and_dict_round_trip():
    assert "rtn" in method_names()
    cfg = config_from_dict({"method": "rtn", "bits": 8, "group_size": -1})
    assert cfg == RTNConfig(bits=8, group_size=-1)
    recipe = Recipe([Step(RTNConfig(bits=4, group_size=32), include=("model.layers.*", "lm_head"),
                          overrides=(Override("lm_head", {"bits": 8}), Override("model.layers.0.*", skip=True)))])
    d = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(d) == recipe


@pytest.mark.parametrize("bad,match", [
    ({"method": "nope"}, "unknown compression method"),
    ({"method": "rtn", "bits": 5}, "cannot be stored"),
    ({"method": "rtn", "group_size": 0}, "group_size must be positive"),
    ({"method": "rtn", "colour": 1}, "unknown option"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(bad)


def test_bad_recipes():
    with pytest.raises(ConfigError, match="list of steps"):
        Recipe.from_dict({"steps": "rtn"})
    with pytest.raises(ConfigError, match="unknown option"):
        Recipe.from_dict([{"method": "rtn", "overrides": [{"pattern": "lm_head", "bitz": 8}]}])
    with pytest.raises(ConfigError, match="at least one step"):
        Recipe([])


def test_group_size_checked_before_any_work(tiny_model):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe([RTNConfig(bits=4, group_size=32), RTNConfig(bits=4, group_size=48)])
    with pytest.raises(ConfigError, match="does not divide"):
        compress_(model, recipe, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # first step never ran


def test_rtn_targets_overrides_and_tied_head(tiny_model):
    model = tiny_model("gemma3")  # tied embedding / head
    ids = torch.randint(0, 128, (1, 12))
    ref = _logits(model, ids)
    step = Step(RTNConfig(bits=8, group_size=32), include=("model.layers.*", "lm_head"),
                overrides=(Override("lm_head", {"bits": 4}), Override("model.layers.0.*", skip=True)))
    report = compress_(model, step, progress=False)
    layers = model.model.layers
    assert isinstance(layers[1].mlp.up_proj, QuantLinear) and layers[1].mlp.up_proj.bits == 8
    assert type(layers[0].mlp.up_proj) is torch.nn.Linear  # skipped
    assert model.lm_head.bits == 4 and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.model.embed_tokens.qweight is model.lm_head.qweight
    out = _logits(model, ids)
    assert (out - ref).abs().max() / ref.abs().max() < 0.1
    assert report.steps[0]["method"] == "rtn" and report.steps[0]["modules"] == 5 * 7 + 1


def test_filter_and_determinism(tiny_model):
    a, b = tiny_model("llama"), tiny_model("llama")
    only_mlp = lambda name, m: ".mlp." in name  # noqa: E731
    compress_(a, RTNConfig(bits=4, group_size=32), only_mlp, progress=False)
    compress_(b, RTNConfig(bits=4, group_size=32), only_mlp, progress=False)
    assert type(a.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_calibration_required_and_checked(tiny_model):
    with pytest.raises(ConfigError, match="int64 token ids"):
        compress_(tiny_model("llama"), RTNConfig(), calibration=torch.zeros(2, 4), progress=False)


@pytest.mark.parametrize("variant", ["llama", "gemma3", "qwen2"])
def test_layerwise_walk_reproduces_forward(tiny_model, variant):
    model = tiny_model(variant)
    tokens = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    walk = LayerwiseCalibration(model, tokens)
    seen = []
    for step in walk:
        if step.is_head:
            step.feed({"lm_head": lambda x: seen.append(x)})
    with torch.no_grad():
        want = torch.cat([model(t[None], torch.arange(20)).reshape(-1, 64) for t in tokens])
    torch.testing.assert_close(torch.cat(seen), want, rtol=1e-5, atol=1e-5)


def test_feed_passes_submodule_inputs(tiny_model):
    model = tiny_model("llama")
    tokens = torch.randint(0, 128, (2, 10))
    shapes = []
    for step in LayerwiseCalibration(model, tokens, include_head=False):
        step.feed({"mlp.down_proj": lambda x: shapes.append(tuple(x.shape))})
    assert shapes == [(10, 128)] * 4  # 2 layers x 2 samples
