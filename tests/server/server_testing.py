"""Server fixtures: `leanfm serve` in a subprocess (the real CLI, uvicorn and signals) on a tiny model.
Test modules import the fixtures they use (a second conftest.py would shadow tests/conftest.py for the
`from conftest import ...` of other tests); the servers are shared by all modules of a session.

The model is a tiny random gemma3 with the byte tokenizer, a 4,096-token context (so a request can be
made to run long) and an untied head, saved as an HF directory. One engine step of it takes a few ms of
CPU, so "long" requests (thousands of tokens) stay in flight for many seconds even on an idle machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 4096
STARTUP_SECONDS = 180  # a busy 2-core machine can take long to import torch and load


def make_server_model():
    model = make_tiny_model("gemma3", seed=5, tie_word_embeddings=False, max_position_embeddings=CONTEXT, **BYTE_VOCAB)
    with torch.no_grad():  # as engine_testing.engine_model: an output that depends on the whole context
        model.model.embed_tokens.weight.mul_(model.config.hidden_size ** -0.5)
    return model


_MODEL_DIR: list[Path] = []  # saved once per session


@pytest.fixture(scope="module")
def server_model_dir(tmp_path_factory) -> Path:
    if not _MODEL_DIR:
        from leanfm.checkpoint.hf import save_hf_dir

        path = tmp_path_factory.mktemp("models") / "tiny-serve"
        _MODEL_DIR.append(save_hf_dir(make_server_model(), path, tokenizer=make_byte_tokenizer()))
    return _MODEL_DIR[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`leanfm serve` on a free port; .url, .client(), .stop() -> exit code."""

    def __init__(self, model_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = "import sys; from leanfm.cli import main; sys.argv = ['leanfm', *sys.argv[1:]]; main()"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LEANFM_KERNELS": "0", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--model", str(model_dir), "--port", str(self.port),
             "--threads", "1", "--log-level", "warning", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        end = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"leanfm serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("leanfm serve did not become healthy")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.poll() is not None else ""


def wait_idle(url: str, headers: dict | None = None, polls: int = 600) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds a KV block; the last scrape."""
    from leanfm.server.metrics import parse

    m: dict[str, float] = {}
    for _ in range(polls):
        m = parse(httpx.get(url + "/metrics", headers=headers, timeout=10).text)
        busy = (m["leanfm_num_requests_running"], m["leanfm_num_requests_waiting"],
                m["leanfm_server_in_flight_requests"],
                sum(v for k, v in m.items() if k.startswith("leanfm_kv_blocks_used")))
        if not any(busy):
            return m
        time.sleep(0.1)
    raise AssertionError(f"the server did not go idle: {m}")


_SHARED: dict[str, ServerProcess] = {}


def shared_server(request, name: str, model_dir: Path, *args: str) -> ServerProcess:
    """One server per name for the whole session, whichever module asks first; stopped at the end (the
    shutdown tests check exit codes on servers of their own)."""
    if name not in _SHARED:
        _SHARED[name] = proc = ServerProcess(model_dir, *args)
        request.config.add_cleanup(proc.stop)
    return _SHARED[name]


@pytest.fixture(scope="module")
def server(request, server_model_dir):
    return shared_server(request, "server", server_model_dir, "--max-num-seqs", "8", "--max-queue", "64",
                         "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def guarded(request, server_model_dir):
    """API key sk-test; room for 1 running + 1 queued request."""
    return shared_server(request, "guarded", server_model_dir, "--max-num-seqs", "1", "--max-queue", "1",
                         "--api-key", "sk-test", "--served-model-name", "tiny")
