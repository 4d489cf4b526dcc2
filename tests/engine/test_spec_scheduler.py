"""Speculative tokens in the torch-free scheduler, with a fake runner that accepts a scripted number of drafts:
chunk shapes, rollback of computed tokens, blocks past the accepted tokens freed, only final blocks in the
prefix cache, stop conditions over accepted tokens, max_tokens, drafts dropped rather than preempting, and
the off-switch. Plus the n-gram proposer and the speculative config."""

import random

import pytest

from leanfm.engine.config import EngineConfig, EngineConfigError
from leanfm.engine.kv import KVCacheManager, KVGroupSpec
from leanfm.engine.messages import RunnerOutput
from leanfm.engine.params import SamplingParams
from leanfm.engine.request import Request, RequestStatus
from leanfm.engine.scheduler import Scheduler
from leanfm.engine.spec import NgramProposer, SpeculativeConfig

BS = 4
K = 3


def scheduler(num_blocks=64, spec=None, **options):
    spec = {"method": "ngram", "num_speculative_tokens": K, "disable_above_batch": None, **(spec or {})}
    config = EngineConfig(block_size=BS, speculative=spec, **options)
    return Scheduler(config, KVCacheManager([KVGroupSpec("full", (0,), None, num_blocks, 1)], BS))


def request(rid, n, max_tokens=20, stop_ids=()):
    return Request(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens),
                   stop_token_ids=frozenset(stop_ids), max_model_len=1000)


def step(s, accept=0, token=7, drafts=(100, 101, 102)):
    """accept: drafts each verifying request accepts (capped at what it has); every request proposes `drafts`."""
    sched = s.schedule()
    chunks = [c for c in sched.chunks if c.needs_logits]
    acc = tuple(min(accept, c.num_draft_tokens) for c in chunks)
    props = tuple(tuple(drafts[:c.num_propose]) for c in chunks)
    out = RunnerOutput(tuple(c.req_id for c in chunks), (token,) * len(chunks), acc, props)
    return sched, s.update_from_output(sched, out)


def shape(sched):
    return [(c.req_id, c.start_pos, c.token_ids, c.num_draft_tokens, c.num_propose) for c in sched.chunks]


def test_drafts_ride_with_the_last_token_and_roll_back():
    s = scheduler()
    r = request("a", 6)
    s.add_request(r)
    sched, _ = step(s)  # prefill: samples 7, asks for K drafts
    assert shape(sched) == [("a", 0, tuple(range(10, 16)), 0, K)]
    assert r.spec_token_ids == [100, 101, 102]
    sched, _ = step(s, accept=2)  # verifies [7, 100, 101, 102]: 100, 101 accepted, then the target's 7
    assert shape(sched) == [("a", 6, (7, 100, 101, 102), K, K)]
    assert r.output_token_ids == [7, 100, 101, 7]
    assert r.num_computed_tokens == 6 + 1 + 2  # 7, 100, 101 are final; 102 was rejected, the new 7 is not computed
    assert len(s.kv.block_tables(r)[0]) == 3  # ceil(9 / 4): the block of the rejected slot went back
    assert s.kv.pools[0].num_used == 3
    m = r.metrics
    assert (m.num_draft_tokens, m.num_accepted_tokens, m.num_spec_steps) == (3, 2, 1)
    assert m.spec_acceptance_rate == 2 / 3 and m.mean_accepted_length == 3.0
    assert (s.num_draft_tokens, s.num_accepted_tokens, s.num_spec_steps) == (3, 2, 1)


def test_only_blocks_of_final_tokens_enter_the_prefix_cache():
    s = scheduler()
    r = request("a", 7)
    s.add_request(r)
    step(s)  # 7 prompt tokens computed: one full block cached
    step(s, accept=0)  # computes [7, 100, 101, 102] at positions 7..10; only 7 is final
    assert r.num_computed_tokens == 8
    pool = s.kv.pools[0]
    cached = {key[1] for key in pool.cached}
    assert cached == {(10, 11, 12, 13), (14, 15, 16, 7)}  # the second block holds the accepted 7 last, no draft


def test_stop_token_among_accepted_drafts_ends_there():
    s = scheduler()
    r = request("a", 5, stop_ids=(101,))
    s.add_request(r)
    step(s)
    _, updated = step(s, accept=3)  # 100 and the stop token 101 accepted: finished at 101
    assert updated == [r] and r.status is RequestStatus.FINISHED_STOPPED
    assert r.output_token_ids == [7, 100]
    assert not s.has_unfinished and s.kv.pools[0].num_used == 0


def test_drafts_never_pass_max_tokens():
    s = scheduler()
    r = request("a", 5, max_tokens=6)
    s.add_request(r)
    sched, _ = step(s)
    assert sched.chunks[0].num_propose == K  # 5 tokens left after this one: room for 3 drafts + 1
    sched, _ = step(s, accept=3)  # + 100 101 102 7 = 5 tokens
    assert sched.chunks[0].num_draft_tokens == K
    sched, _ = step(s)  # 1 token left: it comes from the target, no room for a draft
    assert sched.chunks[0].num_draft_tokens == 0 and sched.chunks[0].num_propose == 0
    assert r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 6
    s = scheduler()
    r = request("b", 5, max_tokens=4)
    s.add_request(r)
    step(s)
    sched, _ = step(s, accept=3)
    assert sched.chunks[0].num_draft_tokens == 2  # 3 left: 2 drafts + the target's token
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7, 100, 101, 7]


