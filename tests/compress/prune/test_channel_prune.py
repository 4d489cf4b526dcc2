"""Structured pruning: the smaller model computes exactly what the original does with the removed FFN
channels / query heads zeroed, keeps GQA groups consistent and decodes through the KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from leanfm.compress import ConfigError, Override, Step, compress_, config_from_dict
from leanfm.compress.prune.channels import (
    ChannelPruneConfig,
    channel_scores,
    head_scores,
    keep_channels,
    keep_heads,
    shrink_attention_,
)
from leanfm.compress.quant.rtn import RTNConfig
from leanfm.models import ContiguousKVCache, KVCacheMeta

pytestmark = pytest.mark.usefixtures("single_thread")
CALIB = torch.randint(3, 128, (4, 20), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids=IDS, start=0, meta=None):
    return model.compute_logits(model(ids, torch.arange(start, start + ids.shape[1]), meta))


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of `original` survive in `pruned` (rows of random weights are unique)."""
    return [int((original == row).all(1).nonzero()) for row in pruned]


@torch.no_grad()
def masked_reference(original, pruned):
    """The original model with every removed FFN channel and query head zeroed in down_proj / o_proj."""
    ref = copy.deepcopy(original)
    for lo, lp in zip(ref.model.layers, pruned.model.layers, strict=True):
        keep = kept_rows(lo.mlp.gate_proj.weight, lp.mlp.gate_proj.weight)
        drop = [c for c in range(lo.mlp.gate_proj.out_features) if c not in keep]
        lo.mlp.down_proj.weight[:, drop] = 0
        attn = lo.self_attn
        rows = kept_rows(attn.q_proj.weight, lp.self_attn.q_proj.weight)
        heads = sorted({r // attn.head_dim for r in rows})
        cols = [c for c in range(attn.n_heads * attn.head_dim) if c // attn.head_dim not in heads]
        attn.o_proj.weight[:, cols] = 0
    return ref


@pytest.mark.parametrize("variant", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_pruned_model_equals_the_original_with_channels_and_heads_zeroed(variant, criterion):
    original = make_tiny_model(variant)
    model = copy.deepcopy(original)
    report = compress_(model, ChannelPruneConfig(ffn_sparsity=0.25, head_sparsity=0.5, criterion=criterion),
                       calibration=CALIB, progress=False)
    structure = report.steps[0]["structure"]
    for i, layer in enumerate(model.model.layers):
        mlp, attn = layer.mlp, layer.self_attn
        assert mlp.gate_proj.weight.shape == (96, 64) and mlp.down_proj.weight.shape == (64, 96)
        assert (attn.n_heads, attn.n_kv) == (2, 2)  # one query head left per kv head
        assert attn.q_proj.weight.shape == (2 * attn.head_dim, 64) and attn.o_proj.in_features == 2 * attn.head_dim
        assert structure[f"model.layers.{i}.self_attn"] == {"n_heads": 2, "n_kv": 2}
        assert structure[f"model.layers.{i}.mlp"] == {"intermediate_size": 96}
    assert report.steps[0]["parameters_removed"] == original.num_parameters() - model.num_parameters() > 0
    full = logits(model)
    torch.testing.assert_close(full, logits(masked_reference(original, model)), rtol=0, atol=2e-5)
    cache = ContiguousKVCache(model.config, batch=2, max_len=24, dtype=torch.float32)
    out = [logits(model, IDS[:, :10], 0, KVCacheMeta(cache, 0))]
    out += [logits(model, IDS[:, p:p + 1], p, KVCacheMeta(cache, p)) for p in range(10, 24)]
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-4)


def test_the_lowest_scoring_channels_and_heads_go():
    original = make_tiny_model("llama")
    model = copy.deepcopy(original)
    compress_(model, ChannelPruneConfig(ffn_sparsity=0.5, head_sparsity=0.5, criterion="magnitude"),
              progress=False)
    lo, lp = original.model.layers[1], model.model.layers[1]
    scores = channel_scores(lo.mlp.gate_proj.weight, lo.mlp.up_proj.weight, lo.mlp.down_proj.weight)
    assert kept_rows(lo.mlp.gate_proj.weight, lp.mlp.gate_proj.weight) == keep_channels(scores, 64).tolist()
    assert set(keep_channels(scores, 64).tolist()) == set(scores.topk(64).indices.tolist())
    hs = head_scores(lo.self_attn.q_proj.weight, lo.self_attn.o_proj.weight, 4)
    kept = keep_heads(hs, 2, 1).tolist()
    assert kept == [int(hs[:2].argmax()), 2 + int(hs[2:].argmax())]  # the better head of each GQA group
    assert sorted({r // 16 for r in kept_rows(lo.self_attn.q_proj.weight, lp.self_attn.q_proj.weight)}) == kept


def test_selection_helpers():
    assert keep_channels(torch.tensor([3.0, 1.0, 1.0, 2.0]), 2).tolist() == [0, 3]
    assert keep_channels(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [1, 2]  # ties: lower index goes
    assert keep_heads(torch.tensor([1.0, 5.0, 4.0, 2.0, 0.0, 9.0]), 2, 1).tolist() == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="keep >= 1"):
        keep_heads(torch.ones(4), 2, 2)
    attn = make_tiny_model("llama").model.layers[0].self_attn
    with pytest.raises(ValueError, match="shared"):
        shrink_attention_(attn, torch.tensor([0, 1, 2]))


def test_per_layer_widths_follow_overrides():
    model = make_tiny_model("gemma3")
    step = Step(ChannelPruneConfig(ffn_sparsity=0.5), overrides=(
        Override("model.layers.0.*", {"ffn_sparsity": 0.25}), Override("model.layers.5.*", skip=True)))
    report = compress_(model, step, calibration=CALIB, progress=False)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths == [96, 64, 64, 64, 64, 128]
    assert "model.layers.5.mlp" not in report.steps[0]["structure"]
    assert all(layer.self_attn.n_heads == 4 for layer in model.model.layers)  # head_sparsity 0: untouched
    assert torch.isfinite(logits(model)).all()


def test_heads_of_a_single_kv_group_keep_one():
    model = make_tiny_model("gemma3", num_key_value_heads=1)
    compress_(model, ChannelPruneConfig(head_sparsity=0.9, criterion="magnitude"), progress=False)
    assert all(layer.self_attn.n_heads == 1 for layer in model.model.layers)
    assert torch.isfinite(logits(model)).all()


def test_bad_inputs():
    for bad, match in [({"ffn_sparsity": 1.0}, "ffn_sparsity"), ({"head_sparsity": -0.5}, "head_sparsity"),
                       ({"criterion": "random"}, "criterion")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"method": "channels", **bad})
    with pytest.raises(ConfigError, match="calibration"):
        compress_(make_tiny_model("llama"), ChannelPruneConfig(ffn_sparsity=0.5), progress=False)
    model = make_tiny_model("llama")
    compress_(model, RTNConfig(bits=8, group_size=None), progress=False)
    with pytest.raises(ConfigError, match="before quantizing"):
        compress_(model, ChannelPruneConfig(ffn_sparsity=0.5, criterion="magnitude"), progress=False)
    assert not isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)


def test_activation_criterion_keeps_the_largest_output_contributions():
    """Layer 0 is scored on the unpruned model's inputs: kept = top ||Z_c|| * sum_i |W_down[i, c]|."""
    from leanfm.compress.calibrate import LayerwiseCalibration

    original = make_tiny_model("gemma3")
    sumsq = torch.zeros(128, dtype=torch.float64)
    step = next(iter(LayerwiseCalibration(original, CALIB, include_head=False)))

    def add(x):
        sumsq.add_(x.double().pow(2).sum(0))

    step.feed({"mlp.down_proj": add})
    down = original.model.layers[0].mlp.down_proj.weight
    contribution = down.abs().sum(0) * sumsq.sqrt().float()
    model = copy.deepcopy(original)
    compress_(model, ChannelPruneConfig(ffn_sparsity=0.5), calibration=CALIB, progress=False)
    kept = kept_rows(original.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)
    assert kept == sorted(contribution.topk(64).indices.tolist())
