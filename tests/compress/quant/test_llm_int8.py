"""LLM.int8(): the handler end to end, the outlier path against pure int8, reload by spec."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import logits, rebuild, rel_error, with_outliers

from leanfm.compress import ConfigError, compress_
from leanfm.compress.quant.llm_int8 import LLMInt8Config
from leanfm.models.int8_layers import Int8OutlierLinear

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_llm_int8_end_to_end(tiny_model, variant):
    model = tiny_model(variant)
    ref = logits(model, IDS)
    report = compress_(model, LLMInt8Config(), progress=False)
    assert report.steps[0]["modules"] == 7 * len(model.model.layers)
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    assert all(isinstance(m, Int8OutlierLinear) and m.threshold == 6.0 for m in linears)
    out = logits(model, IDS)
    assert rel_error(out, ref) < 0.03
    assert torch.equal(logits(rebuild(tiny_model(variant, seed=3), model), IDS), out)


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_outlier_path_helps_with_outlier_channels(tiny_model, variant):
    """Activation outliers (3 hidden channels 40x): threshold 6 errs less than pure int8 (no outlier path)."""
    ref = logits(with_outliers(tiny_model(variant)), IDS)
    errs = {}
    for threshold in (6.0, 1e9):
        model = with_outliers(tiny_model(variant))
        compress_(model, LLMInt8Config(threshold=threshold), progress=False)
        errs[threshold] = rel_error(logits(model, IDS), ref)
    assert errs[6.0] < 0.8 * errs[1e9]


def test_llm_int8_config_errors():
    with pytest.raises(ConfigError, match="threshold"):
        LLMInt8Config(threshold=0.0)
    with pytest.raises(ConfigError, match="threshold"):
        LLMInt8Config(threshold=float("nan"))
