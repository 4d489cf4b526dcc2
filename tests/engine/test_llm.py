"""LLM: text and token-id prompts in order, per-prompt params, metrics, streaming, stop strings as the
Generator cuts them, KV sizing, and bad input as one-line errors. Plus (integration) gemma-3-270m."""

import pytest
from conftest import make_byte_tokenizer, make_tiny_config
from engine_testing import engine_model, prompt_ids, reference

from leanfm.engine.config import EngineConfig, EngineConfigError
from leanfm.engine.generate import Generator
from leanfm.engine.kv.groups import bytes_per_block, plan_kv_groups
from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return engine_model("gemma3", seed=3)


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model, make_byte_tokenizer(), block_size=4, max_model_len=128)


def test_generate_text_prompts_in_order(llm, model):
    tok = make_byte_tokenizer()
    prompts = ["hello there", "a somewhat longer prompt that crosses the window", "x"]
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference(model, [tok.encode(p) for p in prompts], GREEDY)
    for p, o in zip(prompts, outs, strict=True):
        assert o.prompt == p and o.prompt_token_ids == tok.encode(p)
        assert o.text == tok.decode(o.token_ids) and o.finish_reason == "length"
        m = o.metrics
        assert m.num_prompt_tokens == len(o.prompt_token_ids) and m.num_generated_tokens == 16
        assert 0 < m.ttft and m.arrival_time <= m.first_token_time <= m.finish_time


def test_token_id_prompts_and_per_prompt_params(llm, model):
    prompts = [prompt_ids(9, seed=1), prompt_ids(30, seed=2)]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), GREEDY]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == reference(model, prompts, params)
    assert [len(o.token_ids) for o in outs] == [5, 16]
    single = llm.generate(prompts[0], params[0])  # one prompt of token ids
    assert len(single) == 1 and single[0].token_ids == outs[0].token_ids


def test_stream_deltas_concatenate(llm):
    outs = list(llm.stream("stream me", SamplingParams(temperature=0.9, seed=4, max_tokens=12, ignore_eos=True)))
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert sum(len(o.new_token_ids) for o in outs) == len(outs[-1].token_ids) == 12
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert llm.engine.kv.pools[0].num_free == llm.engine.kv.pools[0].num_usable


def test_stop_strings_and_eos_as_the_generator_does(llm, model):
    gen = Generator(model, make_byte_tokenizer())
    full = gen.generate("stop test", GREEDY)
    stop = full.text[3:5]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=(stop,))
    ref = gen.generate("stop test", params)
    out = llm.generate("stop test", params)[0]
    assert (out.text, out.token_ids, out.finish_reason) == (ref.text, ref.token_ids, "stop")
    first = full.token_ids[0]
    out = llm.generate("stop test", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(first,)))[0]
    assert out.token_ids == [] and out.finish_reason == "stop"


def test_kv_groups_sizes():
    cfg = make_tiny_config("gemma3")  # 5 sliding layers (window 8) + 1 full, Hkv 2, D 16
    full_b, sliding_b = bytes_per_block(1, 2, 16, 4, 16), bytes_per_block(5, 2, 16, 4, 16)
    assert (full_b, sliding_b) == (4096, 20480)
    budget = 100 * (full_b + sliding_b)
    groups = plan_kv_groups(cfg, EngineConfig(kv_memory_bytes=budget, max_num_seqs=4), 4, 256)
    assert [(g.name, g.layers, g.window) for g in groups] == [("full", (5,), None), ("sliding", (0, 1, 2, 3, 4), 8)]
    full, sliding = groups
    # the sliding group gets what 4 windows and a chunk of 512 tokens use: 4 * (1 + 2) + 32 + the null block
    assert sliding.num_blocks == 45 and full.num_blocks == (budget - 45 * sliding_b) // full_b
    equal = plan_kv_groups(cfg, EngineConfig(num_blocks=50), 4, 256)
    assert [g.num_blocks for g in equal] == [50, 50]


@pytest.mark.parametrize("case", ["empty_text", "empty_ids", "too_long", "bad_id", "too_big_for_cache",
                                  "params_count", "bad_params_type"])
def test_bad_requests_are_one_line_errors(llm, case):
    prompt, params = "ok", GREEDY
    if case == "empty_text":
        prompt = ""
    elif case == "empty_ids":
        prompt = [[]]
    elif case == "too_long":
        prompt = "x" * 200  # max_model_len is 128
    elif case == "bad_id":
        prompt = [[1, 5, 999]]
    elif case == "too_big_for_cache":
        small = LLM(llm.engine.model, make_byte_tokenizer(), block_size=4, num_blocks=5)
        with pytest.raises(LeanfmError, match="KV blocks") as err:
            small.generate("hello", SamplingParams(max_tokens=40))
        assert "\n" not in str(err.value)
        return
    elif case == "params_count":
        params = [GREEDY, GREEDY]
    elif case == "bad_params_type":
        params = [{"max_tokens": 3}]
    with pytest.raises(LeanfmError) as err:
        llm.generate(prompt, params)
    assert "\n" not in str(err.value)
    assert not llm.engine.has_unfinished


@pytest.mark.parametrize("options, match", [
    (dict(block_size=0), "block_size"),
    (dict(num_blocks=10, kv_memory_bytes=1 << 20), "not both"),
    (dict(max_num_seqs=-1), "max_num_seqs"),
    (dict(max_num_batched_tokens=1.5), "max_num_batched_tokens"),
    (dict(dtype="int3"), "dtype"),
    (dict(kv_memory_bytes=100), "fewer than 2 KV blocks"),
    (dict(max_model_len=100_000), "exceeds the model's context"),
    (dict(dtype="bfloat16"), "pass dtype='auto'"),
    (dict(block_sz=4), "unknown engine option"),
])
def test_bad_engine_options_are_one_line_errors(model, options, match):
    with pytest.raises(EngineConfigError, match=match) as err:
        LLM(model, make_byte_tokenizer(), **options)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_public_names_are_lazy_exports():
    import leanfm
    from leanfm.engine.async_llm import AsyncLLM

    assert leanfm.LLM is LLM and leanfm.SamplingParams is SamplingParams and leanfm.AsyncLLM is AsyncLLM


@pytest.mark.integration
def test_gemma_3_270m_greedy_equals_generator():
    from leanfm.checkpoint.loader import load_model
    from leanfm.engine.runtime import prepare_for_inference

    loaded = load_model("gemma-3-270m", progress=False)
    prepare_for_inference(loaded.model)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]
    params = SamplingParams(temperature=0, max_tokens=16)
    gen = Generator(loaded.model, loaded.tokenizer)
    expected = [gen.generate(p, params) for p in prompts]
    outs = LLM(loaded, max_num_seqs=4, kv_memory_bytes=64 << 20).generate(prompts, params)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert [o.text for o in outs] == [e.text for e in expected]
