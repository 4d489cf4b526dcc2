"""Answers that notice a client leaving: the generation behind them is cancelled at once, which aborts its
engine requests and frees their KV blocks (AsyncLLM.generate's finally), instead of running to the end.

Streaming: SSEResponse listens for `http.disconnect` beside the stream (whatever the ASGI spec version,
so a client that leaves while its request is still queued is noticed too). Non-streaming:
`until_disconnected` races the work against the same message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the access log does


class SSEResponse(StreamingResponse):
    """text/event-stream; `on_close(disconnected)` runs once however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[bool], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone (ASGI 2.4 servers raise on send)
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                disconnected = True
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close(disconnected)


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """(False, result of work), or (True, None) when the client left first (the work is then cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return True, None
    return False, task.result()


def client_closed() -> Response:
    return Response(status_code=CLIENT_CLOSED)
