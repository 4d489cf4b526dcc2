"""Model drafts: a smaller model with the target's vocabulary (method "draft"), or the target itself with
some layers skipped (method "layer_skip": DecoderForCausalLM.layer_subset, weights shared), drafts k
tokens autoregressively.

The draft has its own paged KV cache: a ModelRunner over the draft model (its own KV tensors) and a
KVCacheManager (its own block pools, no prefix cache), with as many blocks per group as the target's.
Per request it remembers the tokens whose KV it holds. Before drafting it rolls back to the longest
prefix of them the request still has (accepted drafts stay, rejected ones go: KVCacheManager.truncate),
catches up with the request's tokens (the whole prompt the first time; pieces of at most `max_chunk`
tokens per forward, shared by the batch), and the last caught-up row gives the first draft; k - 1 decode
steps give the rest. Greedy requests draft the argmax; sampled ones draw from q, the draft's distribution
under the request's temperature / top-k / top-p / min-p, with the request's generator, and q goes to the
verifier. With a draft vocabulary (SpeculativeConfig.draft_vocab) the LM head is cut to those rows
(SubsetHead) and q is zero outside them. Preemption frees a request's draft blocks (recomputed at its next proposal); a request that
finds no free draft block gets no (further) drafts this step and starts over next time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from leanfm.engine.kv.groups import KVGroupSpec, bytes_per_block
from leanfm.engine.kv.manager import KVCacheManager
from leanfm.engine.messages import ScheduledChunk
from leanfm.engine.runner import ModelRunner
from leanfm.engine.sampler import SamplingState
from leanfm.engine.spec.decoder import ProposeItem
from leanfm.ops.kernels import linear
from leanfm.ops.sampling import sampling_probs


@dataclass
class _DraftSeq:
    """One request's state in the draft cache (what KVCacheManager reads of a request)."""

    request_id: str
    all_token_ids: list[int] = field(default_factory=list)  # the tokens whose KV the draft cache holds
    block_keys: list = field(default_factory=list)
    base: int = 0  # leading tokens known final: rollbacks never go below, so allocations drop relative to it


@dataclass
class _Work:
    item: ProposeItem
    seq: _DraftSeq
    pending: list[int]  # tokens still to feed
    drafts: list[int] = field(default_factory=list)
    probs: list[Tensor] = field(default_factory=list)


class DraftProposer:
    def __init__(self, model: nn.Module, groups: Sequence[KVGroupSpec], block_size: int, max_chunk: int,
                 vocab: Sequence[int] | None = None):
        self.runner = ModelRunner(model, groups, block_size)
        self.kv = KVCacheManager(groups, block_size, enable_prefix_caching=False)
        self.max_chunk = max_chunk
        self.seqs: dict[str, _DraftSeq] = {}
        self.head = None if vocab is None else SubsetHead(model, vocab)

    @property
    def kv_bytes(self) -> int:
        return self.runner.kv_bytes

    def preempted(self, req_id: str) -> None:
        self.free(req_id)

    def free(self, req_id: str) -> None:
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.kv.free(seq)

    def propose(self, items: Sequence[ProposeItem]) -> list[tuple[tuple[int, ...], Tensor | None]]:
        work = []
        for it in items:
            seq = self.seqs.get(it.req_id)
            if seq is None:
                seq = self.seqs[it.req_id] = _DraftSeq(it.req_id)
            self._rollback(seq, it.token_ids)
            seq.base = len(seq.all_token_ids)
            work.append(_Work(it, seq, list(it.token_ids[len(seq.all_token_ids):])))
        active = [w for w in work if w.pending]
        with torch.inference_mode():
            while active:
                self._round(active)
                active = [w for w in active if w.pending]
        out = []
        for w in work:
            w.seq.base = len(w.item.token_ids)
            q = torch.stack(w.probs) if w.probs else None
            out.append((tuple(w.drafts), q))
        return out

    def _rollback(self, seq: _DraftSeq, tokens: Sequence[int]) -> None:
        held = seq.all_token_ids
        n, end = seq.base, min(len(held), len(tokens))
        while n < end and held[n] == tokens[n]:
            n += 1
        if n < len(held):
            del held[n:]
            self.kv.truncate(seq, n)

    def _round(self, active: list[_Work]) -> None:
        """One draft forward: a piece of each active request's pending tokens within the token budget."""
        pieces, budget = [], self.max_chunk
        for w in active:
            if budget <= 0:
                break
            n = min(len(w.pending), budget)
            if not self.kv.allocate_slots(w.seq, w.seq.base, len(w.seq.all_token_ids) + n - w.seq.base):
                self.free(w.item.req_id)  # out of draft blocks: no more drafts for it now; start over next time
                w.pending = []
                continue
            pieces.append((w, n))
            budget -= n
        if not pieces:
            return
        pieces.sort(key=lambda p: p[1] != 1)  # single-token chunks first, as the runner wants them
        chunks, rows, sampled, end = [], [], [], 0
        for w, n in pieces:
            start = len(w.seq.all_token_ids)
            last = n == len(w.pending)  # the piece ends the pending tokens: its last row drafts a token
            chunks.append(ScheduledChunk(w.item.req_id, tuple(w.pending[:n]), start, self.kv.block_tables(w.seq), last))
            end += n
            w.seq.all_token_ids.extend(w.pending[:n])
            del w.pending[:n]
            if last:
                rows.append(end - 1)
                sampled.append(w)
        out = self.runner.run_model(chunks, rows, logits=self.head is None)
        if out is not None:
            self._draw(out if self.head is None else self.head(out), sampled)

    def _draw(self, logits: Tensor, sampled: list[_Work]) -> None:
        """Draft tokens from the logits rows (over the draft vocabulary when the head is cut)."""
        ids = None if self.head is None else self.head.ids
        greedy = logits.argmax(dim=-1)
        greedy = (greedy if ids is None else ids[greedy]).tolist()
        for i, w in enumerate(sampled):
            token = greedy[i]
            if w.item.state.params.temperature != 0.0:
                token, q = draw(logits[i], w.item.state, ids, self.runner.vocab_size)
                w.probs.append(q)
            w.drafts.append(token)
            if len(w.drafts) < w.item.k:
                w.pending = [token]


