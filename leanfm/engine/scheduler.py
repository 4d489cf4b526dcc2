"""Scheduler: iteration-level batching with a token budget per step. Torch-free.

There is no prefill phase and no decode phase. Each step, every request's computed tokens catch up
with its known tokens as far as the budget allows (vLLM v1, nano-vllm):

  1. running requests first, in admission order: a decode costs 1 token, an unfinished prompt the
     rest of it (a chunk, if the budget is short);
  2. then waiting requests, best first (lower priority value, then earlier arrival), starting after
     their cached prefix, while the budget, max_num_seqs and the KV blocks last;
  3. when a running request needs a block and none is free, the running request with the worst
     (priority, arrival) is preempted by recompute: its blocks are freed, its computed tokens reset,
     and it waits again with its original rank (so it goes back before later arrivals). A step that
     preempted admits no waiting request.

update_from_output() advances the computed tokens, registers full blocks in the prefix cache, appends
the sampled tokens and finishes requests (EOS / stop tokens / stop strings / max_tokens / context full).
"""

from __future__ import annotations

import bisect
import time

from leanfm.engine.config import EngineConfig
from leanfm.engine.kv.manager import KVCacheManager
from leanfm.engine.messages import NewRequestData, RunnerOutput, ScheduledChunk, SchedulerOutput
from leanfm.engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []  # sorted by Request.sort_key
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._finished_ids: list[str] = []  # to tell the runner at the next step
        self._known: set[str] = set()  # requests the runner holds sampling state for
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_scheduled_tokens = 0  # over all steps
        self.last_step_tokens = 0

    # ---------------------------------------------------------------- requests in and out
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use; give each request its own id")
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request now, freeing everything it holds; None when it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        req.finish(RequestStatus.FINISHED_ABORTED)
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        self.kv.free(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- scheduling
    def schedule(self) -> SchedulerOutput:
        limit = self.config.max_num_batched_tokens
        steps: dict[str, tuple[Request, int]] = {}  # request id -> (request, tokens this step)
        preempted: list[Request] = []
        used = 0
        for req in list(self.running):
            if used >= limit:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted for an earlier one this step
                continue
            n = min(req.num_tokens - req.num_computed_tokens, limit - used)
            if self._allocate_or_preempt(req, n, steps, preempted):
                steps[req.request_id] = (req, n)
            used = sum(k for _, k in steps.values()) if preempted else used + n
        if not preempted:
            self._admit_waiting(limit - used, steps)
        return self._output(steps, preempted)

    def _allocate_or_preempt(self, req: Request, n: int, steps: dict, preempted: list[Request]) -> bool:
        while not self.kv.allocate_slots(req, req.num_computed_tokens, n):
            victim = max(self.running, key=lambda r: r.sort_key)
            self._preempt(victim)
            preempted.append(victim)
            steps.pop(victim.request_id, None)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def _admit_waiting(self, budget: int, steps: dict) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            prefix = self.kv.get_computed_blocks(req)
            n = min(req.num_tokens - prefix.num_tokens, budget)
            if not self.kv.allocate_slots(req, prefix.num_tokens, n, prefix):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.pop(0)
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
                req.metrics.num_cached_tokens = prefix.num_tokens
            req.num_computed_tokens = prefix.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            steps[req.request_id] = (req, n)
            budget -= n

    def _output(self, steps: dict, preempted: list[Request]) -> SchedulerOutput:
        finished = tuple(self._finished_ids)  # first: a new request may reuse a finished one's id
        self._finished_ids.clear()
        self._known.difference_update(finished)
        chunks, new = [], []
        for req, n in steps.values():
            start = req.num_computed_tokens
            chunks.append(ScheduledChunk(req.request_id, tuple(req.all_token_ids[start:start + n]), start,
                                         self.kv.block_tables(req), start + n == req.num_tokens))
            if req.request_id not in self._known:
                self._known.add(req.request_id)
                new.append(NewRequestData(req.request_id, tuple(req.prompt_token_ids), req.params))
        out = SchedulerOutput(tuple(chunks), tuple(new), finished, tuple(r.request_id for r in preempted))
        self.num_steps += 1
        self.last_step_tokens = out.num_scheduled_tokens
        self.num_scheduled_tokens += self.last_step_tokens
        return out

    # ---------------------------------------------------------------- results
    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply a step's results; returns the requests that got a token or finished, in chunk order."""
        sampled = dict(zip(result.req_ids, result.sampled_token_ids, strict=True))
        logprobs = dict(zip(result.req_ids, result.logprobs, strict=True)) if result.logprobs else {}
        updated = []
        for chunk in sched.chunks:
            req = self.requests.get(chunk.req_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted after it was scheduled
            req.num_computed_tokens += len(chunk.token_ids)
            self.kv.cache_blocks(req, req.num_computed_tokens)
            if not chunk.needs_logits:
                continue
            if req.append_output_token(sampled[chunk.req_id], logprobs.get(chunk.req_id)):
                self.running.remove(req)
                self._release(req)
            updated.append(req)
        return updated
