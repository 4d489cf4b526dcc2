"""Service: what the HTTP routes share — the AsyncLLM, admission control, prompts to token ids, metrics.

Models: the `model` field of a request picks what runs: the served model's name (or no field) is the
base model, a loaded LoRA adapter's name that adapter (leanfm.engine.lora); anything else is a 404.

Admission: every engine request (one per prompt and choice) holds a slot from `reserve` until its HTTP
request is answered or abandoned. Slots number max_num_seqs (running) + max_queue (waiting); a request
that does not fit gets 429 with Retry-After, one that could never fit a 400. While draining (shutdown)
new requests get 503.

Runs on the event loop thread; only AsyncLLM talks to the engine thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from leanfm.engine.async_llm import AsyncLLM
from leanfm.engine.params import SamplingParams
from leanfm.engine.request import RequestOutput
from leanfm.server.errors import APIError
from leanfm.server.metrics import ServerMetrics


class Service:
    def __init__(self, llm: AsyncLLM, model_name: str, max_queue: int = 64, retry_after: int = 1):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_name = model_name
        self.max_model_len: int = llm.engine.max_model_len
        self.capacity = llm.engine.config.max_num_seqs + max_queue
        self.retry_after = retry_after
        self.in_flight = 0
        self.draining = False
        self.metrics = ServerMetrics()

    # ---------------------------------------------------------------- admission
    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter the `model` field picks (None: the base model); 404 when it names neither."""
        if name is None or name == self.model_name:
            return None
        if name in self.llm.adapters:
            return name
        served = ", ".join(repr(n) for n in self.model_names())
        raise APIError(404, f"model {name!r} does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def model_names(self) -> list[str]:
        return [self.model_name, *sorted(self.llm.adapters)]

    def reserve(self, k: int) -> None:
        """Take k slots or refuse the request; pair with release(k)."""
        if self.draining:
            self.metrics.rejected["draining"] += 1
            raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
        if k > self.capacity:
            self.metrics.rejected["too_many_choices"] += 1
            raise APIError(400, f"this request needs {k} sequences (prompts x n) but the server holds at most "
                                f"{self.capacity}; lower n or send fewer prompts", param="n")
        if self.in_flight + k > self.capacity:
            self.metrics.rejected["queue_full"] += 1
            raise APIError(429, f"the server is busy ({self.in_flight} requests in flight, queue full); retry "
                                f"after {self.retry_after} s", code="queue_full",
                           headers={"Retry-After": str(self.retry_after)})
        self.in_flight += k

    def release(self, k: int) -> None:
        self.in_flight -= k

    # ---------------------------------------------------------------- prompts
    def encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids", param=param)
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The model's chat template, then tokens (the template writes BOS itself)."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def max_tokens_for(self, num_prompt: int, requested: int | None, default: int | None, param: str) -> int:
        """The output budget, or a 400 with the token counts when the prompt (plus max_tokens) is too long."""
        limit = self.max_model_len
        if num_prompt >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                                f"{num_prompt} tokens; shorten it", param=param, code="context_length_exceeded")
        if requested is not None and num_prompt + requested > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but you requested "
                                f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the "
                                "completion); lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        if requested is not None:
            return requested
        return limit - num_prompt if default is None else min(default, limit - num_prompt)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one Service per process)
    def token_text(self, token_id: int) -> str:
        """A token as logprobs show it: its text, or its vocabulary entry when it is a partial UTF-8
        character (byte tokens would all read U+FFFD and collide as top_logprobs keys)."""
        if self.tokenizer is None:
            return str(token_id)
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:
            text = self.tokenizer.id_to_token(token_id) or text
        return text

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer else ""

    # ---------------------------------------------------------------- generation
    async def generate(self, jobs: list[tuple[list[int], SamplingParams]], n: int, request_id: str,
                       adapter: str | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run n choices of every (prompt ids, params) job; yield (choice index, output) as they come,
        choice index = job * n + sample. Metrics are counted here. Bad input raises before any yield."""
        streams = [self.llm.generate_many(ids, params, n, f"{request_id}-{j}", adapter=adapter)
                   for j, (ids, params) in enumerate(jobs)]
        started: set[int] = set()
        async for j, (i, out) in _merge(streams):
            index = j * n + i
            if index not in started:
                started.add(index)
                self.metrics.observe_first(len(out.prompt_token_ids))
            self.metrics.observe_tokens(len(out.new_token_ids))
            if out.finished:
                self.metrics.observe_finished(out)
            yield index, out

    def stats(self) -> Any:
        return self.llm.stats()

    def render_metrics(self) -> str:
        return self.metrics.render(self.stats(), self.in_flight, self.capacity)


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave async iterators as (stream index, item); the first error ends it; leaving closes all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((k, item))
            queue.put_nowait((k, done))
        except Exception as exc:
            queue.put_nowait((k, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            k, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