def draw(logits: Tensor, state: SamplingState, ids: Tensor | None = None, vocab_size: int = 0) -> tuple[int, Tensor]:
    """A draft token from one row of draft logits under the request's sampling options, and q (V,).
    With `ids`, the row covers those token ids only: q is zero elsewhere."""
    p = state.params
    q = sampling_probs(logits[None], p.temperature, p.top_k, p.top_p, p.min_p)[0]
    i = int(torch.multinomial(q, 1, generator=state.generator)[0])
    if ids is None:
        return i, q
    return int(ids[i]), torch.zeros(vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, ids, q)


class SubsetHead:
    """The model's LM head restricted to some token ids (their rows copied once): hidden (R, H) -> (R, N)."""

    def __init__(self, model: nn.Module, vocab: Sequence[int]):
        head = model.lm_head
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"draft_vocab needs a plain linear LM head without bias, the draft has "
                             f"{type(head).__name__}")
        self.ids = torch.tensor(sorted(set(vocab)), dtype=torch.long, device=head.weight.device)
        if int(self.ids[-1]) >= head.weight.shape[0]:
            raise ValueError(f"draft_vocab has token id {int(self.ids[-1])}, the vocabulary has {head.weight.shape[0]}")
        self.weight = head.weight.detach().index_select(0, self.ids).contiguous()
        self.cap = model.config.final_logit_softcapping

    def __call__(self, hidden: Tensor) -> Tensor:
        logits = linear(hidden, self.weight)
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap


def default_skip_layers(num_layers: int) -> tuple[int, ...]:
    """Every other layer of the middle half (the first and last quarter stay: they matter most)."""
    lo, hi = num_layers // 4, num_layers - num_layers // 4
    return tuple(range(lo + 1, hi, 2))


def subset_groups(groups: Sequence[KVGroupSpec], keep: Sequence[int], kv_heads: int, head_dim: int,
                  dtype_bytes: int, block_size: int) -> tuple[KVGroupSpec, ...]:
    """The target's KV groups restricted to the layers a layer-skip draft runs (same block counts)."""
    out = []
    for g in groups:
        layers = tuple(i for i in g.layers if i in set(keep))
        if layers:
            size = bytes_per_block(len(layers), kv_heads, head_dim, dtype_bytes, block_size)
            out.append(KVGroupSpec(g.name, layers, g.window, g.num_blocks, size))
    return tuple(out)
