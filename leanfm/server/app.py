"""The FastAPI app: OpenAI-compatible routes over one AsyncLLM.

    app = build_app(AsyncLLM(model, tokenizer, max_num_seqs=16), "gemma-3-270m", api_key=None, max_queue=64)

POST /v1/completions, /v1/chat/completions (streamed as SSE or not), /tokenize, /detokenize;
GET /v1/models, /health, /metrics. The `model` field picks the base model or a loaded LoRA adapter;
with allow_runtime_lora, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes) change
the adapters at run time. A body becomes token ids and SamplingParams before anything is
admitted; every engine-side check runs before the response starts, so bad input is a 4xx, never a
half-sent stream.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from leanfm.engine.async_llm import AsyncLLM
from leanfm.engine.params import SamplingParams
from leanfm.server.errors import APIError, error_body, install_error_handlers
from leanfm.server.responses import ChatFormat, CompletionFormat, Envelope, sse, usage
from leanfm.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraRequest,
    TokenizeRequest,
    UnloadLoraRequest,
)
from leanfm.server.service import Service
from leanfm.server.streaming import SSEResponse, client_closed, until_disconnected
from leanfm.utils.errors import LeanfmError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
Jobs = list[tuple[list[int], SamplingParams]]
router = APIRouter()
lora_router = APIRouter()  # run-time adapter loading: only with allow_runtime_lora


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None, max_queue: int = 64,
              allow_runtime_lora: bool = False) -> FastAPI:
    app = FastAPI(title="leanfm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = Service(llm, model_name, max_queue)
    install_error_handlers(app)
    app.include_router(router)
    if allow_runtime_lora:
        app.include_router(lora_router)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, service=app.state.service)
    return app


def _svc(request: Request) -> Service:
    return request.app.state.service


# ---------------------------------------------------------------- generation
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    svc = _svc(request)
    adapter = svc.check_model(body.model)
    body.check()
    prompts = body.prompts()
    jobs = []
    for prompt in prompts:
        ids = svc.encode(prompt)
        max_tokens = svc.max_tokens_for(len(ids), body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        jobs.append((ids, body.sampling_params(max_tokens, body.logprobs)))
    echo = None
    if body.echo:
        echo = [p if isinstance(p, str) else svc.decode(p) for p in prompts]
    fmt = CompletionFormat(svc.token_text, body.n, body.logprobs, echo)
    env = Envelope(f"cmpl-{uuid.uuid4().hex}", adapter or svc.model_name, chat=False)
    return await _respond(request, svc, jobs, body.n, env, fmt, body.stream, body.include_usage, adapter)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    svc = _svc(request)
    adapter = svc.check_model(body.model)
    body.check()
    ids = svc.encode_chat([m.as_dict() for m in body.messages], body.add_generation_prompt)
    max_tokens = svc.max_tokens_for(len(ids), body.requested_max_tokens, None, "messages")
    jobs = [(ids, body.sampling_params(max_tokens, body.num_logprobs))]
    fmt = ChatFormat(svc.token_text, body.num_logprobs)
    env = Envelope(f"chatcmpl-{uuid.uuid4().hex}", adapter or svc.model_name, chat=True)
    return await _respond(request, svc, jobs, body.n, env, fmt, body.stream, body.include_usage, adapter)


async def _respond(request: Request, svc: Service, jobs: Jobs, n: int, env: Envelope, fmt: Any,
                   stream: bool, include_usage: bool, adapter: str | None = None) -> Response:
    for ids, params in jobs:  # the engine's own checks (vocabulary, KV cache size) before admission
        svc.llm.engine.make_request(ids, params, adapter=adapter)
    k = len(jobs) * n
    svc.reserve(k)
    if stream:
        def on_close(disconnected: bool) -> None:
            svc.release(k)
            svc.metrics.disconnects += disconnected

        try:
            return SSEResponse(_stream(svc, jobs, n, env, fmt, include_usage, adapter), on_close)
        except BaseException:
            svc.release(k)
            raise
    try:
        left, body = await until_disconnected(request, _collect(svc, jobs, n, env, fmt, adapter))
    except LeanfmError as e:
        if svc.llm.is_running:
            raise
        raise APIError(503, f"the engine stopped: {e}", type_="server_error") from None
    finally:
        svc.release(k)
    if left:
        svc.metrics.disconnects += 1
        return client_closed()
    return JSONResponse(body)


async def _stream(svc: Service, jobs: Jobs, n: int, env: Envelope, fmt: Any, include_usage: bool,
                  adapter: str | None = None) -> AsyncIterator[bytes]:
    for choice in fmt.opening(len(jobs) * n):
        yield sse(env.chunk([choice], None, include_usage))
    generated = 0
    try:
        async for index, out in svc.generate(jobs, n, env.id, adapter):
            generated += len(out.new_token_ids)
            choice = fmt.delta(index, out)
            if choice is not None:
                yield sse(env.chunk([choice], None, include_usage))
    except LeanfmError as e:  # the engine failed mid-stream: say so in the stream's own terms
        yield sse(error_body(str(e), "server_error"))
    else:
        if include_usage:
            yield sse(env.chunk([], usage(sum(len(ids) for ids, _ in jobs), generated), True))
    yield b"data: [DONE]\n\n"


async def _collect(svc: Service, jobs: Jobs, n: int, env: Envelope, fmt: Any, adapter: str | None = None
                   ) -> dict[str, Any]:
    finals = {}
    async for index, out in svc.generate(jobs, n, env.id, adapter):
        if out.finished:
            finals[index] = out
    choices = [fmt.final(i, finals[i]) for i in sorted(finals)]
    generated = sum(len(o.token_ids) for o in finals.values())
    return env.body(choices, usage(sum(len(ids) for ids, _ in jobs), generated))


# ---------------------------------------------------------------- the rest
@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    svc = _svc(request)
    card = {"id": svc.model_name, "object": "model", "created": 0, "owned_by": "leanfm",
            "max_model_len": svc.max_model_len}
    loras = [{"id": name, "object": "model", "created": 0, "owned_by": "leanfm", "root": info.path,
              "parent": svc.model_name, "max_model_len": svc.max_model_len}
             for name, info in sorted(svc.llm.adapters.items())]
    return {"object": "list", "data": [card, *loras]}


@lora_router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    if body.lora_name == svc.model_name:
        raise APIError(400, f"{body.lora_name!r} is the base model's name; give the adapter another name",
                       param="lora_name")
    try:  # off the event loop: reading the file and waiting for the engine thread take a while
        info = await asyncio.to_thread(svc.llm.load_adapter, body.lora_name, body.lora_path)
    except LeanfmError as e:
        raise APIError(400, str(e), param="lora_path") from None
    return {"object": "lora_adapter", "id": info.name, "status": "loaded", "rank": info.r,
            "num_layers": info.num_layers}


@lora_router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    if body.lora_name not in svc.llm.adapters:
        raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", param="lora_name",
                       code="model_not_found")
    try:
        await asyncio.to_thread(svc.llm.unload_adapter, body.lora_name)
    except LeanfmError as e:
        raise APIError(400, str(e), param="lora_name") from None
    return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}


@router.get("/health")
async def health(request: Request) -> Response:
    svc = _svc(request)
    if svc.draining or not svc.llm.is_running:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return PlainTextResponse(_svc(request).render_metrics(), media_type="text/plain; version=0.0.4")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    svc.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    if body.messages is not None:
        ids = svc.encode_chat([m.as_dict() for m in body.messages], body.add_generation_prompt)
    elif svc.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", param="prompt")
    else:
        ids = svc.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(ids), "max_model_len": svc.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    svc = _svc(request)
    svc.check_model(body.model)
    vocab = svc.llm.engine.model.config.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": svc.decode(body.tokens)}


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but /health (pure ASGI: checked before the body is read)."""

    def __init__(self, app: Any, api_key: str, service: Service, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.open_paths, self.service = app, open_paths, service
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not secrets.compare_digest(given, self.expected):
            self.service.metrics.rejected["unauthorized"] += 1
            message = "missing API key: send Authorization: Bearer <key>" if not given else "invalid API key"
            await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
