"""leanfm.models.fusion: a prepared model (fused decode paths + FastLinear) computes what the plain one does.

Every tiny family, fp32: full forward and token-by-token decoding through the KV cache (batch 1 and 2),
quantized layers in both activation modes, and the fallbacks (hooks, flag off = bit-exact plain model).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model

from leanfm.compress import Step, compress_, config_from_dict
from leanfm.engine.runtime import prepare_for_inference
from leanfm.models import ContiguousKVCache, KVCacheMeta
from leanfm.models.fusion import use_fused
from leanfm.models.sparse_layers import SparseLinear
from leanfm.ops import kernels
from leanfm.ops.kernels import quant

pytestmark = pytest.mark.usefixtures("single_thread")
T = 20


@torch.no_grad()
def run(model, ids, steps):
    """Logits of ids fed in chunks of `steps` tokens through a KV cache."""
    cache = ContiguousKVCache(model.config, batch=ids.shape[0], max_len=ids.shape[1], dtype=torch.float32)
    out, pos = [], 0
    for n in steps:
        h = model(ids[:, pos:pos + n], torch.arange(pos, pos + n), KVCacheMeta(cache, pos))
        out.append(model.compute_logits(h))
        pos += n
    return torch.cat(out, dim=1)


def pair(variant, **kw):
    plain = make_tiny_model(variant, seed=3, **kw)
    return plain, prepare_for_inference(copy.deepcopy(plain), fast_kernels=True)


STEPS = [8] + [1] * (T - 8)  # a prefill, then decode steps (sliding layers cross their window of 8)


def test_fused_flags_are_set_and_cleared():
    plain, fast = pair("gemma3")
    assert not plain.fused and fast.fused and fast.model.layers[0].self_attn.fused
    n = use_fused(fast, False)
    assert n == 1 + 6 * (1 + 1 + 1 + 4 + 2) + 1  # model, blocks, attn, mlp, 4 block norms + qk norms, final norm
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = plain.compute_logits(plain(ids, torch.arange(T)))
        fast_plain_linear = fast.compute_logits(fast(ids, torch.arange(T)))
    torch.testing.assert_close(fast_plain_linear, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_prepared_model_matches_plain(tiny_variant, batch):
    plain, fast = pair(tiny_variant)
    ids = torch.randint(0, 128, (batch, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain.compute_logits(plain(ids, torch.arange(T)))
        full = fast.compute_logits(fast(ids, torch.arange(T)))
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(fast, ids, STEPS), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", quant.ACT_MODES)
@pytest.mark.parametrize("bits,group", [(8, -1), (4, 32)])
def test_prepared_quantized_model_matches_plain(bits, group, act):
    plain = make_tiny_model("gemma3", seed=4)
    step = Step(config_from_dict({"method": "rtn", "bits": bits, "group_size": group}),
                include=("model.layers.*", "lm_head"))
    compress_(plain, step, progress=False)
    fast = prepare_for_inference(copy.deepcopy(plain), fast_kernels=True)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(2))
    old = quant.set_activation_mode(act)
    try:
        with torch.no_grad():
            ref = plain.compute_logits(plain(ids, torch.arange(T)))
        got = run(fast, ids, STEPS)
    finally:
        quant.set_activation_mode(old)
    tol = 1e-4 if act == "fp32" else 0.05 * ref.abs().max().item()  # int8 activations: a small perturbation
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=tol)
    if act == "int8":
        assert (got - ref).abs().max() > 0 or not kernels.kernels_available()


def test_decode_steps_run_one_kernel_per_block(tiny_variant):
    plain, fast = pair(tiny_variant)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(5))
    run(fast, ids, STEPS)
    if kernels.kernels_available():
        assert all(layer.__dict__["_decode_plan"].ok for layer in fast.model.layers), tiny_variant


def test_decode_plan_follows_module_replacement():
    plain, fast = pair("qwen3")
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(6))
    run(fast, ids, STEPS)  # plans built
    for model in (plain, fast):  # then the MLP of layer 1 and a norm weight change under the plans
        compress_(model, Step(config_from_dict({"method": "rtn", "bits": 8, "group_size": 32}),
                              include=("model.layers.1.mlp.*",)), progress=False)
        model.model.layers[0].input_layernorm.weight = torch.nn.Parameter(
            model.model.layers[0].input_layernorm.weight.detach() * 1.5, requires_grad=False)
    with torch.no_grad():
        ref = plain.compute_logits(plain(ids, torch.arange(T)))
    torch.testing.assert_close(run(fast, ids, STEPS), ref, rtol=1e-4, atol=1e-4)


def test_hooks_disable_fusion_of_the_hooked_modules():
    plain, fast = pair("llama")
    seen = []
    layer = fast.model.layers[0]
    handles = [fast.model.layers[1].register_forward_hook(lambda m, a, o: seen.append("block")),
               layer.self_attn.k_proj.register_forward_pre_hook(lambda m, a: seen.append("k")),
               layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append("norm")),
               layer.mlp.up_proj.register_forward_hook(lambda m, a, o: seen.append("up"))]
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(3))
    try:
        got = run(fast, ids, [T - 2, 1, 1])
    finally:
        for h in handles:
            h.remove()
    assert seen.count("k") == 3 and seen.count("norm") == 3 and seen.count("up") == 3 and seen.count("block") == 3
    with torch.no_grad():
        ref = plain.compute_logits(plain(ids, torch.arange(T)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_no_kernels_prepared_model_is_exact(monkeypatch):
    monkeypatch.setenv("LEANFM_KERNELS", "0")
    kernels.reload_settings()
    try:
        plain, fast = pair("gemma3")  # flags set, kernels off: every fused path takes its reference
        ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            ref = plain.compute_logits(plain(ids, torch.arange(T)))
        torch.testing.assert_close(run(fast, ids, STEPS), ref, rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        kernels.reload_settings()


@pytest.mark.parametrize("act", quant.ACT_MODES)
def test_decode_plan_matches_module_path_with_quantized_and_bf16_layers(act):
    """The one-call block against the same prepared model with fusion off (each layer its own kernel)."""
    model = make_tiny_model("gemma3", seed=7)
    compress_(model, Step(config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}),
                          include=("model.layers.0.*", "model.layers.2.mlp.*")), progress=False)
    compress_(model, Step(config_from_dict({"method": "rtn", "bits": 8, "group_size": -1}),
                          include=("model.layers.1.*",)), progress=False)
    prepare_for_inference(model, fast_kernels=True)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # bf16 weights under fp32 activations
        lin = getattr(model.model.layers[3].self_attn, name)
        lin.weight.data = lin.weight.data.bfloat16()
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(8))
    old = quant.set_activation_mode(act)
    try:
        got = run(model, ids, STEPS)
        if kernels.kernels_available():
            assert all(layer.__dict__["_decode_plan"].ok for layer in model.model.layers)
        use_fused(model, False)
        ref = run(model, ids, STEPS)
    finally:
        quant.set_activation_mode(old)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def _sparse24(model, include, bf16_values=()):
    """2:4-prune and pack the matching projections (magnitude); bf16_values: SparseLinear names whose
    kept values become bf16."""
    compress_(model, Step(config_from_dict({"method": "magnitude", "sparsity": 0.5, "pattern": "2:4", "pack": True}),
                          include=include), progress=False)
    for name in bf16_values:
        lin = model.get_submodule(name)
        assert isinstance(lin, SparseLinear)
        lin.values = lin.values.bfloat16()
    return model


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", ["gemma3", "llama", "qwen2"])
def test_decode_plan_runs_2of4_sparse_layers(variant, batch):
    """Every projection 2:4-packed: the one-call block equals the module path (fusion off), and the
    prepared model still equals the plain one."""
    plain = _sparse24(make_tiny_model(variant, seed=9), ("model.layers.*",))
    assert isinstance(plain.model.layers[0].self_attn.q_proj, SparseLinear)
    fast = prepare_for_inference(copy.deepcopy(plain), fast_kernels=True)
    ids = torch.randint(0, 128, (batch, T), generator=torch.Generator().manual_seed(10))
    got = run(fast, ids, STEPS)
    if kernels.kernels_available():
        assert all(layer.__dict__["_decode_plan"].ok for layer in fast.model.layers), variant
    with torch.no_grad():
        ref = plain.compute_logits(plain(ids, torch.arange(T)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    use_fused(fast, False)
    torch.testing.assert_close(got, run(fast, ids, STEPS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_plan_with_mixed_sparse_dense_and_quantized_blocks(batch):
    """Blocks mixing 2:4 (fp32 and bf16 values), dense fp32 and 4-bit projections, inside q/k/v and inside
    gate/up: the one-call block against the module path."""
    model = make_tiny_model("gemma3", seed=11)
    _sparse24(model, ("model.layers.0.*", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj",
                      "model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.v_proj",
                      "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj", "model.layers.4.mlp.*"),
              bf16_values=("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                           "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj",
                           "model.layers.0.mlp.up_proj", "model.layers.4.mlp.down_proj"))
    compress_(model, Step(config_from_dict({"method": "rtn", "bits": 4, "group_size": 32}),
                          include=("model.layers.3.*", "model.layers.4.self_attn.*")), progress=False)
    prepare_for_inference(model, fast_kernels=True)
    kinds = {type(m).__name__ for m in model.model.layers[1].modules()}
    assert {"SparseLinear", "FastLinear"} <= kinds
    ids = torch.randint(0, 128, (batch, T), generator=torch.Generator().manual_seed(12))
    got = run(model, ids, STEPS)
    if kernels.kernels_available():
        assert all(layer.__dict__["_decode_plan"].ok for layer in model.model.layers)
    use_fused(model, False)
    torch.testing.assert_close(got, run(model, ids, STEPS), rtol=1e-4, atol=1e-4)


class _IdTokenizer:
    """Token ids as text ("3 17 ..."): enough of the tokenizer interface for the Generator."""

    stop_token_ids = ()

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def stream_decoder(self, skip_special_tokens=True):
        class Stream:
            def push(self, i):
                return f"{i} "

            def flush(self):
                return ""

        return Stream()


@pytest.mark.parametrize("variant", ["gemma3", "llama"])
def test_generator_greedy_output_with_2of4_blocks(variant):
    """Greedy decoding of a 2:4 model: the one-call blocks give the tokens the module path gives."""
    from leanfm.engine.generate import Generator
    from leanfm.engine.params import SamplingParams

    model = _sparse24(make_tiny_model(variant, seed=13), ("model.layers.*",))
    prepare_for_inference(model, fast_kernels=True)
    gen = Generator(model, _IdTokenizer())
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = gen.generate("5 9 13 7 21", params).token_ids
    if kernels.kernels_available():
        assert all(layer.__dict__["_decode_plan"].ok for layer in model.model.layers)
    use_fused(model, False)
    assert got == gen.generate("5 9 13 7 21", params).token_ids and len(got) == 24
