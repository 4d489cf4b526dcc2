"""AWQ: scale and clipping searches against RTN, exactness of the scale folding, the handler end to end."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import calib_tokens, logits, rebuild, rel_error, with_outliers

from leanfm.compress import ConfigError, Step, compress_
from leanfm.compress.quant.awq import (
    AWQConfig,
    awq_clip_ratios,
    awq_search_scale,
    output_error,
    quantize_clipped,
)
from leanfm.compress.quant.layer_groups import fold_scales, scale_groups
from leanfm.compress.quant.rtn import RTNConfig
from leanfm.models.quant_layers import QuantEmbedding, QuantLinear
from leanfm.ops.quant import dequantize, fake_quantize

pytestmark = pytest.mark.usefixtures("single_thread")


def _outlier_inputs(t: int = 2048, k: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 30.0  # a few salient input channels, as in LLM activations
    return x


def test_awq_search_and_clip_beat_rtn_with_outlier_channels():
    x = _outlier_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) / 128**0.5
    gram = x.T @ x
    s, alpha, losses = awq_search_scale(w, gram, x.abs().mean(0), 4, 32, False, 20)
    rtn = fake_quantize(w, 4, 32, False)
    assert losses[0] == pytest.approx(float(output_error(rtn - w, gram)), rel=1e-4)  # alpha = 0 is RTN
    assert alpha > 0 and min(losses) < 0.8 * losses[0]
    ws = w * s
    ratios = awq_clip_ratios(ws, gram / (s[:, None] * s[None, :]), 4, 32, False)
    assert ratios.shape == (64, 4) and float(ratios.min()) >= 0.5 and float(ratios.max()) == 1.0
    awq = dequantize(*quantize_clipped(ws, ratios, 4, 32, False)) / s

    def err(wq):
        return float((x @ w.T - x @ wq.T).norm())

    assert err(awq) < 0.8 * err(rtn)
    no_clip = dequantize(*quantize_clipped(ws, 1.0, 4, 32, False)) / s
    assert err(awq) <= err(no_clip) * 1.001


def test_clip_search_never_worse_per_group():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    gram = x.T @ x
    ratios = awq_clip_ratios(w, gram, 3, 16, True, 20, 0.5)
    for r in (ratios, 1.0):
        d = dequantize(*quantize_clipped(w, r, 3, 16, True)) - w
        errs = [(d[:, i:i + 16] @ gram[i:i + 16, i:i + 16] * d[:, i:i + 16]).sum(1) for i in range(0, 64, 16)]
        if r is ratios:
            clipped = torch.stack(errs, 1)
        else:
            plain = torch.stack(errs, 1)
    assert (clipped <= plain * (1 + 1e-5) + 1e-6).all()
    assert (ratios < 1).float().mean() > 0.2  # at 3 bits, Gaussian groups usually gain from a clipped range


@pytest.mark.parametrize("variant,overrides", [("llama", {}), ("gemma3", {}), ("llama", {"num_key_value_heads": 4}),
                                               ("qwen2", {})])
def test_scale_folding_is_exact(tiny_model, variant, overrides):
    model = tiny_model(variant, **overrides)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    g = torch.Generator().manual_seed(1)
    kinds = set()
    for layer in model.model.layers:
        for group in scale_groups(layer):
            k = layer.get_submodule(group.linears[0]).in_features
            fold_scales(layer, group, torch.rand(k, generator=g) * 4 + 0.25)
            kinds.add(group.prev)
    expected = {"input_layernorm", "mlp.up_proj"}
    expected.add("pre_feedforward_layernorm" if variant.startswith("gemma") else "post_attention_layernorm")
    if overrides:
        expected.add("self_attn.v_proj")
    assert kinds == expected
    out = logits(model, ids)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, tiny_model(variant, **overrides)
                           .model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_awq_end_to_end(tiny_model, variant):
    calib = calib_tokens()
    ref = logits(with_outliers(tiny_model(variant), 12.0), calib)
    errs = {}
    for name, cfg in (("rtn", RTNConfig(bits=4, group_size=32)), ("awq", AWQConfig(bits=4, group_size=32))):
        model = with_outliers(tiny_model(variant), 12.0)
        report = compress_(model, cfg, calibration=calib, progress=False)
        linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
        assert linears and all(isinstance(m, QuantLinear) for m in linears)
        errs[name] = rel_error(logits(model, calib), ref)
    again = rebuild(tiny_model(variant, seed=4), model)  # folded norms come from the state dict too
    assert torch.equal(logits(again, calib), logits(model, calib))
    assert report.steps[0]["scale_groups"] == 3 * len(model.model.layers)
    assert errs["awq"] < 0.5  # random tiny models with outlier channels: RTN reaches 0.43 (llama), 0.22 (gemma3)
    assert errs["awq"] < errs["rtn"]


def test_awq_head_and_tied_embedding(tiny_model):
    model = tiny_model("gemma3")
    calib = calib_tokens()
    ref = logits(model, calib)
    compress_(model, Step(AWQConfig(bits=8, group_size=32), include=("model.layers.*", "lm_head")),
              calibration=calib, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.tied
    assert rel_error(logits(model, calib), ref) < 0.02


def test_awq_config_errors():
    with pytest.raises(ConfigError, match="n_grid"):
        AWQConfig(n_grid=0)
    with pytest.raises(ConfigError, match="max_shrink"):
        AWQConfig(max_shrink=1.0)
    with pytest.raises(ConfigError, match="bits"):
        AWQConfig(bits=5)
