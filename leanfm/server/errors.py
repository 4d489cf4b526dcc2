"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with the HTTP status.

Bad input is a 4xx, never a 500: pydantic validation and malformed JSON -> 400 naming the field;
LeanfmError from the engine (empty prompt, token id out of the vocabulary, chat template mismatch, KV
cache too small) -> 400; unknown routes 404; wrong methods 405. Only a bug in leanfm is a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from leanfm.utils.errors import LeanfmError

log = logging.getLogger("leanfm.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable"}


class APIError(Exception):
    """Raise anywhere in a request: the handler answers with this status and OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type_ or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error as one readable line, its field as `param`."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    message = "field required" if err.get("type") == "missing" else str(err.get("msg", "invalid value"))
    where = ".".join(loc)
    return APIError(400, f"{where}: {message}" if where else message, param=loc[0] if loc else None,
                    code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(LeanfmError)
    async def _leanfm(_: Request, exc: LeanfmError) -> JSONResponse:
        return APIError(400, str(exc)).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return APIError(500, f"internal server error ({type(exc).__name__})", type_="server_error").response()
