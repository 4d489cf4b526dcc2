"""What the OpenAI server asks of the engine: presence/frequency penalties (equal to the Generator's,
counted over the output only), per-token logprobs / top logprobs from the final sampling distribution,
and n samples of one prompt as sibling requests that reuse the first one's prefill."""

import asyncio
import dataclasses
import time

import pytest
import torch
from conftest import make_byte_tokenizer
from engine_testing import (
    assert_all_blocks_free,
    engine_model,
    make_engine,
    prompt_ids,
    reference,
    run_to_end,
)

from leanfm.engine.async_llm import AsyncLLM
from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams
from leanfm.ops.sampling import process_logits
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return engine_model("gemma3", seed=2)


@pytest.mark.parametrize("presence,frequency,temperature", [(1.5, 0.0, 0.0), (0.0, 1.0, 0.0), (0.7, 0.4, 0.9),
                                                            (-1.0, -0.5, 0.0)])
def test_penalties_match_the_generator(model, presence, frequency, temperature):
    params = SamplingParams(temperature=temperature, presence_penalty=presence, frequency_penalty=frequency,
                            seed=7, max_tokens=24, ignore_eos=True)
    prompts = [prompt_ids(11, seed=3), prompt_ids(5, seed=4)]
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    core = make_engine(model, block_size=4)
    done = run_to_end(core, {0: [(prompts[0], params, "pen"), (prompts[1], plain, "plain")]})
    assert done["pen"].token_ids == reference(model, prompts[:1], params)[0]
    assert done["plain"].token_ids == reference(model, prompts[1:], plain)[0]
    assert_all_blocks_free(core)


def test_presence_penalty_changes_greedy_and_stops_repeats(model):
    prompt = prompt_ids(9, seed=6)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain = reference(model, [prompt], greedy)[0]
    assert len(set(plain)) < 30  # the plain greedy output repeats itself on this model
    core = make_engine(model, block_size=4)
    pen = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0, max_tokens=30,
                         ignore_eos=True)
    out = run_to_end(core, {0: [(prompt, pen, "p")]})["p"].token_ids
    assert out != plain and len(set(out)) > len(set(plain))


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3.0),
                                 dict(presence_penalty=float("nan"))])
def test_penalties_out_of_range_are_rejected(bad):
    with pytest.raises(ValueError, match="penalty"):
        SamplingParams(**bad)


def full_logits(model, ids: list[int]):
    """Next-token logits after every prefix of ids, by one plain causal forward: (len(ids), V)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        return model.compute_logits(model(x, torch.arange(len(ids)).view(1, -1))[0]).float()


def test_greedy_logprobs_are_the_model_distribution(model):
    prompt = prompt_ids(10, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    core = make_engine(model, block_size=4)
    out = run_to_end(core, {0: [(prompt, params, "a"), (prompt_ids(6, seed=1), GREEDY, "b")]})["a"]
    assert out.token_ids == reference(model, [prompt], GREEDY)[0]
    assert len(out.logprobs) == len(out.token_ids)
    expected = torch.log_softmax(full_logits(model, prompt + out.token_ids)[len(prompt) - 1:-1], dim=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert lp.token_id == tok and lp.logprob == pytest.approx(expected[i, tok].item(), abs=1e-4)
        assert len(lp.top) == 5 and lp.top[0][0] == tok
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(expected[i].topk(5).values.tolist(), abs=1e-4)
    assert run_to_end(make_engine(model), {0: [(prompt, GREEDY, "g")]})["g"].logprobs is None


def test_sampled_logprobs_follow_the_filtered_distribution(model):
    prompt = prompt_ids(8, seed=12)
    base = dict(temperature=0.8, top_k=5, seed=3, max_tokens=10, ignore_eos=True)
    plain = run_to_end(make_engine(model), {0: [(prompt, SamplingParams(**base), "p")]})["p"]
    out = run_to_end(make_engine(model), {0: [(prompt, SamplingParams(**base, logprobs=8), "l")]})["l"]
    assert out.token_ids == plain.token_ids  # asking for logprobs does not change the draw
    logits = full_logits(model, prompt + out.token_ids)[len(prompt) - 1:-1]
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        expected = torch.log_softmax(process_logits(logits[i:i + 1], 0.8, top_k=5)[0], dim=-1)
        assert lp.logprob == pytest.approx(expected[tok].item(), abs=1e-4)
        assert [t for t, _ in lp.top[:5]] == expected.topk(5).indices.tolist()
        assert all(v == float("-inf") for _, v in lp.top[5:])  # outside top-k: impossible


def test_streamed_logprobs_align_with_new_tokens(model):
    llm = LLM(model, make_byte_tokenizer(), block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=0)
    outs = list(llm.stream(prompt_ids(7, seed=2), params))
    assert all(len(o.new_logprobs) == len(o.new_token_ids) for o in outs)
    flat = [lp for o in outs for lp in o.new_logprobs]
    assert [lp.token_id for lp in flat] == outs[-1].token_ids and all(lp.top == () for lp in flat)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)


async def collect_many(allm, prompt, params, n, request_id=None):
    return [item async for item in allm.generate_many(prompt, params, n, request_id=request_id)]


def test_n_samples_share_the_prefill_and_use_seed_plus_i(model):
    prompt = prompt_ids(23, seed=13)
    params = SamplingParams(temperature=1.0, seed=40, max_tokens=8, ignore_eos=True)
    allm = AsyncLLM(model, make_byte_tokenizer(), block_size=4)
    try:
        items = asyncio.run(collect_many(allm, prompt, params, 3, request_id="req"))
        wait_idle(allm)
        assert_all_blocks_free(allm.engine)
    finally:
        allm.shutdown()
    finals = {i: out for i, out in items if out.finished}
    assert sorted(finals) == [0, 1, 2] and {out.request_id for out in finals.values()} == {"req-0", "req-1", "req-2"}
    solo = LLM(model, make_byte_tokenizer()).generate(
        [prompt] * 3, [dataclasses.replace(params, seed=40 + i) for i in range(3)])
    for i in range(3):
        assert finals[i].token_ids == solo[i].token_ids
        assert "".join(out.new_text for j, out in items if j == i) == finals[i].text
    assert finals[0].metrics.num_cached_tokens == 0
    assert finals[1].metrics.num_cached_tokens == finals[2].metrics.num_cached_tokens == 20  # 5 full blocks
    assert len({tuple(out.token_ids) for out in finals.values()}) == 3


def test_leaving_n_samples_early_aborts_them_all(model):
    allm = AsyncLLM(model, make_byte_tokenizer(), block_size=4)

    async def main():
        agen = allm.generate_many("walk away from all of them", SamplingParams(max_tokens=200, ignore_eos=True), 4)
        seen = set()
        async for i, _ in agen:
            seen.add(i)
            if len(seen) == 4:
                break
        await agen.aclose()
        with pytest.raises(LeanfmError, match="empty"):
            await collect_many(allm, "", None, 2)

    try:
        asyncio.run(main())
        wait_idle(allm)
        assert_all_blocks_free(allm.engine)
    finally:
        allm.shutdown()


def wait_idle(allm, polls=500):
    for _ in range(polls):
        if not allm.engine.has_unfinished and not allm._active:
            return
        time.sleep(0.01)
