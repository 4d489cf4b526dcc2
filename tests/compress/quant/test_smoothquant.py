"""SmoothQuant W8A8: the smoothing factors, the handler end to end, the gain with outliers, reload by spec."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import calib_tokens, logits, rebuild, rel_error, with_outliers

from leanfm.compress import ConfigError, compress_
from leanfm.compress.api import set_module
from leanfm.compress.quant.smoothquant import SmoothQuantConfig, smoothquant_scales
from leanfm.models.int8_layers import W8A8Linear

pytestmark = pytest.mark.usefixtures("single_thread")


def test_scales_balance_activation_and_weight_ranges():
    g = torch.Generator().manual_seed(0)
    x_max = torch.rand(32, generator=g) * 50 + 0.1
    ws = [torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g)]
    s = smoothquant_scales(x_max, ws, 0.5)
    w_max = torch.cat(ws).abs().amax(0)
    torch.testing.assert_close(s, (x_max / w_max).sqrt())
    torch.testing.assert_close(x_max / s, w_max * s)  # alpha 0.5: both sides end at sqrt(max|X| max|W|)
    torch.testing.assert_close(smoothquant_scales(x_max, ws, 1.0), x_max)
    torch.testing.assert_close(smoothquant_scales(x_max, ws, 0.0), 1 / w_max)


def _plain_w8a8(model):
    for name, m in list(model.named_modules()):
        if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear):
            set_module(model, name, W8A8Linear.from_linear(m))
    return model


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_smoothquant_end_to_end(tiny_model, variant):
    calib = calib_tokens()
    model = tiny_model(variant)
    ref = logits(model, calib)
    report = compress_(model, SmoothQuantConfig(alpha=0.5), calibration=calib, progress=False)
    assert report.steps[0]["smoothed_groups"] == 2 * len(model.model.layers)
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    assert len(linears) == 7 * len(model.model.layers) and all(isinstance(m, W8A8Linear) for m in linears)
    out = logits(model, calib)
    assert rel_error(out, ref) < 0.03
    assert torch.equal(logits(rebuild(tiny_model(variant, seed=5), model), calib), out)


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_smoothing_helps_with_outlier_channels(tiny_model, variant):
    """Activation outliers (3 hidden channels 40x): W8A8 with smoothing errs less than without."""
    calib = calib_tokens()
    ref = logits(with_outliers(tiny_model(variant)), calib)
    model = with_outliers(tiny_model(variant))
    compress_(model, SmoothQuantConfig(alpha=0.5), calibration=calib, progress=False)
    plain = _plain_w8a8(with_outliers(tiny_model(variant)))
    assert rel_error(logits(model, calib), ref) < 0.8 * rel_error(logits(plain, calib), ref)


def test_smoothquant_config_errors():
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="calibration"):
        compress_(torch.nn.Module(), SmoothQuantConfig())
