"""magnitude / wanda / sparsegpt through compress_ on tiny llama and gemma3: exact masks on every target,
working models, packing into SparseLinear, and bad configs rejected before any work."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from leanfm.compress import ConfigError, Override, Recipe, Step, compress_, config_from_dict
from leanfm.compress.prune.magnitude import MagnitudeConfig
from leanfm.compress.prune.sparsegpt import SparseGPTConfig
from leanfm.compress.prune.wanda import WandaConfig
from leanfm.models.sparse_layers import SparseLinear
from leanfm.ops.sparsity import check_nm

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))


def calibration(n=4, t=24):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model):
    return model.compute_logits(model(IDS, torch.arange(IDS.shape[1])))


def layer_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_unstructured_masks_are_exact_on_every_target(variant, method):
    model = make_tiny_model(variant)
    before = logits(model)
    report = compress_(model, CONFIGS[method](sparsity=0.5), calibration=calibration(), progress=False)
    summary = report.steps[0]
    linears = layer_linears(model)
    assert summary["modules"] == len(linears) == 7 * model.config.num_hidden_layers
    for name, mod in linears:
        zeros = int((mod.weight == 0).sum())
        if method == "wanda":  # per output row
            assert ((mod.weight == 0).sum(1) == mod.in_features // 2).all(), name
        assert zeros == mod.weight.numel() // 2, name
        assert summary["masks"][name] == [zeros, mod.weight.numel()]
    assert summary["sparsity"] == 0.5 and summary["pruned_weights"] == sum(m.weight.numel() // 2 for _, m in linears)
    assert (model.lm_head.weight != 0).all()  # not a default target
    after = logits(model)
    assert torch.isfinite(after).all() and not torch.allclose(after, before)


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns_are_exact_and_pack_into_sparse_linear(variant, method, pattern):
    n, m = map(int, pattern.split(":"))
    model = make_tiny_model(variant)
    compress_(model, CONFIGS[method](pattern=pattern), calibration=calibration(), progress=False)
    for name, mod in layer_linears(model):
        assert check_nm(mod.weight, n, m), name
    packed = make_tiny_model(variant)
    report = compress_(packed, CONFIGS[method](pattern=pattern, pack=True), calibration=calibration(),
                       progress=False)
    assert report.steps[0]["packed"] == 7 * model.config.num_hidden_layers
    assert isinstance(packed.model.layers[1].mlp.up_proj, SparseLinear)
    torch.testing.assert_close(logits(packed), logits(model), rtol=1e-5, atol=1e-5)


def test_overrides_and_excludes_reach_the_pruners():
    model = make_tiny_model("llama")
    step = Step(WandaConfig(sparsity=0.5), exclude=("model.layers.0.*",),
                overrides=(Override("*.down_proj", {"sparsity": 0.25}),))
    compress_(model, Recipe([step]), calibration=calibration(), progress=False)
    assert (model.model.layers[0].mlp.up_proj.weight != 0).all()
    assert (model.model.layers[1].mlp.up_proj.weight == 0).float().mean() == 0.5
    assert (model.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.25


def test_sparsegpt_beats_magnitude_on_the_layer_outputs():
    """The tiny model's last-layer hidden states stay closer to the dense model's with SparseGPT."""
    ref = make_tiny_model("llama", num_hidden_layers=2)
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        model = make_tiny_model("llama", num_hidden_layers=2)
        compress_(model, CONFIGS[method](sparsity=0.5), calibration=calibration(8, 32), progress=False)
        with torch.no_grad():
            errs[method] = (model(calibration(8, 32), torch.arange(32)) -
                            ref(calibration(8, 32), torch.arange(32))).pow(2).mean().item()
    assert errs["sparsegpt"] < errs["magnitude"], errs


@pytest.mark.parametrize("bad, match", [
    ({"method": "wanda", "sparsity": 1.0}, "sparsity"),
    ({"method": "magnitude", "sparsity": -0.1}, "sparsity"),
    ({"method": "sparsegpt", "pattern": "4:4"}, "pattern"),
    ({"method": "wanda", "pattern": "2of4"}, "pattern"),
    ({"method": "magnitude", "pack": True}, "pack"),
    ({"method": "sparsegpt", "pattern": "2:4", "block_size": 6}, "block_size"),
    ({"method": "sparsegpt", "damp": -1}, "damp"),
])
def test_bad_configs_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(bad)


def test_nm_width_checked_before_any_work():
    model = make_tiny_model("llama")
    w0 = model.model.layers[0].mlp.gate_proj.weight.clone()
    recipe = Recipe([MagnitudeConfig(0.5), MagnitudeConfig(pattern="2:3")])  # 64 and 128 are not multiples of 3
    with pytest.raises(ConfigError, match="divide"):
        compress_(model, recipe, progress=False)
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, w0)


def test_calibrated_pruners_need_calibration():
    with pytest.raises(ConfigError, match="calibration"):
        compress_(make_tiny_model("llama"), WandaConfig(0.5), progress=False)


def test_lm_head_can_be_pruned_tied_heads_stay_dense_storage():
    model = make_tiny_model("llama")  # untied: the calibration walk's head step feeds lm_head
    report = compress_(model, Step(WandaConfig(sparsity=0.5, pattern="2:4", pack=True), include=("lm_head",)),
                       calibration=calibration(), progress=False)
    assert isinstance(model.lm_head, SparseLinear) and report.steps[0]["modules"] == 1
    assert check_nm(model.lm_head.dense_weight(), 2, 4)
    tied = make_tiny_model("gemma3")
    report = compress_(tied, Step(MagnitudeConfig(pattern="2:4", pack=True), include=("lm_head",)), progress=False)
    assert report.steps[0]["packed"] == 0 and type(tied.lm_head) is nn.Linear
    assert check_nm(tied.lm_head.weight, 2, 4) and tied.model.embed_tokens.weight is tied.lm_head.weight
