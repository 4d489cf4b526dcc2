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

Speculative decoding (leanfm.engine.spec) is the same path: a decoding request's chunk is its last token
plus its draft tokens (Request.spec_token_ids; cut to the budget and max_tokens, dropped rather than
preempting anyone for their blocks, and dropped in steps with more than `disable_above_batch` running
requests). After verification its computed tokens roll back to the accepted ones, the blocks past them
are freed, and the accepted tokens are appended one by one with the usual stop checks.
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
        self.num_draft_tokens = self.num_accepted_tokens = self.num_spec_steps = 0  # speculative decoding
        self.num_spec_off_steps = 0  # steps the off-switch turned speculation off
        self._spec_on = False

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
        spec = self.config.speculative
        self._spec_on = spec is not None and spec.should_speculate(len(self.running))
        if spec is not None and not self._spec_on:
            self.num_spec_off_steps += 1
        steps: dict[str, tuple[Request, int, int]] = {}  # request id -> (request, tokens, of which drafts)
        preempted: list[Request] = []
        used = 0
        for req in list(self.running):
            if used >= limit:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted for an earlier one this step
                continue
            n = min(req.num_tokens - req.num_computed_tokens, limit - used)
            k = self._num_drafts(req, limit - used - n)
            if k and not self.kv.allocate_slots(req, req.num_computed_tokens, n + k):
                k = 0  # no room for the drafts: verify none rather than preempt anyone for them
            if k or self._allocate_or_preempt(req, n, steps, preempted):
                steps[req.request_id] = (req, n + k, k)
            used = sum(m for _, m, _ in steps.values()) if preempted else used + n + k
        if not preempted:
            self._admit_waiting(limit - used, steps)
        return self._output(steps, preempted)

    def _num_drafts(self, req: Request, room: int) -> int:
        """Drafts to verify with the request's next token: none while it prefills or the switch is off, and
        never past max_tokens (one more token always comes from the target)."""
        if not req.spec_token_ids or not self._spec_on or req.num_computed_tokens != req.num_tokens - 1:
            return 0
        left = req.max_output_tokens - len(req.output_token_ids) - 1
        return max(0, min(len(req.spec_token_ids), room, left))

    def _num_propose(self, req: Request) -> int:
        """Drafts to ask for after this step's token: k, fewer near max_tokens, none with the switch off."""
        spec = self.config.speculative
        if spec is None or not spec.should_speculate(len(self.running)) or req.params.logprobs is not None:
            return 0  # (logprobs come from the sampler's own draw: a request asking for them is not drafted for)
        left = req.max_output_tokens - len(req.output_token_ids) - 2  # after this step's token and the next
        return max(0, min(spec.num_speculative_tokens, left))

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
        req.spec_token_ids = []
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
                req.metrics.num_cached_tokens = max(0, prefix.num_tokens - req.num_virtual_tokens)
            req.num_computed_tokens = prefix.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            steps[req.request_id] = (req, n, 0)
            budget -= n

    def drain_finished(self) -> SchedulerOutput:
        """An output with no chunks, telling the runner of the requests finished since the last step: an
        idle engine sends it so that the runner drops their state (a draft model's KV blocks) right away."""
        return SchedulerOutput((), (), self._take_finished())

    def _take_finished(self) -> tuple[str, ...]:
        finished = tuple(self._finished_ids)
        self._finished_ids.clear()
        self._known.difference_update(finished)
        return finished

    def _output(self, steps: dict, preempted: list[Request]) -> SchedulerOutput:
        finished = self._take_finished()  # first: a new request may reuse a finished one's id
        chunks, new = [], []
        for req, n, k in steps.values():
            start, m = req.num_computed_tokens, n - k  # m known tokens, then k drafts
            tokens = tuple(req.all_token_ids[start:start + m]) + tuple(req.spec_token_ids[:k])
            req.spec_token_ids = []  # verified now, or stale once the next token is computed without them
            last = start + m == req.num_tokens
            chunks.append(ScheduledChunk(req.request_id, tokens, start, self.kv.block_tables(req), last, k,
                                         self._num_propose(req) if last else 0, req.lora_id))
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
        """Apply a step's results; returns the requests that got tokens or finished, in chunk order."""
        sampled = dict(zip(result.req_ids, result.sampled_token_ids, strict=True))
        logprobs = dict(zip(result.req_ids, result.logprobs, strict=True)) if result.logprobs else {}
        accepted = dict(zip(result.req_ids, result.num_accepted, strict=True)) if result.num_accepted else {}
        drafts = dict(zip(result.req_ids, result.draft_token_ids, strict=True)) if result.draft_token_ids else {}
        updated = []
        for chunk in sched.chunks:
            req = self.requests.get(chunk.req_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted after it was scheduled
            k = chunk.num_draft_tokens
            req.num_computed_tokens += len(chunk.token_ids) - k
            if not chunk.needs_logits:
                self.kv.cache_blocks(req, req.num_computed_tokens)
                continue
            a = accepted.get(chunk.req_id, 0)
            if k:  # roll back past the rejected drafts: their KV slots are garbage, their blocks go back
                req.num_computed_tokens += a
                self.kv.truncate(req, req.num_computed_tokens)
                self._count_spec(req, k, a)
            drafted = chunk.token_ids[len(chunk.token_ids) - k:][:a]
            finished = any(req.append_output_token(t) for t in drafted)  # stops at the first that ends it
            finished = finished or req.append_output_token(sampled[chunk.req_id], logprobs.get(chunk.req_id))
            # blocks holding final tokens only (a stop token is never appended) become reusable prefixes
            self.kv.cache_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            if finished:
                self.running.remove(req)
                self._release(req)
            else:
                req.spec_token_ids = list(drafts.get(chunk.req_id, ()))
            updated.append(req)
        return updated

    def _count_spec(self, req: Request, proposed: int, accepted: int) -> None:
        m = req.metrics
        m.num_draft_tokens += proposed
        m.num_accepted_tokens += accepted
        m.num_spec_steps += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        self.num_spec_steps += 1
