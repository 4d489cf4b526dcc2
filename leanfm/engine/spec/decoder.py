"""SpecDecoder: the runner's speculative-decoding state, between a proposer and the verifier.

It keeps each request's tokens (prompt + outputs, as the runner sampled them: the proposers draft from
them) and the draft distributions q of the drafts in flight (None for deterministic proposers), and after
each step's verification extends the tokens and asks the proposer for the next drafts of the chunks whose
`num_propose` is set.

A proposer has three methods:

    propose(items: list[ProposeItem]) -> list[(draft token ids, q (k, V) tensor or None)]
    preempted(req_id)     # the request lost its KV: give back what it holds, keep what stays valid
    free(req_id)          # the request finished or was aborted: forget it
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from leanfm.engine.messages import ScheduledChunk
from leanfm.engine.sampler import SamplingState


@dataclass(slots=True)
class ProposeItem:
    req_id: str
    token_ids: list[int]  # prompt + outputs so far; read only
    k: int  # draft at most this many tokens
    state: SamplingState  # the request's sampling parameters and generator


class Proposer(Protocol):
    def propose(self, items: Sequence[ProposeItem]) -> list[tuple[tuple[int, ...], Tensor | None]]: ...

    def preempted(self, req_id: str) -> None: ...

    def free(self, req_id: str) -> None: ...


class SpecDecoder:
    def __init__(self, proposer: Proposer):
        self.proposer = proposer
        self.tokens: dict[str, list[int]] = {}
        self.draft_probs: dict[str, Tensor] = {}  # q of the drafts the scheduler holds, per request

    @property
    def kv_bytes(self) -> int:
        """The draft's own KV cache (0 for proposers without one)."""
        return getattr(self.proposer, "kv_bytes", 0)

    def add(self, req_id: str, prompt_token_ids: Sequence[int]) -> None:
        self.tokens[req_id] = list(prompt_token_ids)

    def finished(self, req_id: str) -> None:
        self.tokens.pop(req_id, None)
        self.draft_probs.pop(req_id, None)
        self.proposer.free(req_id)

    def preempted(self, req_id: str) -> None:
        self.draft_probs.pop(req_id, None)  # the scheduler dropped the drafts
        self.proposer.preempted(req_id)

    def step(self, chunks: Sequence[ScheduledChunk], tokens: Sequence[int], accepted: Sequence[int],
             states: dict[str, SamplingState]) -> tuple[tuple[int, ...], ...]:
        """After verification: extend each sampled request's tokens, then draft for the chunks that ask.
        Returns the drafts per chunk (aligned with `chunks`), or () when nobody asked."""
        items = []
        for c, token, a in zip(chunks, tokens, accepted, strict=True):
            history = self.tokens[c.req_id]
            if a:
                first = len(c.token_ids) - c.num_draft_tokens
                history.extend(c.token_ids[first:first + a])
            history.append(token)
            self.draft_probs.pop(c.req_id, None)
            if c.num_propose:
                items.append(ProposeItem(c.req_id, history, c.num_propose, states[c.req_id]))
        if not items:
            return ()
        drafts: dict[str, tuple[int, ...]] = {}
        for item, (draft, q) in zip(items, self.proposer.propose(items), strict=True):
            drafts[item.req_id] = tuple(draft)
            if q is not None and draft:
                self.draft_probs[item.req_id] = q
        return tuple(drafts.get(c.req_id, ()) for c in chunks)
