"""What the OpenAI server asks of the engine: presence/frequency penalties (equal to the Generator's,
counted over the output only), per-token logprobs / top logprobs from the final sampling distribution,
and n samples of one prompt as sibling requests that reuse the first one's prefill."""

import pytest
from engine_testing import (
    assert_all_blocks_free,
    engine_model,
    make_engine,
    prompt_ids,
    reference,
    run_to_end,
)

from leanfm.engine.params import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")


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
