"""Exact verification of draft tokens against the target model's logits.

A request's verify chunk is [x0, d1 .. dk]: row j of its logits is the target's distribution p_j for the
token after d_j (after x0 for j = 0), so rows 0..k-1 judge d1..dk and row k gives the bonus token.

  greedy    accept the longest prefix with d_{j+1} == argmax p_j, then emit argmax p_a (a = accepted):
            the very tokens plain greedy decoding would produce.
  sampling  rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_{j+1} with probability
            min(1, p_j(d) / q_j(d)); at the first rejection emit a draw from norm(max(0, p_j - q_j)), or,
            when all k are accepted, a draw from p_k. Every emitted token is distributed exactly as p.
            A deterministic proposer (n-gram) has q_j = a point mass on d_{j+1}: accept with probability
            p_j(d), on rejection draw from p_j with d removed.

p is the same distribution the plain sampler draws from: repetition penalty (counting the drafts before
each row as seen), temperature, top-k, top-p, min-p (ops.sampling.sampling_probs). Each request draws from
its own torch.Generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leanfm.engine.sampler import SamplingState
from leanfm.ops.sampling import apply_repetition_penalty, sampling_probs


def greedy_accept(target_argmax: Sequence[int], drafts: Sequence[int]) -> tuple[int, int]:
    """(number of drafts accepted, the target's next token) from the argmax of each of the k + 1 rows."""
    a = 0
    while a < len(drafts) and drafts[a] == target_argmax[a]:
        a += 1
    return a, int(target_argmax[a])


def rejection_sample(probs: Tensor, drafts: Sequence[int], draft_probs: Tensor | None,
                     generator: torch.Generator | None = None) -> tuple[int, int]:
    """probs (k + 1, V) target distributions, drafts (k,) drawn from draft_probs (k, V) (None: point masses).
    Returns (number of drafts accepted, the token emitted after them)."""
    k = len(drafts)
    a = k
    if k:
        idx = torch.tensor(drafts, dtype=torch.long, device=probs.device)
        rows = torch.arange(k, device=probs.device)
        p_x = probs[rows, idx]
        u = torch.rand(k, generator=generator, dtype=p_x.dtype).to(probs.device)
        # accept iff u < p/q; as u * q < p to skip the division (q > 0 where the draft was drawn)
        ok = u < p_x if draft_probs is None else u * draft_probs[rows, idx].to(p_x.dtype) < p_x
        rejected = (~ok).nonzero()
        a = int(rejected[0, 0]) if rejected.numel() else k
    if a == k:
        dist = probs[k]
    else:
        if draft_probs is None:
            dist = probs[a].clone()
            dist[drafts[a]] = 0.0
        else:
            dist = (probs[a] - draft_probs[a].to(probs.dtype)).clamp_min_(0.0)
        if not float(dist.sum()) > 1e-12:  # p == q up to rounding: the residual is noise, p is exact
            dist = probs[a]
    token = int(torch.multinomial(dist.unsqueeze(0), 1, generator=generator)[0, 0])
    return a, token


def verify_chunk(logits: Tensor, drafts: Sequence[int], state: SamplingState,
                 draft_probs: Tensor | None = None) -> tuple[int, int]:
    """logits (k + 1, V) of one request's verify chunk -> (drafts accepted, next token). Marks the emitted
    tokens as seen for the repetition penalty."""
    p = state.params
    logits = logits.float()
    if state.seen is not None:
        seen = state.seen.expand(len(drafts) + 1, -1).clone()
        for j, d in enumerate(drafts):
            seen[j + 1:, d] = True  # rows after d_j see it in their context
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.temperature == 0.0:
        a, token = greedy_accept(logits.argmax(dim=-1).tolist(), drafts)
    else:
        probs = sampling_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p)
        q = None if draft_probs is None else draft_probs[:len(drafts)]
        a, token = rejection_sample(probs, drafts, q, state.generator)
    if state.seen is not None:
        state.seen[0, list(drafts[:a]) + [token]] = True
    return a, token
