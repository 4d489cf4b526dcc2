"""GPTQ: the pure algorithm against RTN and a naive OBS reference; the handler end to end on tiny models."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import calib_tokens, logits, rebuild, rel_error

from leanfm.compress import ConfigError, Step, compress_
from leanfm.compress.quant.gptq import GPTQConfig, gptq_quantize
from leanfm.compress.quant.rtn import RTNConfig
from leanfm.models.quant_layers import QuantEmbedding, QuantLinear
from leanfm.ops.quant import dequantize, quantize, scales_zeros_from_range

pytestmark = pytest.mark.usefixtures("single_thread")


def _correlated_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return torch.randn(t, k, generator=g) @ mix * (torch.rand(k, generator=g) * 3 + 0.1)


def _layer_error(x, w, codes, s, z) -> float:
    return float((x @ w.T - x @ dequantize(codes, s, z).T).norm())


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstruction_error_below_rtn(bits, group_size, act_order):
    x = _correlated_inputs(1024, 128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) / 128**0.5
    h = 2 * x.T @ x / x.shape[0]
    codes, s, z = gptq_quantize(w, h, bits, group_size, True, act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
    err_gptq = _layer_error(x, w, codes, s, z)
    err_rtn = _layer_error(x, w, *quantize(w, bits, group_size, True))
    assert err_gptq < 0.9 * err_rtn


def _naive_obs(w: torch.Tensor, h: torch.Tensor, bits: int, damp: float) -> torch.Tensor:
    """The paper's un-blocked form: quantize column j, spread its error with the inverse Hessian, then
    remove j from the inverse (Gaussian elimination). Per-channel, symmetric, scales from the original w."""
    w = w.double().clone()
    h = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    s, z = scales_zeros_from_range(w.float().amin(1), w.float().amax(1), bits, True)
    s, z = s.double(), z.double()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for j in range(w.shape[1]):
        q = (torch.round(w[:, j] / s) + z).clamp(0, 2**bits - 1)
        codes[:, j] = q.to(torch.uint8)
        err = (w[:, j] - (q - z) * s) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_gptq_matches_naive_reference(block_size):
    x = _correlated_inputs(512, 64, seed=2)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) / 8
    h = 2 * x.T @ x / x.shape[0]
    codes, s, z = gptq_quantize(w, h, 4, None, True, False, 0.01, block_size)
    ref = _naive_obs(w, h, 4, 0.01)
    assert (codes == ref).float().mean() > 0.99  # fp32 vs fp64 may flip a rare tie


def test_gptq_dead_columns_and_groups_in_original_order():
    x = _correlated_inputs(256, 64, seed=4)
    x[:, [5, 40]] = 0.0  # inputs that never fire
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    h = 2 * x.T @ x / x.shape[0]
    for act_order in (False, True):
        codes, s, z = gptq_quantize(w, h, 4, 16, False, act_order)
        assert torch.isfinite(s).all() and s.shape == (16, 4)
        deq = dequantize(codes, s, z)
        assert torch.equal(deq[:, [5, 40]], torch.zeros(16, 2))
    # act_order with static groups: each group's range is its original-order columns' range
    codes, s, z = gptq_quantize(w, h, 4, 16, True, True)
    ref_s, _ = scales_zeros_from_range(w.reshape(16, 4, 16).amin(-1), w.reshape(16, 4, 16).amax(-1), 4, True)
    w_dead = w.clone()
    w_dead[:, [5, 40]] = 0
    ref_s, _ = scales_zeros_from_range(w_dead.reshape(16, 4, 16).amin(-1), w_dead.reshape(16, 4, 16).amax(-1),
                                       4, True)
    assert torch.allclose(s, ref_s)


def test_gptq_config_errors():
    with pytest.raises(ConfigError, match="damp_percent"):
        GPTQConfig(damp_percent=0.0)
    with pytest.raises(ConfigError, match="block_size"):
        GPTQConfig(block_size=0)
    with pytest.raises(ConfigError, match="calibration"):
        compress_(torch.nn.Module(), GPTQConfig())


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_gptq_end_to_end(tiny_model, variant):
    calib = calib_tokens()
    ref_model = tiny_model(variant)
    ref = logits(ref_model, calib)
    errs = {}
    for name, cfg in (("rtn", RTNConfig(bits=4, group_size=32)), ("gptq", GPTQConfig(bits=4, group_size=32))):
        model = tiny_model(variant)
        compress_(model, cfg, calibration=calib, progress=False)
        linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
        assert linears and all(isinstance(m, QuantLinear) for m in linears)
        assert type(model.lm_head) is torch.nn.Linear
        errs[name] = rel_error(logits(model, calib), ref)
    assert torch.equal(logits(rebuild(tiny_model(variant, seed=2), model), calib), logits(model, calib))
    assert errs["gptq"] < 0.25
    assert errs["gptq"] < errs["rtn"]


def test_gptq_head_and_tied_embedding(tiny_model):
    model = tiny_model("gemma3")
    calib = calib_tokens()
    ref = logits(model, calib)
    step = Step(GPTQConfig(bits=8, group_size=32, act_order=True), include=("model.layers.*", "lm_head"))
    compress_(model, step, calibration=calib, progress=False)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.tied
    assert model.model.embed_tokens.qweight is model.lm_head.qweight
    out = logits(model, calib)
    assert rel_error(out, ref) < 0.02


def test_gptq_deterministic(tiny_model):
    calib = calib_tokens(seed=1)
    states = []
    for _ in range(2):
        model = tiny_model("llama")
        compress_(model, GPTQConfig(bits=4, group_size=32, act_order=True), calibration=calib, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
