"""Per-request sampling over a batch of logits: each row with its own parameters and random generator.

Greedy rows without penalties share one argmax; the others go through leanfm.ops.sampling
row by row with their request's torch.Generator, in the same order of operations as the plain
Generator, so a seeded request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leanfm.engine.params import SamplingParams
from leanfm.ops.sampling import apply_presence_frequency_penalty, apply_repetition_penalty, sample


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
    logits = logits.float()
    if all(s.plain_greedy for s in states):
        return logits.argmax(dim=-1).tolist()
    out = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(states):
        if s.plain_greedy:
            continue
        p = s.params
        row = s.penalize(logits[i:i + 1])
        out[i] = int(sample(row, p.temperature, p.top_k, p.top_p, p.min_p, s.generator)[0])
    for token, s in zip(out, states, strict=True):
        s.record(token)
    return out
