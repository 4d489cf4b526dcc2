"""The data-only messages between the scheduler and the runner (DESIGN.md principle 6). Torch-free.

    SchedulerOutput --> runner.execute() --> RunnerOutput --> scheduler.update_from_output()

Every scheduled request gets one ScheduledChunk: the tokens whose KV to compute this step (a whole or
partial prompt, or the one token sampled last step, maybe followed by draft tokens), the position of the
first, its block table per KV group, and whether the step reaches the end of its known tokens (then the
runner samples its next token). With speculative decoding (leanfm.engine.spec) a chunk's last
`num_draft_tokens` tokens are drafts the runner verifies, and `num_propose` asks it for the next drafts;
RunnerOutput then says how many drafts each request accepted and carries the new drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanfm.engine.params import SamplingParams
from leanfm.engine.request import TokenLogprobs


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """Sent once, the first time a request is scheduled: what the runner needs to sample for it."""

    req_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    req_id: str
    token_ids: tuple[int, ...]  # tokens to compute: positions start_pos .. start_pos + len - 1
    start_pos: int  # = the request's num_computed_tokens
    block_tables: tuple[tuple[int, ...], ...]  # per KV group; entry i holds positions [i*bs, (i+1)*bs)
    needs_logits: bool  # the chunk ends at the request's last known token: sample the next one
    num_draft_tokens: int = 0  # the chunk's last tokens are this many drafts to verify
    num_propose: int = 0  # after sampling, draft up to this many tokens for the next step
    lora_id: int = 0  # the LoRA adapter its rows use (leanfm.engine.lora); 0 = the base model


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    new_requests: tuple[NewRequestData, ...] = ()
    finished_req_ids: tuple[str, ...] = ()  # finished or aborted since the last step: drop their state
    preempted_req_ids: tuple[str, ...] = ()  # preempted this step (their sampling state is kept)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    req_ids: tuple[str, ...]  # the requests that sampled (chunks with needs_logits), in chunk order
    sampled_token_ids: tuple[int, ...]  # per request: the token after its accepted drafts
    num_accepted: tuple[int, ...] = ()  # per request: leading drafts of its chunk accepted (empty: none)
    draft_token_ids: tuple[tuple[int, ...], ...] = ()  # per request: drafts for the next step (empty: none)
    logprobs: tuple[TokenLogprobs | None, ...] = ()  # per request, when it asked (else None); never with drafts


EMPTY_RUNNER_OUTPUT = RunnerOutput((), ())
