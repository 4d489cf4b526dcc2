"""A load generator for OpenAI-compatible servers: many requests, a fixed number at a time, over httpx.

    specs = [RequestSpec("/v1/completions", {"prompt": "Hi", "max_tokens": 32, "stream": True})] * 200
    result = asyncio.run(run_load("http://127.0.0.1:8000", specs, concurrency=32))
    print(result.summary())      # requests, errors, TTFT p50/p95, output tokens/s

Streaming requests time the first content chunk (TTFT) and count tokens from the final usage chunk when
the server sends one (else one per content chunk); a spec with `disconnect_after=k` reads k chunks and
hangs up. Non-streaming requests count `usage.completion_tokens`. Any non-2xx answer, transport error or
malformed stream is an error, kept with its message. The same client drives leanfm and other servers.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestSpec:
    path: str
    body: dict[str, Any]
    disconnect_after: int | None = None  # streaming only: leave after this many chunks


@dataclass
class LoadResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    disconnected: int = 0
    ttfts: list[float] = field(default_factory=list)
    output_tokens: int = 0
    wall_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        ttfts = sorted(self.ttfts)
        return {"requests": self.requests, "errors": len(self.errors), "disconnected": self.disconnected,
                "ttft_p50_s": _pct(ttfts, 0.50), "ttft_p95_s": _pct(ttfts, 0.95),
                "output_tokens": self.output_tokens, "wall_s": self.wall_seconds,
                "output_tok_s": self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def _one(client: Any, spec: RequestSpec, result: LoadResult) -> None:
    t0 = time.perf_counter()
    if not spec.body.get("stream"):
        r = await client.post(spec.path, json=spec.body)
        if r.status_code != 200:
            result.errors.append(f"{r.status_code}: {r.text[:200]}")
            return
        result.output_tokens += r.json()["usage"]["completion_tokens"]
        return
    chunks, usage, first = 0, None, None
    async with client.stream("POST", spec.path, json=spec.body) as r:
        if r.status_code != 200:
            result.errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.errors.append(f"stream error: {event['error']}")
                return
            if event.get("usage"):
                usage = event["usage"]
            if any(_content(c) for c in event.get("choices") or ()):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
                if spec.disconnect_after is not None and chunks >= spec.disconnect_after:
                    result.disconnected += 1
                    result.output_tokens += chunks
                    return
    if first is not None:
        result.ttfts.append(first)
    result.output_tokens += usage["completion_tokens"] if usage else chunks


def _content(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_load(base_url: str, specs: list[RequestSpec], concurrency: int, api_key: str | None = None,
                   timeout: float = 600.0) -> LoadResult:
    """Send every spec, `concurrency` at a time, each on its own connection; returns what happened."""
    import httpx

    result = LoadResult(requests=len(specs))
    queue: asyncio.Queue = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def worker() -> None:
        while not queue.empty():
            spec = queue.get_nowait()
            async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:
                try:
                    await _one(client, spec, result)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    result.errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_seconds = time.perf_counter() - t0
    return result
