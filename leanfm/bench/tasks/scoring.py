"""Log-likelihood of continuations given contexts, batched, with the token boundary handled as lm-eval does.

Tokenization (`encode_pair`, lm-evaluation-harness' `_encode_pair`): trailing whitespace of the context
moves to the front of the continuation; the context and context+continuation are encoded separately
and the continuation tokens are the latter's tokens past the context's length. So a token that merges
across the boundary is scored as part of the continuation, and the scored sequence is always
context_ids + continuation_ids. BOS is prepended to both when the tokenizer adds one (Gemma); an empty
context becomes [BOS] (or [EOS] without a BOS), as lm-eval's prefix token.

Scorers (all return one `Score` per continuation: summed natural-log probability, whether every
continuation token is the argmax, and the token count):
- `score_shared`: one item's pairs, which share a token prefix: the whole context for multiple choice;
  the demonstrations and the sentence up to the blank for winogrande's per-option contexts. The prefix
  runs once at batch 1 into a KV cache; its keys/values are copied into a batch-B cache and each row's
  remaining tokens (the rest of its context, its continuation minus the last token; right-padded) run in
  one forward from position len(prefix). The prefix's last position predicts every first continuation
  token that follows it directly (one row of logits for all choices). Right padding is harmless:
  attention is causal and padded positions come after every scored one.
- `score_padded`: independent pairs (lambada passages), sorted by length and run `batch_size` at a time as
  right-padded rows with plain causal attention.
- `score_naive`: one full forward per pair; the reference the others are tested against.
Logits are computed only at scored positions, `LOGITS_CHUNK` rows at a time (vocab 262144 for Gemma).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from leanfm.models.interface import ContiguousKVCache, KVCacheMeta
from leanfm.utils.errors import LeanfmError

LOGITS_CHUNK = 128
Pair = tuple[list[int], list[int]]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of ln p(continuation token | everything before it)
    greedy: bool  # every continuation token is the argmax of its distribution
    n_tokens: int


def _prefix(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos", False) else []


def encode_pair(tokenizer, context: str, continuation: str, _memo: dict[str, list[int]] | None = None) -> Pair:
    """(context_ids, continuation_ids) as lm-eval's `_encode_pair` computes them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    prefix = _prefix(tokenizer)
    if _memo is not None and context in _memo:
        ctx = _memo[context]
    else:
        ctx = prefix + tokenizer.encode(context, add_special_tokens=False)
        if _memo is not None:
            _memo[context] = ctx
    whole = prefix + tokenizer.encode(context + continuation, add_special_tokens=False)
    if not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_ids[0]
        ctx, whole = [start], [start, *whole]
    cont = whole[len(ctx):]
    if not cont:
        raise LeanfmError(f"continuation {continuation!r} encodes to no tokens after its context; "
                          f"give every choice some text")
    return ctx, cont


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> list[Pair]:
    """`encode_pair` for each (context, continuation), encoding each distinct context once."""
    memo: dict[str, list[int]] = {}
    return [encode_pair(tokenizer, c, t, memo) for c, t in zip(contexts, continuations, strict=True)]


def truncate(ctx: list[int], conts: Sequence[list[int]], max_len: int) -> list[int]:
    """Drop context tokens from the left so context + longest continuation - 1 fits `max_len` (lm-eval)."""
    longest = max(len(c) for c in conts)
    if longest > max_len:
        raise LeanfmError(f"a continuation of {longest} tokens exceeds the model's context of {max_len}; "
                          f"shorten the choices")
    keep = max_len + 1 - longest
    return ctx[-keep:] if len(ctx) > keep else ctx


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def score_rows(model, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """hidden (M, H) at positions predicting `targets` (M,) -> (logprob (M,) float64, argmax hit (M,) bool)."""
    lps, hits = [], []
    for s in range(0, hidden.shape[0], LOGITS_CHUNK):
        logits = model.compute_logits(hidden[s:s + LOGITS_CHUNK]).float()
        t = targets[s:s + LOGITS_CHUNK]
        lps.append(torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1).double())
        hits.append(logits.argmax(dim=-1) == t)
    if not lps:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(lps).cpu(), torch.cat(hits).cpu()


def _pad(rows: Sequence[Sequence[int]], device) -> Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _scores(lp: Tensor, hit: Tensor, lengths: Sequence[int]) -> list[Score]:
    out, s = [], 0
    for n in lengths:
        out.append(Score(float(lp[s:s + n].sum()), bool(hit[s:s + n].all()), n))
        s += n
    return out


def common_prefix_len(pairs: Sequence[Pair]) -> int:
    """Length of the longest token prefix every context+continuation shares, at most the shortest context
    (so every scored token lies past it)."""
    seqs = [c + t for c, t in pairs]
    n = min(len(c) for c, _ in pairs)
    for j in range(n):
        if any(s[j] != seqs[0][j] for s in seqs[1:]):
            return j
    return n


