"""Plain generation on a contiguous KV cache: one sequence, token by token, streamed as text.

The hot loop does no Python-side allocation beyond the step's tensors: the cache is preallocated
for prompt + max_tokens, logits are computed for the last position only, and the repetition-penalty
mask is updated in place.

A model with a prompt or prefix tuning adapter (`model.num_virtual_tokens` = n > 0, leanfm.tune.prompt)
gets n placeholder ids in front of the prompt, at cache positions 0..n-1, which it fills with its
virtual tokens; they count against the context but not in the prompt's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from leanfm.engine.params import SamplingParams
from leanfm.engine.request import VIRTUAL_TOKEN_ID
from leanfm.engine.stop import StopMatcher
from leanfm.models.interface import ContiguousKVCache, KVCacheMeta
from leanfm.ops.sampling import apply_presence_frequency_penalty, apply_repetition_penalty, sample
from leanfm.utils.errors import ContextLengthError


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.token_ids) - 1  # the first token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class StreamEvent:
    """One step of a stream: new text (possibly empty while a character or stop string is pending)."""

    text: str
    token_id: int | None
    result: GenerationResult | None = field(default=None)  # set on the final event


class Generator:
    """Owns a model and its tokenizer; generates with a fresh contiguous KV cache per call."""

    def __init__(self, model, tokenizer, max_context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_context = max_context or self.config.max_position_embeddings
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @property
    def num_virtual_tokens(self) -> int:
        """Placeholder positions in front of every prompt (a prompt/prefix tuning adapter's; else 0)."""
        return int(getattr(self.model, "num_virtual_tokens", 0))

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise ContextLengthError("the prompt is empty after tokenization; give a non-empty prompt")
        nv = self.num_virtual_tokens
        if n_prompt + nv >= self.max_context:
            extra = f" (+ the adapter's {nv} virtual tokens)" if nv else ""
            raise ContextLengthError(
                f"prompt has {n_prompt} tokens{extra} but the context holds {self.max_context}; "
                "shorten the prompt (or raise --max-context if the model supports it)"
            )

    def generate(self, prompt: str | list[int], params: SamplingParams) -> GenerationResult:
        result = None
        for event in self.stream(prompt, params):
            result = event.result or result
        assert result is not None
        return result

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[StreamEvent]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_fits(len(ids))
        nv = self.num_virtual_tokens
        budget = min(params.max_tokens, self.max_context - nv - len(ids))
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(getattr(self.tokenizer, "stop_token_ids", None) or self.config.eos_token_id)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        detok = self.tokenizer.stream_decoder(skip_special_tokens=params.skip_special_tokens)
        matcher = StopMatcher(params.stop)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, self.config.vocab_size, dtype=torch.bool, device=self.device)
            seen[0, torch.tensor(ids, device=self.device)] = True
        counts = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            counts = torch.zeros(1, self.config.vocab_size, dtype=torch.float32, device=self.device)

        cache = ContiguousKVCache(self.config, 1, nv + len(ids) + budget, self.dtype, self.device)
        out_ids: list[int] = []
        finish = "length"
        t0 = time.perf_counter()
        t_first = t0
        with torch.inference_mode():
            step_ids = torch.tensor([[VIRTUAL_TOKEN_ID] * nv + ids], device=self.device)
            pos = 0
            for i in range(budget):
                positions = torch.arange(pos, pos + step_ids.shape[1], device=self.device).unsqueeze(0)
                hidden = self.model(step_ids, positions, KVCacheMeta(cache, pos, nv))
                logits = self.model.compute_logits(hidden[:, -1]).float()  # (1, V)
                pos += step_ids.shape[1]
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
                if counts is not None:
                    logits = apply_presence_frequency_penalty(logits, counts, params.presence_penalty,
                                                              params.frequency_penalty)
                nxt = sample(logits, params.temperature, params.top_k, params.top_p, params.min_p, gen)
                token = int(nxt[0])
                if i == 0:
                    t_first = time.perf_counter()
                if token in stop_ids:
                    finish = "stop"
                    break
                out_ids.append(token)
                if seen is not None:
                    seen[0, token] = True
                if counts is not None:
                    counts[0, token] += 1
                text, stopped = matcher.push(detok.push(token))
                if text or stopped:
                    yield StreamEvent(text, token)
                if stopped:
                    finish = "stop"
                    break
                step_ids = nxt.view(1, 1)
        if not matcher.stopped:
            tail, _ = matcher.push(detok.flush(), final=True)
            if tail:
                yield StreamEvent(tail, None)
        t_end = time.perf_counter()
        result = GenerationResult(
            text=matcher.text, token_ids=out_ids, finish_reason=finish, prompt_tokens=len(ids),
            prefill_seconds=t_first - t0, decode_seconds=t_end - t_first, first_token_seconds=t_first - t0,
        )
        yield StreamEvent("", None, result)
