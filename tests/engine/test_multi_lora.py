"""Multi-LoRA serving: requests for different adapters (and the base) in one batch each get what the model
with that adapter alone gives; adapters load and unload at run time; the prefix cache keeps them apart."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
import torch
from engine_testing import engine_model, make_engine, prompt_ids, reference

from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams
from leanfm.tune import LoraConfig, adapter_parameters, add_adapter, load_adapter, save_adapter
from leanfm.utils.errors import LeanfmError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def make_adapter(base, path, seed: int, config=None, name: str = "a"):
    """An adapter saved at `path` whose factors (A and B) are both random, so it changes the output."""
    model = copy.deepcopy(base)
    add_adapter(model, config or LoraConfig(r=4, alpha=8), name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, path, name)


def offline(base, path, prompt, params=GREEDY):
    """The model with the adapter alone (leanfm.tune, unmerged) through the plain Generator."""
    model = copy.deepcopy(base)
    if path is not None:
        load_adapter(model, path)
    return reference(model, [prompt], params)[0]


@pytest.fixture(scope="module")
def llama():
    return engine_model("llama")


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"A": make_adapter(llama, root / "a", 1),
            "B": make_adapter(llama, root / "b", 2, LoraConfig(r=2, alpha=4, rslora=True,
                                                               target_modules=("model.layers.*.mlp.*_proj",))),
            "dora": make_adapter(llama, root / "dora", 3, _dora()),
            "ia3": _ia3(llama, root / "ia3")}


def _dora():
    from leanfm.tune import DoraConfig

    return DoraConfig(r=2)


def _ia3(base, path):
    from leanfm.tune import IA3Config

    model = copy.deepcopy(base)
    add_adapter(model, IA3Config())
    return save_adapter(model, path)


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_one_batch_of_adapters_matches_each_adapter_alone(variant, llama, adapters, tmp_path):
    base = llama if variant == "llama" else engine_model("gemma3")
    paths = adapters if variant == "llama" else {"A": make_adapter(base, tmp_path / "a", 1),
                                                 "B": make_adapter(base, tmp_path / "b", 2)}
    prompts = [prompt_ids(21, 1), prompt_ids(6, 2), prompt_ids(30, 3), prompt_ids(9, 4)]
    names = ["A", "B", None, "A"]
    refs = [offline(base, None if a is None else paths[a], p) for p, a in zip(prompts, names, strict=True)]
    assert len({tuple(r) for r in refs[:3]}) == 3  # the adapters do change the output
    # a small token budget mixes prefill chunks and decodes of different adapters in the same steps
    core = make_engine(base, max_num_batched_tokens=16, num_blocks=64)
    for name in ("A", "B"):
        core.load_adapter(name, paths[name])
    reqs = [core.add_request(p, GREEDY, adapter=a) for p, a in zip(prompts, names, strict=True)]
    while core.has_unfinished:
        core.step()
    assert [r.output_token_ids for r in reqs] == refs


def test_fused_kernels_still_serve_each_adapter(adapters):
    """With leanfm's kernels on (prepare_for_inference), a host layer with no rows this step runs fused as
    its base form, one with rows runs its own forward."""
    from leanfm.engine.runtime import prepare_for_inference

    base = engine_model("llama")
    prepared = prepare_for_inference(copy.deepcopy(base), fast_kernels=True)
    prompts = [prompt_ids(9, 11), prompt_ids(15, 12), prompt_ids(5, 13)]
    names = ["A", None, "B"]
    llm = LLM(prepared, adapters={"A": adapters["A"], "B": adapters["B"]})
    outs = llm.generate(prompts, GREEDY, adapter=names)
    assert [o.token_ids for o in outs] == [offline(base, adapters[a] if a else None, p)
                                           for p, a in zip(prompts, names, strict=True)]
    assert llm.generate(prompts[1], GREEDY)[0].token_ids == outs[1].token_ids


@pytest.mark.parametrize("spec", [{"method": "ngram", "num_speculative_tokens": 3},
                                  {"method": "layer_skip", "skip_layers": (1,), "num_speculative_tokens": 2}])
def test_speculative_decoding_verifies_with_the_adapter(adapters, spec):
    """Drafts come from the base (n-grams, or the base's own layers); verification runs the adapter, so the
    output is still the adapter's."""
    base = engine_model("llama")
    prompt = [1, *([7, 8, 9, 10] * 5)]  # repetitive: the n-gram proposer has something to propose
    llm = LLM(base, adapters={"A": adapters["A"]}, speculative=spec)
    outs = llm.generate([prompt, prompt], GREEDY, adapter=["A", None])
    assert [o.token_ids for o in outs] == [offline(base, adapters["A"], prompt), offline(base, None, prompt)]
    assert llm.stats().spec_verify_steps > 0


def test_llm_api_and_per_prompt_adapters(llama, adapters):
    prompts = [prompt_ids(12, 5), prompt_ids(12, 5), prompt_ids(12, 5)]
    llm = LLM(llama, adapters={"A": adapters["A"], "B": adapters["B"]})
    assert sorted(llm.adapters) == ["A", "B"] and llm.adapters["B"].r == 2
    outs = llm.generate(prompts, GREEDY, adapter=["A", None, "B"])
    want = [offline(llama, adapters[a] if a else None, p) for p, a in zip(prompts, ["A", None, "B"], strict=True)]
    assert [o.token_ids for o in outs] == want
    assert llm.generate(prompts[0], GREEDY, adapter="B")[0].token_ids == want[2]
    assert [o.token_ids for o in llm.stream(prompts[0], GREEDY, adapter="A")][-1] == want[0]
    with pytest.raises(LeanfmError, match="no adapter named 'C' is loaded"):
        llm.generate(prompts[0], GREEDY, adapter="C")
    with pytest.raises(LeanfmError, match="adapter has 2 entries for 3 prompts"):
        llm.generate(prompts, GREEDY, adapter=["A", "B"])


def test_load_and_unload_at_run_time(llama, adapters):
    prompt = prompt_ids(10, 6)
    llama = engine_model("llama")  # the same weights, without the adapters other tests installed
    llm = LLM(llama)
    llm.load_adapter("A", str(adapters["A"]))
    assert llm.generate(prompt, GREEDY, adapter="A")[0].token_ids == offline(llama, adapters["A"], prompt)
    with pytest.raises(LeanfmError, match="already loaded"):
        llm.load_adapter("A", adapters["B"])
    req = llm.engine.add_request(prompt, GREEDY, adapter="A")
    with pytest.raises(LeanfmError, match="in use by 1 request"):
        llm.unload_adapter("A")
    llm.engine.abort(req.request_id)
    llm.unload_adapter("A")
    assert llm.adapters == {} and not any("MultiLora" in type(m).__name__ for m in llama.modules())
    assert llm.generate(prompt, GREEDY)[0].token_ids == offline(llama, None, prompt)
    with pytest.raises(LeanfmError, match="no adapter named 'A'"):
        llm.unload_adapter("A")


def test_prefix_cache_is_not_shared_across_adapters(llama, adapters):
    prompt = prompt_ids(40, 7)  # two full blocks of 16 can come from the cache
    llm = LLM(llama, adapters={"A": adapters["A"], "B": adapters["B"]})
    runs = [("A", 0), ("B", 0), (None, 0), ("A", 32), (None, 32)]
    for name, cached in runs:
        out = llm.generate(prompt, GREEDY, adapter=name)[0]
        assert out.metrics.num_cached_tokens == cached, name
        assert out.token_ids == offline(llama, adapters[name] if name else None, prompt), name
    # the same name loaded again with other weights: its old KV is not reused
    llm.unload_adapter("A")
    llm.load_adapter("A", adapters["B"])
    out = llm.generate(prompt, GREEDY, adapter="A")[0]
    assert out.metrics.num_cached_tokens == 0 and out.token_ids == offline(llama, adapters["B"], prompt)


def test_pissa_and_qlora_saves_serve_as_plain_lora(llama, tmp_path):
    """leanfm saves PiSSA as a rank-2r delta over the original base and QLoRA as plain LoRA: both serve."""
    from leanfm.tune import QLoraConfig

    pissa = make_adapter(llama, tmp_path / "pissa", 5, LoraConfig(r=2, alpha=4, init="pissa"))
    qlora = make_adapter(llama, tmp_path / "qlora", 6, QLoraConfig(r=2, alpha=4, head_bits=None))
    prompt = prompt_ids(13, 10)
    llm = LLM(llama, adapters={"p": pissa, "q": qlora})
    assert llm.adapters["p"].r == 4
    outs = llm.generate([prompt, prompt], GREEDY, adapter=["p", "q"])
    assert [o.token_ids for o in outs] == [offline(llama, pissa, prompt), offline(llama, qlora, prompt)]


def test_quantized_base(llama, adapters):
    """The delta goes on top of whatever the base layer computes (here packed int4 weights)."""
    from leanfm.tune.qlora import quantize_base_

    base = copy.deepcopy(llama)
    quantize_base_(base, 4, 32, ("model.layers.*",), None)
    prompt = prompt_ids(14, 8)
    llm = LLM(base, adapters={"A": adapters["A"]})
    outs = llm.generate([prompt, prompt], GREEDY, adapter=["A", None])
    assert outs[0].token_ids == offline(base, adapters["A"], prompt)
    assert outs[1].token_ids == offline(base, None, prompt)


@pytest.mark.parametrize("kind,match", [("dora", "a dora adapter, not a plain LoRA delta.*--adapter"),
                                        ("ia3", "an? ia3 adapter.*not a plain LoRA delta.*--adapter")])
def test_other_methods_are_refused(llama, adapters, kind, match):
    llm = LLM(llama)
    with pytest.raises(LeanfmError, match=match):
        llm.load_adapter("x", adapters[kind])
    assert llm.adapters == {}


def test_adapter_for_another_base_is_refused(llama, adapters, tmp_path):
    other = make_adapter(engine_model("gemma3"), tmp_path / "g", 4)
    with pytest.raises(LeanfmError, match="made for another base model"):
        LLM(llama, adapters={"g": other})
    # a PEFT-made adapter (no leanfm metadata) naming a layer the model lacks
    (adapters["A"].parent / "peft").mkdir(exist_ok=True)
    peft_dir = adapters["A"].parent / "peft"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapters["A"] / "adapter_model.safetensors"))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    config = json.loads((adapters["A"] / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LeanfmError, match="targets model.layers.7.*which this model does not have"):
        LLM(llama, adapters={"p": peft_dir})
    with pytest.raises(LeanfmError, match="not an adapter directory"):
        LLM(llama, adapters={"p": tmp_path})
    with pytest.raises(LeanfmError, match="adapter name"):
        LLM(llama, adapters={"bad name": adapters["A"]})


def test_async_llm_adapters(llama, adapters):
    from leanfm.engine.async_llm import AsyncLLM

    prompt = prompt_ids(11, 9)

    async def run(llm, adapter):
        return [o async for o in llm.generate(prompt, GREEDY, adapter=adapter)][-1].token_ids

    async def both(llm):
        return await asyncio.gather(run(llm, "A"), run(llm, "B"), run(llm, None))

    with AsyncLLM(llama, adapters={"A": adapters["A"]}) as llm:
        llm.load_adapter("B", adapters["B"])
        got = asyncio.run(both(llm))
        assert got == [offline(llama, adapters[a] if a else None, prompt) for a in ("A", "B", None)]
        llm.unload_adapter("B")
        assert sorted(llm.adapters) == ["A"]
        with pytest.raises(LeanfmError, match="no adapter named 'B'"):
            asyncio.run(run(llm, "B"))
