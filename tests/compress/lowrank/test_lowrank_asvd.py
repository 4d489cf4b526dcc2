"""ASVDConfig (activation-scaled SVD and SVD-LLM whitening) end to end on tiny models."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from leanfm.compress import ConfigError, Step, compress_, config_from_dict
from leanfm.compress.lowrank.asvd import ASVDConfig
from leanfm.compress.lowrank.svd import SVDConfig
from leanfm.models.lowrank_layers import LowRankLinear

pytestmark = pytest.mark.usefixtures("single_thread")

_G = torch.Generator().manual_seed(5)
CALIB = torch.randint(0, 128, (8, 32), generator=_G)
HELD_OUT = torch.randint(0, 128, (4, 32), generator=_G)


def _model_with_outliers(seed=0):
    """A tiny llama whose norms blow up a few channels, as real LLM activations have outlier channels."""
    model = make_tiny_model("llama", seed=seed, num_hidden_layers=3)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64, generator=g)[:4]] *= 8.0
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def _kl(ref, out):
    return float(F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
                 / ref.shape[:-1].numel())


def test_activation_aware_beats_svd_at_equal_parameters():
    ref = _logits(_model_with_outliers(), HELD_OUT)
    errors, ratios = {}, {}
    for name, config in [("svd", SVDConfig(param_ratio=0.5)), ("asvd", ASVDConfig(param_ratio=0.5)),
                         ("whiten", ASVDConfig(param_ratio=0.5, variant="whiten"))]:
        model = _model_with_outliers()
        report = compress_(model, config, calibration=CALIB, progress=False)
        ratios[name] = report.steps[0]["param_ratio"]
        errors[name] = _kl(ref, _logits(model, HELD_OUT))
    assert len(set(ratios.values())) == 1 and ratios["svd"] <= 0.5
    assert errors["whiten"] < errors["asvd"] < errors["svd"]
    assert errors["whiten"] < 0.7 * errors["svd"]


def test_report_and_structure():
    model = _model_with_outliers()
    report = compress_(model, ASVDConfig(rank=8, variant="whiten"), calibration=CALIB, progress=False)
    s = report.steps[0]
    assert s["variant"] == "whiten" and s["modules"] == 21 and s["rank_max"] == 8
    assert s["calibration_samples"] == 8 and s["calibration_tokens"] == 8 * 32
    assert all(isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith("_proj"))


def test_needs_calibration():
    with pytest.raises(ConfigError, match="calibration"):
        compress_(_model_with_outliers(), ASVDConfig(param_ratio=0.5), progress=False)


def test_deterministic():
    a, b = _model_with_outliers(), _model_with_outliers()
    for m in (a, b):
        compress_(m, ASVDConfig(energy=0.8), calibration=CALIB, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_head_and_partial_targets():
    model = _model_with_outliers()  # llama: untied head, factored from the head step of the walk
    step = Step(ASVDConfig(param_ratio=0.4), include=("model.layers.0.mlp.*", "lm_head"))
    s = compress_(model, step, calibration=CALIB, progress=False).steps[0]
    assert s["modules"] == 4 and isinstance(model.lm_head, LowRankLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)
    assert torch.isfinite(_logits(model, HELD_OUT)).all()
    tied = make_tiny_model("gemma3")
    step = Step(ASVDConfig(param_ratio=0.4), include=("model.layers.1.self_attn.q_proj", "lm_head"))
    s = compress_(tied, step, calibration=CALIB, progress=False).steps[0]
    assert s["modules"] == 1 and "tied" in s["left_dense"]["lm_head"]


def test_energy_measures_the_scaled_spectrum():
    ref = _logits(_model_with_outliers(), HELD_OUT)
    kls = []
    for energy in (0.5, 0.9, 0.99):
        model = _model_with_outliers()
        compress_(model, ASVDConfig(energy=energy, variant="whiten"), calibration=CALIB, progress=False)
        kls.append(_kl(ref, _logits(model, HELD_OUT)))
    assert kls[0] > kls[1] > kls[2]


@pytest.mark.parametrize("bad,match", [
    ({"param_ratio": 0.5, "variant": "svdllm"}, "variant must be"),
    ({"param_ratio": 0.5, "alpha": 2.0}, "alpha must be"),
    ({"param_ratio": 0.5, "damp": -1.0}, "damp must be"),
    ({"variant": "whiten"}, "exactly one of"),
])
def test_bad_asvd_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"method": "asvd", **bad})


def test_stats_share_work_only_for_the_same_input():
    from leanfm.compress.lowrank.asvd import _Stats

    memo: dict = {}
    a, b = _Stats(True, memo), _Stats(True, memo)
    x, y = torch.randn(10, 4), torch.randn(10, 4)
    a(x), b(x.reshape(-1, 4))  # same storage: computed once
    assert memo[True][1] is not None and torch.equal(a.total, b.total)
    a(y)
    torch.testing.assert_close(a.mean(), ((x.T @ x + y.T @ y) / 20).double())
    torch.testing.assert_close(b.mean(), (x.T @ x / 10).double())