def test_drafts_are_cut_to_the_token_budget():
    s = scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    for rid in "abc":
        s.add_request(request(rid, 2))
    step(s)
    sched, _ = step(s)
    assert [len(c.token_ids) for c in sched.chunks] == [4, 4]  # budget 8: a and b get 1 + 3, c waits
    assert sched.num_scheduled_tokens == 8


def test_drafts_dropped_rather_than_preempting():
    s = scheduler(num_blocks=5, max_num_seqs=2)  # 4 usable blocks
    s.add_request(request("a", 7))
    s.add_request(request("b", 7))
    step(s)  # 2 blocks each: the pool is full
    sched, _ = step(s)
    assert [c.num_draft_tokens for c in sched.chunks] == [0, 0] and sched.preempted_req_ids == ()


def test_off_switch_above_the_batch_threshold():
    s = scheduler(spec={"disable_above_batch": 2}, max_num_seqs=8)
    reqs = [request(str(i), 3, max_tokens=30) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    sched, _ = step(s)  # 3 running after admission: no proposals asked
    assert all(c.num_propose == 0 for c in sched.chunks)
    sched, _ = step(s)
    assert all(c.num_draft_tokens == 0 and c.num_propose == 0 for c in sched.chunks)
    assert s.num_spec_off_steps == 1
    s.abort("2")  # 2 running: speculation comes back
    sched, _ = step(s)
    assert all(c.num_propose == K for c in sched.chunks)
    sched, _ = step(s, accept=1)
    assert all(c.num_draft_tokens == K for c in sched.chunks) and s.num_spec_off_steps == 1
    assert SpeculativeConfig(disable_above_batch=2).should_speculate(2)
    assert not SpeculativeConfig(disable_above_batch=2).should_speculate(3)
    assert SpeculativeConfig(disable_above_batch=None).should_speculate(10_000)
    default = SpeculativeConfig()  # measured: speculation stops paying between batch 2 and 4 (bench_spec.py)
    assert default.should_speculate(2) and not default.should_speculate(3)


def test_preemption_drops_the_drafts():
    s = scheduler(num_blocks=7, max_num_batched_tokens=64, max_num_seqs=2)
    s.add_request(request("old", 8, max_tokens=12))
    s.add_request(request("new", 8, max_tokens=12))
    seen = False
    while s.has_unfinished:
        sched, _ = step(s, accept=1)
        for rid in sched.preempted_req_ids:
            seen = True
            assert s.requests[rid].spec_token_ids == []
    assert seen and s.kv.pools[0].num_used == 0


# ------------------------------------------------------------------ n-gram proposer
def brute_force(tokens, k, n_min, n_max):
    for n in range(n_max, n_min - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for e in range(len(tokens) - 2, n - 2, -1):
            if tokens[e - n + 1:e + 1] == suffix:
                return tokens[e + 1:e + 1 + k]
    return []


def test_ngram_proposer_takes_the_longest_latest_match():
    p = NgramProposer(3, n_min=1, n_max=3)
    assert p.propose_tokens("a", [1, 2, 3, 9, 2, 3, 8, 5, 1, 2, 3]) == [9, 2, 3]  # "1 2 3" beats the later "2 3"
    assert p.propose_tokens("b", [5, 6, 7, 5, 6, 8, 5, 6]) == [8, 5, 6]  # the latest "5 6"
    assert p.propose_tokens("c", [4, 4, 4]) == [4]  # a match may run into the suffix itself
    assert NgramProposer(3, n_min=2, n_max=2).propose_tokens("d", [1, 2, 3, 1]) == []  # "1" alone is too short


def test_ngram_index_grows_incrementally_like_a_full_scan():
    rng = random.Random(0)
    p = NgramProposer(4, n_min=2, n_max=4)
    tokens = [rng.randrange(6) for _ in range(5)]
    for _ in range(200):
        k = rng.randrange(0, 5)
        assert p.propose_tokens("r", tokens, k) == brute_force(tokens, k, 2, 4), tokens
        tokens.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))
    p.free("r")
    assert not p._index


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("spec, match", [
    ({"method": "medusa"}, "method must be one of"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"ngram_min": 3, "ngram_max": 2}, "ngram_min <= ngram_max"),
    ({"method": "draft"}, "needs draft_model"),
    ({"method": "ngram", "draft_model": "x"}, "needs draft_model"),
    ({"method": "ngram", "skip_layers": [1]}, "skip_layers is for"),
    ({"method": "layer_skip", "skip_layers": [1, 1]}, "distinct"),
    ({"disable_above_batch": 0}, "disable_above_batch"),
    ({"method": "ngram", "draft_vocab": [1, 2]}, "draft_vocab is for"),
    ({"method": "layer_skip", "draft_vocab": []}, "non-empty"),
    ({"k": 3}, "unknown speculative option"),
    (3, "method name or a dict"),
])
def test_bad_speculative_options_are_one_line_errors(spec, match):
    with pytest.raises(EngineConfigError, match=match) as err:
        EngineConfig(speculative=spec)
    assert "\n" not in str(err.value)


def test_speculative_config_forms_and_round_trip():
    assert EngineConfig(speculative="ngram").speculative == SpeculativeConfig()
    c = EngineConfig.from_options(speculative={"method": "layer_skip", "skip_layers": [3, 5]})
    assert c.speculative.skip_layers == (3, 5)
    d = c.to_dict()
    assert d["speculative"]["skip_layers"] == [3, 5]
    assert EngineConfig(**{**d, "speculative": d["speculative"]}) == c
    with pytest.raises(EngineConfigError, match="leaves no room"):
        EngineConfig(max_num_batched_tokens=4, speculative={"num_speculative_tokens": 4})
