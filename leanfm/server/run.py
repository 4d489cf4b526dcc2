"""Run the app under uvicorn, with a graceful shutdown.

On SIGTERM or SIGINT: new requests get 503 at once (and /health turns 503), the listening socket closes,
and requests in flight run to their end for up to `shutdown_timeout` seconds. Then the engine stops,
which ends every request left with finish_reason "abort" (streams get their last chunk and [DONE]);
serve() returns and the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from typing import Any

import uvicorn

from leanfm.engine.async_llm import AsyncLLM
from leanfm.server.app import build_app
from leanfm.utils.errors import LeanfmError

log = logging.getLogger("leanfm.server")


class _Server(uvicorn.Server):
    """uvicorn's server that drains the app the moment a shutdown signal arrives and aborts what is still
    running after `drain_timeout` seconds."""

    def __init__(self, config: uvicorn.Config, service: Any, drain_timeout: float):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.service.draining = True
        llm = self.service.llm
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, _abort_all, llm)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def _abort_all(llm: AsyncLLM) -> None:
    log.warning("leanfm serve: shutdown timeout reached; aborting the requests still running")
    llm.shutdown(timeout=0)  # the engine thread ends every open stream with finish_reason "abort"


def check_port(host: str, port: int) -> None:
    """A one-line error now rather than uvicorn's log line later when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LeanfmError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None


def serve(llm: AsyncLLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 64, shutdown_timeout: float = 30.0, log_level: str = "info",
          access_log: bool = False, allow_runtime_lora: bool = False) -> None:
    """Serve until SIGTERM/SIGINT; shuts the engine down before returning."""
    check_port(host, port)
    app = build_app(llm, model_name, api_key=api_key, max_queue=max_queue, allow_runtime_lora=allow_runtime_lora)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout + 5.0, lifespan="off")
    server = _Server(config, app.state.service, shutdown_timeout)
    # uvicorn re-raises the signal it caught once it is done; with these handlers that ends serve() normally
    # instead of killing the process with the signal's default action
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _note) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        llm.shutdown()
    log.info("leanfm serve: stopped")


def _note(sig: int, frame: Any) -> None:
    log.info("leanfm serve: got signal %d after the shutdown", sig)
