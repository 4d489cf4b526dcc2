"""Scheduler without a model (torch-free): token budget, chunked prefill, admission order, preemption by
recompute, stop conditions and abort. A fake runner samples a fixed token."""

from conftest import make_byte_tokenizer

from leanfm.engine.config import EngineConfig
from leanfm.engine.kv import KVCacheManager, KVGroupSpec
from leanfm.engine.messages import RunnerOutput
from leanfm.engine.params import SamplingParams
from leanfm.engine.request import Request, RequestStatus
from leanfm.engine.scheduler import Scheduler

BS = 4


def scheduler(num_blocks=64, **options):
    config = EngineConfig(block_size=BS, **options)
    return Scheduler(config, KVCacheManager([KVGroupSpec("full", (0,), None, num_blocks, 1)], BS))


def request(rid, n, max_tokens=5, priority=0, arrival=0.0, stop_ids=(), max_model_len=1000, detok=None, **params):
    return Request(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, **params),
                   stop_token_ids=frozenset(stop_ids), max_model_len=max_model_len, priority=priority,
                   arrival_time=arrival, detokenizer=detok)


def step(s, token=7):
    sched = s.schedule()
    sampled = [c.req_id for c in sched.chunks if c.needs_logits]
    updated = s.update_from_output(sched, RunnerOutput(tuple(sampled), (token,) * len(sampled)))
    return sched, updated


def shape(sched):
    return [(c.req_id, c.start_pos, len(c.token_ids), c.needs_logits) for c in sched.chunks]


def test_decodes_first_then_chunked_prefill_within_the_budget():
    s = scheduler(max_num_batched_tokens=8)
    s.add_request(request("a", 3))
    s.add_request(request("b", 20))
    assert shape(step(s)[0]) == [("a", 0, 3, True), ("b", 0, 5, False)]
    assert shape(step(s)[0]) == [("a", 3, 1, True), ("b", 5, 7, False)]
    assert shape(step(s)[0]) == [("a", 4, 1, True), ("b", 12, 7, False)]
    sched, _ = step(s)
    assert shape(sched) == [("a", 5, 1, True), ("b", 19, 1, True)]
    assert sched.chunks[1].token_ids == (29,)
    assert s.last_step_tokens == 2 and s.num_scheduled_tokens == 8 + 8 + 8 + 2


def test_new_requests_are_sent_once():
    s = scheduler()
    s.add_request(request("a", 3))
    sched, _ = step(s)
    assert [n.req_id for n in sched.new_requests] == ["a"] and sched.new_requests[0].prompt_token_ids == (10, 11, 12)
    sched, _ = step(s)
    assert sched.new_requests == ()


def test_waiting_order_is_priority_then_arrival():
    s = scheduler(max_num_seqs=1)
    for rid, prio, t in (("late-low", 1, 0.0), ("b", 0, 1.0), ("a", 0, 0.5)):
        s.add_request(request(rid, 2, max_tokens=1, priority=prio, arrival=t))
    order = [step(s)[0].chunks[0].req_id for _ in range(3)]
    assert order == ["a", "b", "late-low"]


def test_max_num_seqs_limits_running():
    s = scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(request(str(i), 2))
    sched, _ = step(s)
    assert [c.req_id for c in sched.chunks] == ["0", "1"] and len(s.waiting) == 1


def test_preemption_by_recompute_takes_the_newest_and_requeues_it():
    s = scheduler(num_blocks=7, max_num_batched_tokens=64, max_num_seqs=2)  # 6 usable blocks of 4 tokens
    s.add_request(request("old", 8, max_tokens=12, arrival=0.0))
    s.add_request(request("new", 8, max_tokens=12, arrival=1.0))
    s.add_request(request("later", 2, max_tokens=2, arrival=2.0))
    preempted_step = None
    for i in range(30):
        sched, _ = step(s)
        if sched.preempted_req_ids and preempted_step is None:
            preempted_step = i
            assert sched.preempted_req_ids == ("new",)
            new = next(r for r in s.waiting if r.request_id == "new")
            assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
            assert s.waiting[0] is new  # back before later arrivals
            assert [c.req_id for c in sched.chunks] == ["old"]  # no admission in a preempting step
        if not s.has_unfinished:
            break
    assert preempted_step is not None and s.num_preemptions >= 1
    assert not s.has_unfinished and all(p.num_free == p.num_usable for p in s.kv.pools)


def test_preemption_spares_the_higher_priority_request():
    s = scheduler(num_blocks=7, max_num_batched_tokens=64)
    s.add_request(request("first", 8, max_tokens=12, arrival=0.0, priority=1))
    s.add_request(request("urgent", 8, max_tokens=12, arrival=1.0, priority=0))
    preempted = []
    while s.has_unfinished:
        preempted += step(s)[0].preempted_req_ids
    assert preempted and set(preempted) == {"first"}


def test_stop_token_max_tokens_and_context_limit():
    s = scheduler()
    s.add_request(request("eos", 3, stop_ids=(7,)))
    s.add_request(request("len", 3, max_tokens=2))
    s.add_request(request("ctx", 3, max_tokens=50, max_model_len=6))
    finished = {}
    while s.has_unfinished:
        for r in step(s)[1]:
            if r.finished:
                finished[r.request_id] = r
    assert finished["eos"].status is RequestStatus.FINISHED_STOPPED and finished["eos"].output_token_ids == []
    assert finished["len"].status is RequestStatus.FINISHED_LENGTH and finished["len"].output_token_ids == [7, 7]
    assert finished["ctx"].status is RequestStatus.FINISHED_LENGTH and len(finished["ctx"].output_token_ids) == 3


def test_stop_string_cuts_the_text():
    tok = make_byte_tokenizer()
    s = scheduler()
    r = request("s", 3, max_tokens=20, stop=("cd",), detok=tok.stream_decoder())
    s.add_request(r)
    for t in tok.encode("abcdef", add_special_tokens=False):
        step(s, token=t)
        if r.finished:
            break
    assert r.status is RequestStatus.FINISHED_STOPPED and r.text == "ab" and r.output().text == "ab"
    assert len(r.output_token_ids) == 4


def test_abort_waiting_and_running_requests():
    s = scheduler(max_num_seqs=1)
    s.add_request(request("run", 6))
    s.add_request(request("wait", 6))
    step(s)
    assert s.abort("wait").status is RequestStatus.FINISHED_ABORTED
    assert s.abort("run").output().finish_reason == "abort"
    assert s.abort("run") is None and not s.has_unfinished
    sched, _ = step(s)
    assert set(sched.finished_req_ids) == {"run", "wait"} and sched.is_empty
    assert all(p.num_free == p.num_usable for p in s.kv.pools)
