"""Speculative decoding in the engine on tiny models: with every proposer, greedy output equals the plain
Generator token for token under mixed batches, arrivals, chunked prefill, preemption and prefix hits; every
KV block comes back, the draft's too; stop conditions over accepted tokens; acceptance statistics; abort."""

import copy

import pytest
from conftest import make_byte_tokenizer
from engine_testing import (
    VARIANTS,
    assert_all_blocks_free,
    engine_model,
    make_engine,
    prompt_ids,
    reference,
    run_to_end,
)

from leanfm.engine.generate import Generator
from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
METHODS = ("ngram", "draft", "layer_skip")


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return engine_model(request.param, seed=1)


def pruned_copy(model):
    """A different, smaller draft: the target without its second layer (a ShortGPT-style removal)."""
    draft = copy.deepcopy(model)
    draft.remove_layers([1])
    return draft


def spec_options(method, model, **extra):
    spec = {"method": method, "disable_above_batch": None, **extra}
    if method == "draft":
        spec["draft_model"] = pruned_copy(model)
    return spec


def repetitive(n, seed):
    """A prompt that repeats a span (n-gram drafts find matches) of about n tokens."""
    span = prompt_ids(max(4, n // 3), seed)
    return (span + span[1:] + span[1:])[:n]


def assert_draft_blocks_free(core):
    proposer = core.runner.spec.proposer
    if hasattr(proposer, "kv"):
        for pool in proposer.kv.pools:
            assert pool.num_free == pool.num_usable and not any(pool.ref_cnt)
        assert not proposer.seqs


def check(model, core, arrivals, params=GREEDY):
    done = run_to_end(core, arrivals)
    flat = sorted((rid, p) for batch in arrivals.values() for p, _, rid in batch)
    assert [done[rid].token_ids for rid, _ in flat] == reference(model, [p for _, p in flat], params)
    assert_all_blocks_free(core)
    assert_draft_blocks_free(core)
    return done


@pytest.mark.parametrize("method", METHODS)
def test_greedy_mixed_batch_equals_generator(model, method):
    core = make_engine(model, block_size=4, speculative=spec_options(method, model))
    prompts = [prompt_ids(n, seed=n) for n in (3, 17, 40)] + [repetitive(n, seed=n) for n in (12, 45)]
    arrivals = {0: [(p, GREEDY, str(i)) for i, p in enumerate(prompts[:3])],
                3: [(p, GREEDY, str(i + 3)) for i, p in enumerate(prompts[3:])]}
    done = check(model, core, arrivals)
    s = core.stats()
    assert s.spec_accepted_tokens > 0 and s.spec_draft_tokens > s.spec_accepted_tokens  # accepts and rejects
    per_request = [o.metrics for o in done.values()]
    assert sum(m.num_draft_tokens for m in per_request) == s.spec_draft_tokens
    assert sum(m.num_accepted_tokens for m in per_request) == s.spec_accepted_tokens
    assert s.num_generated_tokens == sum(len(o.token_ids) for o in done.values())
    assert s.num_steps < 5 * GREEDY.max_tokens  # fewer steps than tokens for someone
    if method != "ngram":
        assert s.spec_draft_kv_bytes > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_with_repetition_penalty(model, method):
    """The penalty counts earlier drafts as seen, row by row, exactly as plain decoding counts its outputs."""
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=30, ignore_eos=True)
    core = make_engine(model, block_size=4, speculative=spec_options(method, model, ngram_min=1))
    prompts = [repetitive(n, seed=n) for n in (15, 40)]
    check(model, core, {0: [(p, params, str(i)) for i, p in enumerate(prompts)]}, params)
    assert core.stats().spec_draft_tokens > 0


@pytest.mark.parametrize("method", METHODS)
def test_everything_at_once(model, method):
    """Chunked prefill (budget 9), preemption (26 blocks), prefix hits and arrivals, with drafts in flight."""
    core = make_engine(model, block_size=4, num_blocks=26, max_num_batched_tokens=9, max_num_seqs=4,
                       speculative=spec_options(method, model, num_speculative_tokens=3))
    system = repetitive(21, seed=11)
    arrivals = {}
    for i, step in enumerate((0, 0, 2, 5, 5, 9, 30)):
        prompt = system + prompt_ids(3 + 5 * i, seed=i)[1:] if i % 2 else repetitive(4 + 6 * i, seed=50 + i)
        arrivals.setdefault(step, []).append((prompt, GREEDY, f"m{i}"))
    check(model, core, arrivals)
    s = core.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hits > 0 and s.spec_accepted_tokens > 0


def test_full_acceptance_and_stops_inside_accepted_runs(model):
    """The target as its own draft accepts every draft (k + 1 tokens a step); stop tokens, stop strings and
    max_tokens still end the output exactly where the Generator ends it."""
    tok = make_byte_tokenizer()
    gen = Generator(model, tok)
    llm = LLM(model, tok, block_size=4, speculative={"method": "draft", "draft_model": model,
                                                     "disable_above_batch": None})
    prompt = "speculate on this"
    full = gen.generate(prompt, GREEDY)
    cases = [SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(full.token_ids[7],)),
             SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(full.text[5:8],))]
    for params in cases:
        ref = gen.generate(prompt, params)
        out = llm.generate(prompt, params)[0]
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
    s = llm.stats()
    assert s.spec_acceptance_rate == 1.0 and s.spec_mean_accepted_length > 3
    assert_all_blocks_free(llm.engine)
    assert_draft_blocks_free(llm.engine)


