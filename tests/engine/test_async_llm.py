"""AsyncLLM: concurrent streams whose deltas concatenate to the final text (equal to LLM's), abort mid-stream
and an abandoned stream free their blocks, shutdown ends open streams, bad input raises at once."""

import asyncio
import time

import pytest
from conftest import make_byte_tokenizer
from engine_testing import assert_all_blocks_free, engine_model

from leanfm.engine.async_llm import AsyncLLM
from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")
PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return engine_model("gemma3", seed=4)


@pytest.fixture
def allm(model):
    llm = AsyncLLM(model, make_byte_tokenizer(), block_size=4, max_num_batched_tokens=16)
    yield llm
    llm.shutdown()


async def collect(llm, prompt, params=PARAMS, request_id=None):
    return [out async for out in llm.generate(prompt, params, request_id=request_id)]


def wait_idle(llm, timeout=5.0):
    end = time.monotonic() + timeout
    while llm.engine.has_unfinished and time.monotonic() < end:
        time.sleep(0.01)


def test_concurrent_streams_concatenate_to_the_final_text(allm, model):
    prompts = ["first prompt", "the second one is a good deal longer than the first", "3"]

    async def main():
        return await asyncio.gather(*(collect(allm, p, request_id=f"r{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    expected = LLM(model, make_byte_tokenizer()).generate(prompts, PARAMS)
    for outs, ref in zip(streams, expected, strict=True):
        assert len(outs) > 1 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert "".join(o.new_text for o in outs) == outs[-1].text == ref.text
        assert outs[-1].token_ids == ref.token_ids
    wait_idle(allm)
    assert_all_blocks_free(allm.engine)


def test_abort_mid_stream_frees_the_blocks(allm):
    async def main():
        outs = []
        async for out in allm.generate("abort me please", SamplingParams(max_tokens=200, ignore_eos=True),
                                       request_id="victim"):
            outs.append(out)
            if len(outs) == 3:
                assert any(p.num_used for p in allm.engine.kv.pools)
                allm.abort("victim")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 200
    assert_all_blocks_free(allm.engine)


def test_leaving_a_stream_early_aborts_it(allm):
    async def main():
        agen = allm.generate("walk away", SamplingParams(max_tokens=200, ignore_eos=True), request_id="gone")
        async for _ in agen:
            break
        await agen.aclose()
        # the same id is usable again once the abort went through
        for _ in range(200):
            if "gone" not in allm._active:
                break
            await asyncio.sleep(0.01)
        return await collect(allm, "again", request_id="gone")

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length"
    wait_idle(allm)
    assert_all_blocks_free(allm.engine)


def test_shutdown_ends_open_streams(model):
    llm = AsyncLLM(model, make_byte_tokenizer())

    async def main():
        outs = []
        async for out in llm.generate("long one", SamplingParams(max_tokens=200, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 2:
                llm.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort"
    with pytest.raises(LeanfmError, match="shut down"):
        asyncio.run(collect(llm, "after"))


def test_bad_input_raises_before_streaming(allm):
    with pytest.raises(LeanfmError, match="empty"):
        asyncio.run(collect(allm, ""))

    async def duplicate():
        agen = allm.generate("one", SamplingParams(max_tokens=50, ignore_eos=True), request_id="dup")
        await agen.__anext__()
        try:
            await collect(allm, "two", request_id="dup")
        finally:
            await agen.aclose()

    with pytest.raises(LeanfmError, match="already in use"):
        asyncio.run(duplicate())
