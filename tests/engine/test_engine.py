"""EngineCore on tiny random models: greedy output equals the plain Generator token for token under every
scheduling situation (mixed lengths, arrivals mid-way, chunked prefill, preemption, prefix hits, all at
once), and every KV block comes back."""

import math

import pytest
from engine_testing import (
    VARIANTS,
    WINDOW,
    assert_all_blocks_free,
    engine_model,
    make_engine,
    prompt_ids,
    reference,
    run_to_end,
)

from leanfm.engine.params import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return engine_model(request.param, seed=1)


def check(model, core, prompts, params=GREEDY, arrivals=None):
    arrivals = arrivals or {0: [(p, params, str(i)) for i, p in enumerate(prompts)]}
    done = run_to_end(core, arrivals)
    flat = sorted((rid, p) for batch in arrivals.values() for p, _, rid in batch)
    expected = reference(model, [p for _, p in flat], params)
    assert [done[rid].token_ids for rid, _ in flat] == expected
    assert_all_blocks_free(core)
    return done


def test_mixed_prompt_lengths(model):
    prompts = [prompt_ids(n, seed=n) for n in (3, 17, 40, 70)]
    check(model, make_engine(model, block_size=4), prompts)


def test_requests_arriving_mid_way(model):
    core = make_engine(model, block_size=4)
    arrivals = {s: [(prompt_ids(5 + 7 * s, seed=s), GREEDY, f"r{s}")] for s in (0, 1, 3, 8, 20)}
    check(model, core, None, arrivals=arrivals)


def test_chunked_prefill_with_small_budget(model):
    core = make_engine(model, block_size=4, max_num_batched_tokens=7)
    prompts = [prompt_ids(n, seed=n) for n in (40, 25, 2, 33)]
    check(model, core, prompts)
    assert core.stats().num_steps > 24  # prompts were split over steps


def test_preemption_with_tiny_block_budget(model):
    core = make_engine(model, block_size=4, num_blocks=24, max_num_batched_tokens=16)  # 23 usable blocks
    prompts = [prompt_ids(n, seed=n) for n in (20, 26, 15, 31)]  # each needs 10-14 of them at the end
    done = check(model, core, prompts)
    assert core.stats().num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in done.values()) == core.stats().num_preemptions


def test_prefix_cache_hits_skip_the_shared_prefill(model):
    core = make_engine(model, block_size=4)
    system = prompt_ids(33, seed=7)
    first = check(model, core, [system + [50, 60, 70]])
    assert first["0"].metrics.num_cached_tokens == 0
    before = core.stats()
    prompts = [system + prompt_ids(6 + i, seed=100 + i)[1:] for i in range(3)]
    arrivals = {0: [(p, GREEDY, f"s{i}") for i, p in enumerate(prompts)]}
    done = check(model, core, None, arrivals=arrivals)
    after = core.stats()
    cached = 32  # the whole 4-token blocks of the shared 33 tokens
    assert [done[f"s{i}"].metrics.num_cached_tokens for i in range(3)] == [cached] * 3
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * cached
    computed = after.num_scheduled_tokens - before.num_scheduled_tokens
    # prefill of the uncached prompt tails, then one decode per output token except the last
    assert computed == sum(len(p) - cached for p in prompts) + 3 * (GREEDY.max_tokens - 1)


def test_a_prompt_never_hits_whole(model):
    core = make_engine(model, block_size=4)
    prompt = prompt_ids(16, seed=3)  # exactly 4 blocks
    check(model, core, [prompt])
    done = check(model, core, [prompt])
    assert done["0"].metrics.num_cached_tokens == 12  # the last block is recomputed for its logits


def test_everything_at_once(model):
    core = make_engine(model, block_size=4, num_blocks=26, max_num_batched_tokens=9, max_num_seqs=4)
    system = prompt_ids(21, seed=11)
    arrivals = {}
    for i, step in enumerate((0, 0, 2, 5, 5, 9, 30)):
        prompt = system + prompt_ids(3 + 5 * i, seed=i)[1:] if i % 2 else prompt_ids(4 + 6 * i, seed=50 + i)
        arrivals.setdefault(step, []).append((prompt, GREEDY, f"m{i}"))
    check(model, core, None, arrivals=arrivals)
    stats = core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


def test_abort_frees_blocks_in_every_state(model):
    core = make_engine(model, block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    for i, n in enumerate((30, 6, 12, 9)):
        core.add_request(prompt_ids(n, seed=i), GREEDY, request_id=str(i))
    for _ in range(3):
        core.step()
    # "0" is mid-prefill, "1" decoding, "2" and "3" waiting
    assert core.scheduler.requests["0"].num_computed_tokens < 30
    for rid in ("0", "1", "2"):
        out = core.abort(rid).output()
        assert out.finish_reason == "abort"
    assert core.abort("nope") is None
    done = run_to_end(core)
    assert list(done) == ["3"]
    assert_all_blocks_free(core)


def test_sliding_group_holds_only_its_window():
    model = engine_model("gemma3", seed=2)
    bs, budget = 4, 8
    core = make_engine(model, block_size=bs, max_num_batched_tokens=budget)
    sliding = [g.name for g in core.kv.groups].index("sliding")
    req = core.add_request(prompt_ids(50, seed=2), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    most = 0
    while core.has_unfinished:
        sched = core.scheduler.schedule()
        if req.request_id in core.kv._reqs:
            chunk = len(sched.chunks[0].token_ids)
            live = core.kv.num_live_blocks(req, sliding)
            assert live <= math.ceil((WINDOW + chunk) / bs) + 1
            if chunk == 1:
                most = max(most, live)
        core.scheduler.update_from_output(sched, core.runner.execute(sched))
    assert 0 < most <= math.ceil((WINDOW + 1) / bs) + 1
    assert_all_blocks_free(core)


def test_seeded_sampling_ignores_batch_composition(model):
    params = SamplingParams(temperature=1.2, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1,
                            seed=123, max_tokens=20, ignore_eos=True)
    prompt = prompt_ids(19, seed=5)
    alone = check(model, make_engine(model), [prompt], params)["0"].token_ids
    others = [prompt_ids(10 + 3 * i, seed=30 + i) for i in range(4)]
    mixed = [SamplingParams(temperature=0.8, seed=i, max_tokens=25, ignore_eos=True) for i in range(4)]
    core = make_engine(model, block_size=4, num_blocks=30, max_num_batched_tokens=10)
    arrivals = {0: [(p, sp, f"o{i}") for i, (p, sp) in enumerate(zip(others, mixed, strict=True))],
                2: [(prompt, params, "target")]}
    done = run_to_end(core, arrivals)
    assert done["target"].token_ids == alone
    assert core.stats().num_preemptions > 0
    assert_all_blocks_free(core)


def test_repetition_penalty_counts_prompt_and_output(model):
    penalized = SamplingParams(temperature=0.0, repetition_penalty=3.0, max_tokens=30, ignore_eos=True)
    prompts = [prompt_ids(12, seed=8), prompt_ids(7, seed=9)]
    plain = reference(model, prompts[:1], GREEDY)[0]
    core = make_engine(model, block_size=4)
    arrivals = {0: [(prompts[0], GREEDY, "plain"), (prompts[1], penalized, "pen")]}
    done = run_to_end(core, arrivals)
    assert done["plain"].token_ids == plain
    assert done["pen"].token_ids == reference(model, prompts[1:], penalized)[0]
    assert len(set(done["pen"].token_ids)) == 30  # a penalty of 3 never repeats on this model
