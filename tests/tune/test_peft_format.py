"""PEFT-format adapters: leanfm -> peft on the transformers model and peft -> leanfm give the same logits;
atomic saves; adapters for another base model are refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from leanfm.checkpoint.hf import save_hf_dir
from leanfm.tune import (
    AdapterError,
    BitFitConfig,
    BottleneckConfig,
    DoraConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    add_adapter,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from leanfm.tune.peft_format import WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("single_thread")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
IDS = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))

CASES = {
    "lora": ("gemma3", LoraConfig(r=4, alpha=8)),
    "lora_rslora": ("llama", LoraConfig(r=4, alpha=8, rslora=True)),
    "lora_pissa": ("llama", LoraConfig(r=4, alpha=8, init="pissa")),
    "dora": ("gemma3", DoraConfig(r=4, alpha=8)),
    "ia3": ("gemma3", IA3Config()),
    "prompt": ("gemma3", PromptTuningConfig(num_virtual_tokens=3)),
    "prefix": ("llama", PrefixTuningConfig(num_virtual_tokens=3)),
}


def leanfm_logits(model):
    with torch.no_grad():
        return model.compute_logits(model(IDS, torch.arange(IDS.shape[1])))


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits[:, -IDS.shape[1]:]


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {v: save_hf_dir(make_tiny_model(v), root / v) for v in ("llama", "gemma3")}


def hf_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("key", sorted(CASES))
def test_leanfm_adapter_loads_in_peft(key, base_dirs, tmp_path):
    variant, config = CASES[key]
    model = make_tiny_model(variant)
    add_adapter(model, config)
    perturb(model)
    out = save_adapter(model, tmp_path / "adapter", base_model=str(base_dirs[variant]))
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == config.peft_type
    if key.startswith("lora"):
        from safetensors import safe_open

        with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
            assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    tuned = peft.PeftModel.from_pretrained(hf_base(base_dirs[variant]), str(out)).eval()
    torch.testing.assert_close(hf_logits(tuned), leanfm_logits(model), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("key", ["lora", "dora", "ia3", "prompt", "prefix"])
def test_peft_adapter_loads_in_leanfm(key, base_dirs, tmp_path):
    variant = CASES[key][0]
    peft_configs = {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                init_lora_weights=False),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_dora=True,
                                init_lora_weights=False),
        "ia3": peft.IA3Config(target_modules=["k_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"],
                              init_ia3_weights=False),
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    torch.manual_seed(0)
    tuned = peft.get_peft_model(hf_base(base_dirs[variant]), peft_configs[key]).eval()
    tuned.save_pretrained(tmp_path / "p")
    model = make_tiny_model(variant)
    load_adapter(model, tmp_path / "p")
    torch.testing.assert_close(leanfm_logits(model), hf_logits(tuned), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("config", [BottleneckConfig(size=4), BitFitConfig(), DoraConfig(r=2, init="pissa")])
def test_leanfm_only_methods_round_trip(config, tmp_path):
    model = make_tiny_model("gemma3")
    add_adapter(model, config)
    perturb(model)
    save_adapter(model, tmp_path / "a")
    other = make_tiny_model("gemma3")
    load_adapter(other, tmp_path / "a")
    torch.testing.assert_close(leanfm_logits(other), leanfm_logits(model), atol=1e-5, rtol=1e-5)


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    add_adapter(model, LoraConfig(r=2))
    out = save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="exists"):
        save_adapter(model, out)
    import leanfm.tune.peft_format as pf

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pf, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_adapter(model, tmp_path / "b")
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == ["a"]


def test_adapter_for_another_base_is_refused(tmp_path):
    model = make_tiny_model("llama")
    add_adapter(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "a")
    bigger = make_tiny_model("llama", num_hidden_layers=3, hidden_size=96, head_dim=24)
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(bigger, tmp_path / "a")
    assert type(bigger).__name__ == "LlamaForCausalLM"
    (tmp_path / "a" / "leanfm_adapter.json").unlink()  # a PEFT file alone: caught by shapes
    with pytest.raises(AdapterError, match="another base model"):
        load_adapter(bigger, tmp_path / "a")
    assert type(bigger).__name__ == "LlamaForCausalLM"
    shallow = make_tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(AdapterError, match="does not have"):
        load_adapter(shallow, tmp_path / "a")


def test_peft_adapter_with_full_modules_is_refused(base_dirs, tmp_path):
    tuned = peft.get_peft_model(hf_base(base_dirs["llama"]), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                            modules_to_save=["lm_head"]))
    tuned.save_pretrained(tmp_path / "p")
    with pytest.raises(AdapterError, match="modules_to_save"):
        load_adapter(make_tiny_model("llama"), tmp_path / "p")
