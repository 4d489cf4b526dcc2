"""Request (one generation's state inside the engine) and RequestOutput (what callers get back). Torch-free.

A request's tokens are its prompt followed by its outputs (behind `num_virtual_tokens` placeholder ids
when the model carries a prompt or prefix tuning adapter, which fills their positions 0..n-1 with its
virtual tokens: leanfm.tune.prompt; outputs and metrics show the prompt without them);
`num_computed_tokens` counts those whose KV is in the cache. Each step the scheduler lets it catch up: a
whole or partial prompt (prefill, chunked prefill, after a prefix hit or a preemption) or the one token
sampled last step (decode), followed by the draft tokens `spec_token_ids` when speculative decoding
proposed some (then it rolls back past the rejected ones).
The per-request random generator lives in the runner (it is a tensor-side object), keyed by request id
and seeded from `params.seed`; it survives preemption, so a seed gives the same tokens in any batch.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from dataclasses import dataclass, field

from leanfm.engine.params import SamplingParams
from leanfm.engine.stop import StopMatcher

VIRTUAL_TOKEN_ID = 0  # the placeholder id at a virtual token's position (the model never reads it)
_arrivals = itertools.count()  # ties of equal priority and arrival time keep submission order


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its KV was dropped and will be recomputed
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context is full
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) and token counts of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled
    num_preemptions: int = 0
    num_draft_tokens: int = 0  # speculative decoding: draft tokens verified
    num_accepted_tokens: int = 0  # of which accepted
    num_spec_steps: int = 0  # steps that verified at least one draft

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted over verified draft tokens (0 without speculation)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step: accepted drafts plus the target's own token (1 = no draft ever accepted)."""
        return 1.0 + self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else 0.0

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first sampled token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, per second after the first."""
        n = self.num_generated_tokens - 1
        if n <= 0 or self.finish_time is None or self.first_token_time is None:
            return 0.0
        dt = self.finish_time - self.first_token_time
        return n / dt if dt > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One sampled token's log-probability under the distribution it was drawn from (after penalties,
    temperature and top-k/top-p/min-p filtering; for greedy rows the penalized logits' softmax), and the
    `params.logprobs` most likely tokens of that distribution, best first. Filtered tokens have -inf."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # everything generated so far (stop strings cut, as in Generator)
    token_ids: list[int]
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    metrics: RequestMetrics
    new_text: str = ""  # what this output adds to the previous one of the same request (streaming)
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # per output token, when params.logprobs is set
    new_logprobs: list[TokenLogprobs] | None = None  # those of new_token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 stop_token_ids: frozenset[int] = frozenset(), max_model_len: int, detokenizer=None,
                 prompt: str | None = None, priority: int = 0, arrival_time: float | None = None,
                 adapter: str | None = None, lora_id: int = 0, cache_salt: str | None = None,
                 num_virtual_tokens: int = 0):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_virtual_tokens = num_virtual_tokens
        self.all_token_ids = [VIRTUAL_TOKEN_ID] * num_virtual_tokens + self.prompt_token_ids
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprobs] | None = None if params.logprobs is None else []
        self.params = params
        self.priority = priority
        self.arrival_order = next(_arrivals)
        self.metrics = RequestMetrics(time.perf_counter() if arrival_time is None else arrival_time,
                                      num_prompt_tokens=len(prompt_token_ids))
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_keys: list = []  # the KV manager's memo of block hashes (see kv.manager)
        self.adapter, self.lora_id = adapter, lora_id  # the LoRA adapter it runs with (None / 0: the base)
        self.cache_salt = cache_salt  # seeds its prefix-cache hash chain (KV differs per adapter)
        self.spec_token_ids: list[int] = []  # draft tokens to verify next step (speculative decoding)
        self.stop_token_ids = stop_token_ids
        self.max_output_tokens = min(params.max_tokens, max_model_len - len(self.all_token_ids))
        self._detok = detokenizer
        self._matcher = StopMatcher(params.stop)
        self._sent_text = self._sent_tokens = 0  # what the last output already reported

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Lower is served first: priority, then arrival."""
        return self.priority, self.metrics.arrival_time, self.arrival_order

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def text(self) -> str:
        return self._matcher.text

    def append_output_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> bool:
        """Take a sampled token (and its logprobs); True when it ends the request (the status says why)."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.perf_counter()
        if token_id in self.stop_token_ids:
            self.finish(RequestStatus.FINISHED_STOPPED)
            return True
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if self.output_logprobs is not None and logprobs is not None:
            self.output_logprobs.append(logprobs)
        if self._detok is not None:
            _, stopped = self._matcher.push(self._detok.push(token_id))
            if stopped:
                self.finish(RequestStatus.FINISHED_STOPPED)
                return True
        if len(self.output_token_ids) >= self.max_output_tokens:
            self.finish(RequestStatus.FINISHED_LENGTH)
            return True
        return False

    def finish(self, status: RequestStatus) -> None:
        self.status = status
        self.metrics.finish_time = time.perf_counter()
        self.metrics.num_generated_tokens = len(self.output_token_ids)
        if self._detok is not None and not self._matcher.stopped:
            self._matcher.push(self._detok.flush(), final=True)

    def output(self) -> RequestOutput:
        """A snapshot: cumulative text and tokens, plus what is new since the previous snapshot."""
        text, ids = self._matcher.text, self.output_token_ids
        new_text, new_ids = text[self._sent_text:], ids[self._sent_tokens:]
        lps = self.output_logprobs
        new_lps = None if lps is None else lps[self._sent_tokens:]
        self._sent_text, self._sent_tokens = len(text), len(ids)
        self.metrics.num_generated_tokens = len(ids)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, text, list(ids),
                             self.status.value if self.finished else None, dataclasses.replace(self.metrics),
                             new_text, new_ids, None if lps is None else list(lps), new_lps)
