"""OpenAI response bodies as plain dicts (no pydantic on the hot path): completions and chat completions,
whole and as stream chunks, their logprobs and usage. Engine outputs in, JSON-ready dicts out."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from leanfm.engine.request import TokenLogprobs

NEG_INF_LOGPROB = -9999.0  # JSON has no -inf (vLLM's convention for filtered tokens)

TokenText = Callable[[int], str]


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(v: float) -> float:
    return v if v > NEG_INF_LOGPROB else NEG_INF_LOGPROB


class Envelope:
    """id / object / created / model of one response, for the whole body and each chunk."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())

    def body(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def chunk(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None,
              with_usage_field: bool = False) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if with_usage_field:
            out["usage"] = usage_
        return out


# ---------------------------------------------------------------- completions
def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_logprobs(lps: Sequence[TokenLogprobs], token_text: TokenText, offset: int = 0,
                        want_top: bool = True) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text = token_text(lp.token_id)
        tokens.append(text)
        values.append(_lp(lp.logprob))
        offsets.append(offset)
        offset += len(text)
        if want_top:
            tops.append({token_text(t): _lp(v) for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops if want_top else None,
            "text_offset": offsets}


# ---------------------------------------------------------------- chat
def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_logprobs(lps: Sequence[TokenLogprobs], token_text: TokenText) -> dict[str, Any]:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}"""
    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


# ---------------------------------------------------------------- per-request formatting
class CompletionFormat:
    """Engine outputs -> /v1/completions choices. Choice index = prompt * n + sample."""

    chat = False

    def __init__(self, token_text: TokenText, n: int, logprobs: int | None, echo: list[str] | None = None):
        self.token_text, self.n, self.logprobs, self.echo = token_text, n, logprobs, echo
        self._started: set[int] = set()
        self._offset: dict[int, int] = {}

    def opening(self, num_choices: int) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, out: Any) -> dict[str, Any] | None:
        text = out.new_text
        if self.echo is not None and index not in self._started:
            text = self.echo[index // self.n] + text
        self._started.add(index)
        lps = None
        if out.new_logprobs is not None:
            offset = self._offset.get(index, 0)
            lps = completion_logprobs(out.new_logprobs, self.token_text, offset, want_top=self.logprobs > 0)
            self._offset[index] = offset + sum(len(t) for t in lps["tokens"])
        if not text and not out.finished and not (lps and lps["tokens"]):
            return None
        return completion_choice(index, text, out.finish_reason, lps)

    def final(self, index: int, out: Any) -> dict[str, Any]:
        prefix = self.echo[index // self.n] if self.echo is not None else ""
        lps = None
        if out.logprobs is not None:
            lps = completion_logprobs(out.logprobs, self.token_text, len(prefix), want_top=self.logprobs > 0)
        return completion_choice(index, prefix + out.text, out.finish_reason, lps)


class ChatFormat:
    """Engine outputs -> /v1/chat/completions choices (one assistant message each)."""

    chat = True

    def __init__(self, token_text: TokenText, logprobs: int | None):
        self.token_text, self.logprobs = token_text, logprobs

    def opening(self, num_choices: int) -> list[dict[str, Any]]:
        return [chat_delta(i, {"role": "assistant", "content": ""}) for i in range(num_choices)]

    def delta(self, index: int, out: Any) -> dict[str, Any] | None:
        lps = chat_logprobs(out.new_logprobs, self.token_text) if out.new_logprobs is not None else None
        if not out.new_text and not out.finished and not (lps and lps["content"]):
            return None
        return chat_delta(index, {"content": out.new_text} if out.new_text else {}, out.finish_reason, lps)

    def final(self, index: int, out: Any) -> dict[str, Any]:
        lps = chat_logprobs(out.logprobs, self.token_text) if out.logprobs is not None else None
        return chat_choice(index, out.text, out.finish_reason, lps)
