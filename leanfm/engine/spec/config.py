"""SpeculativeConfig: how the engine drafts tokens and when it stops drafting. Frozen, validated, torch-free.

    LLM(model, speculative={"method": "ngram", "num_speculative_tokens": 4})
    LLM(model, speculative={"method": "draft", "draft_model": "path/or/alias"})   # or a loaded model module
    LLM(model, speculative={"method": "layer_skip", "skip_layers": (5, 7, 9)})    # None: every other middle layer

Methods:
  ngram       prompt lookup: the last n tokens (n = ngram_max down to ngram_min) matched in the request's
              prompt and output; the tokens that followed the latest earlier match are the draft
  draft       a smaller model with the same vocabulary drafts autoregressively (its own paged KV cache)
  layer_skip  self-speculation: the target's own forward with `skip_layers` skipped drafts (shared weights,
              its own KV cache for the layers it runs)

`draft_vocab` cuts a model draft's LM head to the given token ids (FR-Spec, Zhao et al. 2025: the most
frequent tokens): on a small model with a large vocabulary the head is most of the draft's cost (Gemma 3
270M: 168M of its 268M weights). The draft then never proposes other tokens; the output stays exact.

Exactness: greedy output is plain decoding's, token for token (up to float rounding: a verify step computes
k + 1 rows where plain decoding computes one, so an exact tie of two logits could break the other way).
Sampled output follows the target's distribution exactly (rejection sampling), but a seeded request draws
other tokens than without speculation, and since the drafts a step verifies depend on the token budget and
the off-switch, its tokens may depend on what else runs.

Speculation switches off for a step when more than `disable_above_batch` requests run (None: never): a
verify step computes k + 1 tokens per request, nearly free at batch 1 where the weights are read once per
step, but at a large batch the step is compute-bound and drafts that get rejected are pure cost. The
default, 2, is measured (benchmarks/bench_spec.py --batch-sizes, gemma-3-270m, n-gram, k = 4, 1 thread):
output tokens per CPU-second with / without speculation were 2.24x at batch 1, 1.13x at 2, 0.94x at 4.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from leanfm.utils.errors import LeanfmError

METHODS = ("ngram", "draft", "layer_skip")
MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfigError(LeanfmError, ValueError):
    """A speculative-decoding option out of range or inconsistent with the method."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # k: draft tokens verified per step
    ngram_min: int = 2  # shortest suffix the n-gram proposer matches
    ngram_max: int = 4  # longest suffix (tried first)
    draft_model: Any = None  # method "draft": alias / .gguf / HF dir, or a loaded model (module or LoadedModel)
    skip_layers: tuple[int, ...] | None = None  # method "layer_skip"; None = every other middle layer
    draft_vocab: tuple[int, ...] | None = None  # draft / layer_skip: the only tokens drafted (LM head cut to them)
    disable_above_batch: int | None = 2  # no speculation in a step with more running requests; None = never off

    def __post_init__(self) -> None:
        for name in ("skip_layers", "draft_vocab"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                try:
                    object.__setattr__(self, name, tuple(value))
                except TypeError:
                    self._fail(f"{name} must be a list of integers, got {value!r}")
        if self.method not in METHODS:
            self._fail(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            self._fail(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if not (_is_int(self.ngram_min) and _is_int(self.ngram_max) and 1 <= self.ngram_min <= self.ngram_max):
            self._fail(f"need 1 <= ngram_min <= ngram_max (integers), got {self.ngram_min!r}, {self.ngram_max!r}")
        if (self.method == "draft") != (self.draft_model is not None):
            self._fail("method 'draft' needs draft_model (and only it takes one)")
        if self.skip_layers is not None:
            if self.method != "layer_skip":
                self._fail("skip_layers is for method 'layer_skip'")
            s = self.skip_layers
            if not s or not all(_is_int(i) and i >= 0 for i in s) or len(set(s)) != len(s):
                self._fail(f"skip_layers must be distinct layer indices >= 0, got {s!r}")
        v = self.draft_vocab
        if v is not None:
            if self.method == "ngram":
                self._fail("draft_vocab is for the model drafts (methods 'draft' and 'layer_skip')")
            if not v or not all(_is_int(i) and i >= 0 for i in v):
                self._fail("draft_vocab must be a non-empty list of token ids >= 0")
        d = self.disable_above_batch
        if d is not None and (not _is_int(d) or d < 1):
            self._fail(f"disable_above_batch must be a positive integer (or None = never), got {d!r}")

    def _fail(self, message: str) -> None:
        raise SpeculativeConfigError(f"speculative: {message}")

    @classmethod
    def from_any(cls, value: Any) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, a method name, or a dict of fields (unknown keys named in the error)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if not isinstance(value, dict):
            raise SpeculativeConfigError(f"speculative must be a method name or a dict of options, got "
                                         f"{type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpeculativeConfigError(f"unknown speculative option(s) {', '.join(unknown)}; valid: "
                                         f"{', '.join(sorted(known))}")
        return cls(**value)

    def should_speculate(self, num_running: int) -> bool:
        """The adaptive off-switch: speculate in a step with this many running requests?"""
        return self.disable_above_batch is None or num_running <= self.disable_above_batch

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would deep-copy a model
        if d["draft_model"] is not None and not isinstance(d["draft_model"], str):
            d["draft_model"] = type(self.draft_model).__name__  # a loaded model: named, not serialized
        for name in ("skip_layers", "draft_vocab"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d
