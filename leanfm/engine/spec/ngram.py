"""N-gram prompt lookup (Saxena 2023; LLMA's copy-and-verify): drafts copied from the request's own tokens.

The last n tokens of the request (n = n_max down to n_min) are looked up among its earlier tokens, prompt
and output alike; the tokens that followed the latest earlier occurrence are the draft (up to k). Nothing
is proposed when no suffix of length >= n_min occurred before. Input-grounded tasks (rewrite, summarize,
extract, code edits) copy long spans of their prompt, so the drafts are often right.

Each request keeps an index {n-gram: end position of its latest occurrence}, extended with the n-grams of
the tokens that arrived since the last call, so a proposal costs O(new tokens * (n_max - n_min + 1)), not
a scan of the whole sequence. Pure Python, torch-free. The draft is deterministic, so its distribution q is
a point mass (verify.rejection_sample with draft_probs=None).
"""

from __future__ import annotations

from collections.abc import Sequence


class _Index:
    __slots__ = ("ends", "upto")

    def __init__(self) -> None:
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end position of its latest occurrence
        self.upto = 0  # the n-grams ending at positions < upto are indexed


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, n_min: int = 2, n_max: int = 4):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.k, self.n_min, self.n_max = num_speculative_tokens, n_min, n_max
        self._index: dict[str, _Index] = {}

    def propose_tokens(self, req_id: str, tokens: Sequence[int], k: int | None = None) -> list[int]:
        """Up to k draft tokens continuing `tokens` (the request's prompt + outputs so far)."""
        k = self.k if k is None else k
        idx = self._index.get(req_id)
        if idx is None:
            idx = self._index[req_id] = _Index()
        last = len(tokens) - 1  # the suffix ends here; earlier occurrences end before it
        ends = idx.ends
        for e in range(idx.upto, last):
            for n in range(self.n_min, min(self.n_max, e + 1) + 1):
                ends[tuple(tokens[e - n + 1:e + 1])] = e
        idx.upto = max(idx.upto, last)
        if k <= 0:
            return []
        for n in range(min(self.n_max, last), self.n_min - 1, -1):
            e = ends.get(tuple(tokens[last - n + 1:]))
            if e is not None:
                return list(tokens[e + 1:e + 1 + k])
        return []

    def propose(self, batch: Sequence) -> list[tuple[tuple[int, ...], None]]:
        """The Proposer protocol (leanfm.engine.spec.decoder): items with .req_id, .token_ids, .k."""
        return [(tuple(self.propose_tokens(it.req_id, it.token_ids, it.k)), None) for it in batch]

    def free(self, req_id: str) -> None:
        self._index.pop(req_id, None)

    def preempted(self, req_id: str) -> None:
        """Nothing to give back: the index stays valid (a request's tokens never change)."""
