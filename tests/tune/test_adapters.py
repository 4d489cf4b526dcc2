"""Adapters on tiny models: identity at init, gradients only to the adapter, merge/unmerge, several
named adapters, deletion, target errors. Table-driven over every method."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from leanfm.models.quant_layers import QuantLinear
from leanfm.tune import (
    AdapterError,
    BitFitConfig,
    BottleneckConfig,
    DoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoraConfig,
    adapter_state_dict,
    add_adapter,
    config_from_dict,
    delete_adapter,
    load_adapter_state_dict,
    merge_,
    set_adapter,
    trainable_parameters,
    unmerge_,
)

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(0))

CONFIGS = {
    "lora": LoraConfig(r=4, alpha=8),
    "lora_rs_gauss": LoraConfig(r=4, alpha=8, rslora=True, init="gaussian"),
    "lora_pissa": LoraConfig(r=4, alpha=8, init="pissa"),
    "dora": DoraConfig(r=4, alpha=8),
    "qlora": QLoraConfig(r=4, alpha=8, bits=4, group_size=32, head_bits=8),
    "ia3": IA3Config(),
    "bottleneck": BottleneckConfig(size=8),
    "bitfit": BitFitConfig(),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3),
}
MERGEABLE = ["lora", "lora_rs_gauss", "lora_pissa", "dora", "ia3", "bitfit"]


def logits(model, ids=IDS):
    return model.compute_logits(model(ids, torch.arange(ids.shape[1])))


def perturb(model):
    """Move every adapter parameter away from its (often identity) init."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_identity_at_init_and_inactive(key, variant):
    model = make_tiny_model(variant)
    config = CONFIGS[key]
    if key == "qlora":  # the reference is the quantized base itself
        add_adapter(model, config)
        set_adapter(model, None)
    with torch.no_grad():
        base = logits(model)
    if key != "qlora":
        add_adapter(model, config)
    set_adapter(model, "default")
    with torch.no_grad():
        out = logits(model)
        if config.identity_at_init:
            torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(out, base)
        perturb(model)
        assert not torch.allclose(logits(model), base, atol=1e-4)
        set_adapter(model, None)
        if key != "lora_pissa":  # PiSSA's base holds the residual W - sBA until the adapter is deleted
            torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_gradients_reach_only_the_adapter(key):
    model = make_tiny_model("gemma3").train()
    add_adapter(model, CONFIGS[key])
    perturb(model)  # LoRA's B = 0 would leave A without gradient
    logits(model).logsumexp(-1).mean().backward()
    adapter = {n for n, _ in model.named_parameters() if ".adapters.default." in n or "virtual_tokens." in n}
    assert adapter
    for n, p in model.named_parameters():
        if n in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_qlora_base_stays_packed():
    model = make_tiny_model("gemma3").train()
    add_adapter(model, CONFIGS["qlora"])
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 6 * 7 + 1  # every decoder linear and the tied head
    assert all(m.qweight.dtype == torch.uint8 and not m.qweight.requires_grad for m in quant)
    assert not any(p.dtype.is_floating_point and p.numel() >= 64 * 64 and p.requires_grad
                   for n, p in model.named_parameters() if "adapters" not in n)


@pytest.mark.parametrize("key", MERGEABLE)
def test_merge_then_unmerge_restores_the_base(key):
    model = make_tiny_model("llama")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, CONFIGS[key])
    perturb(model)
    with torch.no_grad():
        adapted = logits(model)
        merge_(model)
        torch.testing.assert_close(logits(model), adapted, atol=1e-4, rtol=1e-4)
        unmerge_(model)
        torch.testing.assert_close(logits(model), adapted, atol=1e-4, rtol=1e-4)
    delete_adapter(model, "default")
    state = model.state_dict()
    assert set(state) == set(base_state)
    for k, v in base_state.items():
        torch.testing.assert_close(state[k], v, atol=1e-5, rtol=1e-5)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("key", ["bottleneck", "prompt", "prefix", "qlora"])
def test_unmergeable_methods_say_so(key):
    model = make_tiny_model("llama")
    add_adapter(model, CONFIGS[key])
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_(model)


def test_several_named_adapters():
    model = make_tiny_model("llama")
    with torch.no_grad():
        base = logits(model)
    add_adapter(model, LoraConfig(r=4), name="a")
    perturb(model)
    add_adapter(model, IA3Config(), name="b")
    perturb(model)
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=2), name="c", activate=False)
    with torch.no_grad():
        out_b = logits(model)
        set_adapter(model, "a")
        out_a = logits(model)
        set_adapter(model, "c")
        out_c = logits(model)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, out_c)
    set_adapter(model, "a")
    assert {n.split(".adapters.")[1].split(".")[0] for n in adapter_state_dict(model)} == {"a"}
    assert all(".adapters.a." in n for n, p in model.named_parameters() if p.requires_grad)
    for name in ("a", "b", "c"):
        delete_adapter(model, name)
    with torch.no_grad():
        torch.testing.assert_close(logits(model), base)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_state_dict_round_trip():
    a, b = make_tiny_model("gemma3"), make_tiny_model("gemma3")
    add_adapter(a, DoraConfig(r=4))
    perturb(a)
    add_adapter(b, DoraConfig(r=4), seed=5)
    load_adapter_state_dict(b, adapter_state_dict(a))
    with torch.no_grad():
        torch.testing.assert_close(logits(a), logits(b))
    c = make_tiny_model("gemma3")
    add_adapter(c, DoraConfig(r=8))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_state_dict(c, adapter_state_dict(a))


@pytest.mark.parametrize("patterns, match", [
    (("model.layers.*.attn.q",), "matches no module"),
    (("model.layers.*.mlp",), "matches no linear layer"),
    (("lm_head",), "tied"),
])
def test_target_errors_change_nothing(patterns, match):
    model = make_tiny_model("gemma3")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        add_adapter(model, LoraConfig(target_modules=patterns))
    assert set(model.state_dict()) == set(state) and type(model).__name__ == "GemmaForCausalLM"


@pytest.mark.parametrize("bad, match", [
    ({"method": "lora", "r": 0}, "r must be"),
    ({"method": "lora", "init": "olora"}, "init must be"),
    ({"method": "lora", "rank": 4}, "unknown option"),
    ({"method": "qlora", "bits": 3}, "bits"),
    ({"method": "prompt", "target_modules": ["x"]}, "whole model"),
    ({"method": "nope"}, "unknown adapter method"),
])
def test_bad_configs(bad, match):
    with pytest.raises(AdapterError, match=match):
        config_from_dict(bad)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_config_json_round_trip(key):
    import json

    config = CONFIGS[key]
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
