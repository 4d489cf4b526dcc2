"""Pure sampling functions over a batch of logits (B, V). No state, no I/O.

Order of the logit transforms follows Hugging Face's generate: repetition penalty, temperature,
top-k, top-p, min-p; then a draw from the softmax (or argmax when temperature is 0). OpenAI's presence
and frequency penalties, when used, come right after the repetition penalty (as in vLLM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from leanfm.ops.kernels.fused import argmax


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty: divide positive, multiply negative logits of tokens already seen.

    logits: (B, V) float; seen: (B, V) bool mask of tokens in the prompt or the output so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(logits: Tensor, counts: Tensor, presence: float, frequency: float) -> Tensor:
    """OpenAI's penalties: subtract `frequency` x (times a token was generated) + `presence` x (generated
    at all). logits: (B, V) float; counts: (B, V) float counts of each token in the output so far."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids (B,) from logits (B, V). temperature == 0 is greedy."""
    if temperature == 0.0:
        return argmax(logits)  # logits.argmax(-1); a C++ kernel for float32 on the CPU
    probs = process_logits(logits, temperature, top_k, top_p, min_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def process_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> Tensor:
    """What `sample` draws from when temperature > 0: logits scaled, then filtered (dropped tokens -inf)."""
    logits = logits.float() / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def sampling_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> Tensor:
    """The distribution `sample` draws from (temperature > 0): (B, V) float32 probabilities after
    temperature, top-k, top-p and min-p, in that order. Speculative decoding's verification needs it whole."""
    if temperature <= 0.0:
        raise ValueError("sampling_probs needs temperature > 0 (greedy has no distribution to draw from)")
    return process_logits(logits, temperature, top_k, top_p, min_p).softmax(-1)
