"""Per-request sampling over a batch of logits: each row with its own parameters and random generator.

Greedy rows without penalties share one argmax; the others go through leanfm.ops.sampling
row by row with their request's torch.Generator, in the same order of operations as the plain
Generator, so a seeded request draws the same tokens whatever else is in the batch (and whether or not
it asks for logprobs: they are read off the distribution the token was drawn from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leanfm.engine.params import SamplingParams
from leanfm.engine.request import TokenLogprobs
from leanfm.ops.kernels.fused import argmax
from leanfm.ops.sampling import apply_presence_frequency_penalty, apply_repetition_penalty, process_logits


@dataclass
class SamplingState:
    params: SamplingParams
    generator: torch.Generator
    seen: Tensor | None  # (1, V) bool: prompt and output tokens, when a repetition penalty is set
    counts: Tensor | None = None  # (1, V) float: output token counts, when a presence/frequency penalty is set

    @property
    def plain_greedy(self) -> bool:
        return self.params.temperature == 0.0 and self.seen is None and self.counts is None

    def penalize(self, row: Tensor) -> Tensor:
        """row (1, V) float -> the row after this request's penalties."""
        p = self.params
        if self.seen is not None:
            row = apply_repetition_penalty(row, self.seen, p.repetition_penalty)
        if self.counts is not None:
            row = apply_presence_frequency_penalty(row, self.counts, p.presence_penalty, p.frequency_penalty)
        return row

    def record(self, token: int) -> None:
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1


def new_sampling_state(params: SamplingParams, prompt_token_ids: tuple[int, ...], vocab_size: int,
                       device: torch.device) -> SamplingState:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
        seen[0, torch.tensor(prompt_token_ids, dtype=torch.long, device=device)] = True
    counts = None
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        counts = torch.zeros(1, vocab_size, dtype=torch.float32, device=device)
    return SamplingState(params, gen, seen, counts)


def sample_rows(logits: Tensor, states: list[SamplingState]) -> list[int]:
    """logits (R, V) -> one token id per row, row i sampled with states[i]."""
    return sample_rows_with_logprobs(logits, states)[0]


def sample_rows_with_logprobs(logits: Tensor, states: list[SamplingState]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """sample_rows, plus each row's TokenLogprobs when its request asks for them (else None)."""
    logits = logits.float()
    out = argmax(logits).tolist()  # the C++ kernel on the CPU (~5x torch's over a 262k vocabulary)
    logprobs: list[TokenLogprobs | None] = [None] * len(states)
    for i, s in enumerate(states):
        p = s.params
        if s.plain_greedy and p.logprobs is None:
            continue
        row = s.penalize(logits[i:i + 1])
        if p.temperature == 0.0:
            out[i] = int(row.argmax(dim=-1)[0])
        else:  # what ops.sampling.sample does, keeping the distribution for the logprobs
            row = process_logits(row, p.temperature, p.top_k, p.top_p, p.min_p)
            out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=s.generator)[0, 0])
        if p.logprobs is not None:
            logprobs[i] = token_logprobs(row[0], out[i], p.logprobs)
        s.record(out[i])
    return out, logprobs


def token_logprobs(logits: Tensor, token: int, n: int) -> TokenLogprobs:
    """logits (V,) of the final distribution -> the token's logprob and the n best (ids, logprobs)."""
    lp = torch.log_softmax(logits, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if n:
        values, ids = torch.topk(lp, min(n, lp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(token, float(lp[token]), top)