@torch.inference_mode()
def score_shared(model, pairs: Sequence[Pair], batch_size: int = 16) -> list[Score]:
    """Score pairs that share a token prefix (one item's choices) running the prefix once (KV branching).

    The prefix (`common_prefix_len`: the whole context for multiple choice; the few-shot text and the
    sentence up to the blank for winogrande) runs at batch 1 into a KV cache; each row's remaining tokens
    (rest of its context, continuation minus its last token) run right-padded in batches of `batch_size`
    on a copy of that cache. Falls back to `score_padded` when nothing is shared.
    """
    p = common_prefix_len(pairs)
    if p == 0:
        return score_padded(model, pairs, batch_size)
    device, dtype = _device_dtype(model)
    seqs = [c + t for c, t in pairs]
    cache = ContiguousKVCache(model.config, 1, p, dtype, device)
    hidden = model(torch.tensor([seqs[0][:p]], device=device), torch.arange(p, device=device)[None],
                   KVCacheMeta(cache, 0))
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in pairs]
    at_p = [i for i, (c, _) in enumerate(pairs) if len(c) == p]  # first target predicted by the prefix
    if at_p:
        logits = model.compute_logits(hidden[0, -1:]).float()[0]  # one row of logits, read at every target
        t = torch.tensor([seqs[i][p] for i in at_p], device=device)
        lp, hit = torch.log_softmax(logits, -1)[t].double().cpu(), (t == logits.argmax()).cpu()
        for k, i in enumerate(at_p):
            parts[i].append((lp[k:k + 1], hit[k:k + 1]))
    todo = [i for i, s in enumerate(seqs) if len(s) - 1 > p]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        rows = [seqs[i][p:-1] for i in chunk]
        width = max(len(r) for r in rows)
        branch = ContiguousKVCache(model.config, len(chunk), p + width, dtype, device)
        for layer in range(len(branch.k)):
            branch.k[layer][:, :, :p] = cache.k[layer]
            branch.v[layer][:, :, :p] = cache.v[layer]
        positions = torch.arange(p, p + width, device=device)[None].expand(len(chunk), -1)
        h = model(_pad(rows, device), positions, KVCacheMeta(branch, p))
        # target j of row i (j >= its context length, j > p) is predicted by branch position j - 1 - p
        spans = [range(max(len(pairs[i][0]), p + 1), len(seqs[i])) for i in chunk]
        sel = [b for b, r in enumerate(spans) for _ in r]
        pos = [j - 1 - p for r in spans for j in r]
        targets = [seqs[i][j] for i, r in zip(chunk, spans, strict=True) for j in r]
        lp, hit = score_rows(model, h[torch.tensor(sel, device=device), torch.tensor(pos, device=device)],
                             torch.tensor(targets, device=device))
        for i, sc in zip(chunk, _split(lp, hit, [len(r) for r in spans]), strict=True):
            parts[i].append(sc)
    out = []
    for (_, cont), ps in zip(pairs, parts, strict=True):
        lp, hit = torch.cat([a for a, _ in ps]), torch.cat([b for _, b in ps])
        assert lp.numel() == len(cont), "every continuation token is scored exactly once"
        out.append(Score(float(lp.sum()), bool(hit.all()), len(cont)))
    return out


def _split(lp: Tensor, hit: Tensor, lengths: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    out, s = [], 0
    for n in lengths:
        out.append((lp[s:s + n], hit[s:s + n]))
        s += n
    return out


@torch.inference_mode()
def score_padded(model, pairs: Sequence[Pair], batch_size: int = 16,
                 on_batch: Callable[[int], None] | None = None) -> list[Score]:
    """Score independent (context, continuation) pairs as right-padded batches of full sequences."""
    device, _ = _device_dtype(model)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[Score | None] = [None] * len(pairs)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        rows = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
        ids = _pad(rows, device)
        positions = torch.arange(ids.shape[1], device=device)[None].expand(len(chunk), -1)
        h = model(ids, positions)
        sel, pos, targets = [], [], []
        for b, i in enumerate(chunk):
            ctx, cont = pairs[i]
            sel += [b] * len(cont)
            pos += range(len(ctx) - 1, len(ctx) - 1 + len(cont))
            targets += cont
        lp, hit = score_rows(model, h[torch.tensor(sel, device=device), torch.tensor(pos, device=device)],
                             torch.tensor(targets, device=device))
        for i, sc in zip(chunk, _scores(lp, hit, [len(pairs[i][1]) for i in chunk]), strict=True):
            out[i] = sc
        if on_batch is not None:
            on_batch(len(chunk))
    return out  # type: ignore[return-value]


@torch.inference_mode()
def score_naive(model, pairs: Sequence[Pair]) -> list[Score]:
    """Reference: one forward per pair over context + continuation, full logits, no cache, no padding."""
    device, _ = _device_dtype(model)
    out = []
    for ctx, cont in pairs:
        seq = (ctx + cont)[:-1]
        h = model(torch.tensor([seq], device=device), torch.arange(len(seq), device=device)[None])
        logp = torch.log_softmax(model.compute_logits(h)[0].float(), dim=-1)
        rows = logp[len(ctx) - 1:]
        t = torch.tensor(cont, device=device)
        out.append(Score(float(rows.gather(1, t[:, None]).double().sum()),
                         bool((rows.argmax(-1) == t).all()), len(cont)))
    return out