def test_draft_vocabulary_cut(model):
    """A layer-skip draft whose head only knows half the vocabulary: fewer tokens accepted, same output."""
    core = make_engine(model, block_size=4, speculative=spec_options("layer_skip", model, draft_vocab=range(130)))
    prompts = [repetitive(n, seed=n) for n in (12, 30, 45)]
    check(model, core, {0: [(p, GREEDY, str(i)) for i, p in enumerate(prompts)]})
    head = core.runner.spec.proposer.head
    assert head.weight.shape == (130, model.config.hidden_size) and core.stats().spec_draft_tokens > 0


@pytest.mark.parametrize("method", ["draft", "layer_skip"])
def test_abort_frees_the_draft_cache(model, method):
    core = make_engine(model, block_size=4, speculative=spec_options(method, model))
    for i in range(3):
        core.add_request(repetitive(20 + i, seed=i), GREEDY, request_id=str(i))
    for _ in range(4):
        core.step()
    assert core.runner.spec.proposer.seqs  # drafting
    for i in range(3):
        assert core.abort(str(i)) is not None
    assert_all_blocks_free(core)
    assert_draft_blocks_free(core)


def test_off_switch_engages_in_the_engine(model):
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    core = make_engine(model, block_size=4, speculative={"method": "ngram", "disable_above_batch": 2})
    arrivals = {0: [(repetitive(30, seed=i), params, str(i)) for i in range(4)]}
    check(model, core, arrivals, params)
    s = core.stats()
    assert s.spec_off_steps > 0
    # four requests of the same length finish together: no step ever ran with two or fewer
    assert s.spec_draft_tokens == 0 and s.num_steps == params.max_tokens


def test_layer_subset_view_shares_weights_and_leaves_the_model_alone(model):
    import torch

    n = model.config.num_hidden_layers
    keep = [0, n - 1]
    view = model.layer_subset(keep)
    pruned = copy.deepcopy(model)
    pruned.remove_layers([i for i in range(n) if i not in keep])
    ids = torch.tensor([prompt_ids(12, seed=3)])
    with torch.no_grad():
        assert torch.allclose(view(ids, torch.arange(12)), pruned(ids, torch.arange(12)), atol=1e-6)
    assert len(model.model.layers) == n and [m.self_attn.layer_idx for m in view.model.layers] == keep
    assert view.lm_head is model.lm_head and view.model.layers[1] is model.model.layers[n - 1]


def test_logprobs_requests_get_no_drafts_and_keep_their_logprobs(model):
    """A request asking for logprobs is not drafted for (its logprobs come from the sampler's own draw);
    a plain greedy request beside it still is, and both equal the Generator."""
    with_lp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    core = make_engine(model, block_size=4, speculative=spec_options("ngram", model))
    prompts = [repetitive(40, seed=3), repetitive(40, seed=4)]
    done = run_to_end(core, {0: [(prompts[0], with_lp, "lp"), (prompts[1], GREEDY, "plain")]})
    assert done["lp"].token_ids == reference(model, [prompts[0]], with_lp)[0]
    assert done["plain"].token_ids == reference(model, [prompts[1]], GREEDY)[0]
    assert done["lp"].metrics.num_draft_tokens == 0 and done["plain"].metrics.num_draft_tokens > 0
    assert len(done["lp"].logprobs) == len(done["lp"].token_ids)
    assert_all_blocks_free(core)


def test_speculation_with_kv_compression_is_refused(model):
    from leanfm.engine.config import EngineConfig, EngineConfigError

    with pytest.raises(EngineConfigError, match="speculative decoding needs the full KV cache"):
        EngineConfig(speculative="ngram", kv_compression="streaming", kv_budget=64)
