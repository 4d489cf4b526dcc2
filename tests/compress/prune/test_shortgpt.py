"""ShortGPT: block influence matches a layer-by-layer computation, the lowest-BI layers go, and the
smaller model runs (full forward and KV-cache decode)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from leanfm.compress import ConfigError, Step, compress_, config_from_dict
from leanfm.compress.calibrate import LayerwiseCalibration
from leanfm.compress.prune.shortgpt import ShortGPTConfig, layer_influences, lowest_influence
from leanfm.models import ContiguousKVCache, KVCacheMeta

pytestmark = pytest.mark.usefixtures("single_thread")
CALIB = torch.randint(3, 128, (6, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model, ids, start=0, meta=None):
    return model.compute_logits(model(ids, torch.arange(start, start + ids.shape[1]), meta))


def test_block_influence_equals_the_layerwise_definition():
    model = make_tiny_model("gemma3")
    got = layer_influences(model, CALIB, batch_size=4)
    expect = []
    for step in LayerwiseCalibration(model, CALIB, include_head=False):
        pairs = zip(step.inputs, step.outputs(), strict=True)
        cos = [torch.nn.functional.cosine_similarity(h, o, dim=-1) for h, o in pairs]
        expect.append(1 - torch.cat(cos, 1).mean().item())
    assert got == pytest.approx(expect, abs=1e-5)


def test_lowest_influence_breaks_ties_by_index():
    assert lowest_influence([0.3, 0.1, 0.1, 0.2], [0, 1, 2, 3], 2) == [1, 2]
    assert lowest_influence([0.3, 0.1, 0.1, 0.2], [0, 2, 3], 2) == [2, 3]


@pytest.mark.parametrize("variant", ["gemma3", "llama"])
def test_an_identity_layer_is_removed_first_and_the_model_still_decodes(variant):
    model = make_tiny_model(variant, num_hidden_layers=4) if variant == "llama" else make_tiny_model(variant)
    n = model.config.num_hidden_layers
    ident = n - 2
    with torch.no_grad():  # the layer adds nothing: h_out = h_in, BI = 0
        model.model.layers[ident].self_attn.o_proj.weight.zero_()
        model.model.layers[ident].mlp.down_proj.weight.zero_()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    report = compress_(model, ShortGPTConfig(n_layers=1), calibration=CALIB, progress=False)
    summary = report.steps[0]
    assert summary["removed_layers"] == [ident] and summary["num_hidden_layers"] == n - 1
    assert summary["block_influence"][ident] == pytest.approx(0.0, abs=1e-6)
    assert model.config.num_hidden_layers == n - 1
    full = logits(model, ids)
    torch.testing.assert_close(full, before, rtol=0, atol=1e-5)  # removing an identity changes nothing
    cache = ContiguousKVCache(model.config, batch=2, max_len=24, dtype=torch.float32)
    out = [logits(model, ids[:, :10], 0, KVCacheMeta(cache, 0))]
    out += [logits(model, ids[:, p:p + 1], p, KVCacheMeta(cache, p)) for p in range(10, 24)]
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-4)


def test_fraction_and_excluded_layers():
    model = make_tiny_model("gemma3")
    bi = layer_influences(model, CALIB)
    lowest = min(range(6), key=lambda i: bi[i])
    report = compress_(model, Step(ShortGPTConfig(fraction=0.34), exclude=(f"model.layers.{lowest}",)),
                       calibration=CALIB, progress=False)
    removed = report.steps[0]["removed_layers"]
    assert len(removed) == 2 and lowest not in removed
    assert removed == lowest_influence(bi, [i for i in range(6) if i != lowest], 2)


@pytest.mark.parametrize("bad, match", [
    ({"method": "shortgpt"}, "exactly one"),
    ({"method": "shortgpt", "n_layers": 2, "fraction": 0.5}, "exactly one"),
    ({"method": "shortgpt", "n_layers": 0}, "n_layers"),
    ({"method": "shortgpt", "fraction": 1.0}, "fraction"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(bad)


def test_cannot_remove_every_layer():
    with pytest.raises(ConfigError, match="cannot remove"):
        compress_(make_tiny_model("llama"), ShortGPTConfig(n_layers=2), calibration=CALIB, progress=False)
