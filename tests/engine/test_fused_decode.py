"""The engine on prepared models (prepare_for_inference): decode-only steps run one paged_decode_layer call
per block (leanfm.models.decode_plan), and greedy output still equals the prepared Generator's (whose
decode steps run decode_layer over its contiguous cache) token for token; the steps that mix prefill and
decodes, int8 KV caches and speculative verification keep their module path and give the same tokens."""

from __future__ import annotations

import pytest
from engine_testing import VARIANTS, engine_model, make_engine, prompt_ids, reference, run_to_end

from leanfm.engine.params import SamplingParams
from leanfm.engine.runtime import prepare_for_inference
from leanfm.models import decode_plan
from leanfm.ops import kernels

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not kernels.kernels_available(), reason="no C++ kernels")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return prepare_for_inference(engine_model(request.param, seed=1), fast_kernels=True)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    inner = decode_plan._paged_block_step

    def step(*args):
        y = inner(*args)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(decode_plan, "_paged_block_step", step)
    return calls


def generate(model, prompts, arrivals_at: int = 0, **options) -> list[list[int]]:
    core = make_engine(model, block_size=4, num_blocks=96, max_num_batched_tokens=32, **options)
    arrivals = {0: [(p, GREEDY, str(i)) for i, p in enumerate(prompts[:1])]}
    arrivals.setdefault(arrivals_at, []).extend((p, GREEDY, str(i + 1)) for i, p in enumerate(prompts[1:]))
    done = run_to_end(core, arrivals)
    return [done[str(i)].token_ids for i in range(len(prompts))]


def test_greedy_equals_generator_with_fused_decode_steps(model, fused_calls):
    prompts = [prompt_ids(5, 1), prompt_ids(13, 2), prompt_ids(30, 3)]  # the last one prefills in chunks
    assert generate(model, prompts, arrivals_at=3) == reference(model, prompts, GREEDY)
    assert sum(fused_calls) >= 15 * model.config.num_hidden_layers


def test_int8_kv_cache_keeps_the_module_path(model, fused_calls):
    prompts = [prompt_ids(9, 4), prompt_ids(17, 5)]
    assert not any(fused_calls)
    got = generate(model, prompts, kv_cache_dtype="int8")
    assert not any(fused_calls)
    assert len(got[0]) == GREEDY.max_tokens


def test_speculative_verification_equals_generator(model, fused_calls):
    prompt = [1, *([7, 8, 9, 10] * 5)]
    got = generate(model, [prompt, prompt_ids(11, 6)],
                   speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert got == reference(model, [prompt, prompt_ids(11, 6)], GREEDY)
