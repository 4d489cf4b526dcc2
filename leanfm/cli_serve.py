"""`leanfm serve`: an OpenAI-compatible HTTP server (leanfm.server) over the paged, continuously batched engine.

    leanfm serve --model gemma-3-270m --port 8000 --max-num-seqs 16
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

    leanfm serve --model gemma-3-270m --lora sql=out/lora-sql --lora chat=out/lora-chat
    curl localhost:8000/v1/completions -d '{"model": "sql", "prompt": "..."}'   # that adapter's answer

Several LoRA adapters run over the one base in the same batches; the request's `model` picks one (the
served model's name: none). --adapter DIR instead merges one adapter of any kind into the base.

Every check that can fail on a flag runs before the model loads; SIGTERM / Ctrl-C drain and exit 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Annotated

import typer

from leanfm.cli_common import AdapterOpt, DtypeOpt, ModelOpt, ThreadsOpt, load_for_inference, setup_torch
from leanfm.utils.errors import LeanfmError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve_cmd(
    model: ModelOpt = "gemma-3-270m",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LEANFM_API_KEY", show_envvar=True,
                                                help="require Authorization: Bearer KEY (all routes but /health)")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="the model id clients send [default: --model]")] = None,
    max_queue: Annotated[int, typer.Option(help="requests waiting beyond the running ones before 429")] = 64,
    max_num_seqs: Annotated[int, typer.Option(help="requests running at once")] = 16,
    max_num_batched_tokens: Annotated[int, typer.Option(help="tokens computed per engine step")] = 512,
    max_model_len: Annotated[int | None, typer.Option(help="context per request [default: the model's]")] = None,
    kv_cache_mib: Annotated[int | None, typer.Option(help="KV cache budget in MiB [default: fits the batch, <= 1 GiB]")] = None,
    block_size: Annotated[int, typer.Option(help="tokens per KV block")] = 16,
    prefix_caching: Annotated[bool, typer.Option(help="reuse the KV of shared prompt prefixes")] = True,
    shutdown_timeout: Annotated[float, typer.Option(help="seconds in-flight requests get to finish on SIGTERM")] = 30.0,
    log_level: Annotated[str, typer.Option(help="critical | error | warning | info | debug")] = "info",
    access_log: Annotated[bool, typer.Option(help="log every request")] = False,
    threads: ThreadsOpt = 0,
    dtype: DtypeOpt = "float32",
    lora: Annotated[list[str] | None, typer.Option(help="NAME=DIR: serve LoRA adapter DIR as model NAME beside the "
                                                        "base (repeatable)")] = None,
    allow_runtime_lora: Annotated[bool, typer.Option(help="enable POST /v1/load_lora_adapter and "
                                                          "/v1/unload_lora_adapter")] = False,
    adapter: AdapterOpt = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics)."""
    from leanfm.engine.config import EngineConfig

    if not 0 <= port <= 65535:
        raise LeanfmError(f"--port must be in [0, 65535], got {port}")
    if max_queue < 0:
        raise LeanfmError(f"--max-queue must be >= 0, got {max_queue}")
    if shutdown_timeout < 0:
        raise LeanfmError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    if log_level not in LOG_LEVELS:
        raise LeanfmError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    options = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                   max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
                   kv_memory_bytes=None if kv_cache_mib is None else kv_cache_mib << 20)
    EngineConfig(**options)  # flag errors before the model loads
    adapters = parse_loras(lora or [], served_model_name or model)
    try:
        from leanfm.server.run import check_port, serve
    except ImportError as e:
        raise LeanfmError(f"leanfm serve needs fastapi and uvicorn ({e}); pip install 'leanfm[serve]'") from None

    check_port(host, port)
    server_thread_policy(os.environ)
    torch_dtype, _ = setup_torch(threads, dtype, None)
    loaded = load_for_inference(model, torch_dtype, adapter, for_generation=True)
    from leanfm.engine.async_llm import AsyncLLM

    llm = AsyncLLM(loaded.model, loaded.tokenizer, adapters, **options)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    logging.getLogger("leanfm.server").info("leanfm serve: %s on http://%s:%d (engine %s, max_queue %d)",
                                            served_model_name or model, host, port, options, max_queue)
    serve(llm, served_model_name or model, host=host, port=port, api_key=api_key, max_queue=max_queue,
          shutdown_timeout=shutdown_timeout, log_level=log_level, access_log=access_log,
          allow_runtime_lora=allow_runtime_lora)


def server_thread_policy(environ: MutableMapping[str, str]) -> None:
    """LEANFM_ADAPTIVE_THREADS=0 unless the user set it. The kernels' retreat to one thread when a thread of
    theirs is late (csrc/parallel.h) is for other processes' load; in the server the late thread is its own
    event loop writing the step's tokens, and retreating left a core idle (16 streams on gemma-3-270m:
    53 tok/s with it, 62 without, the offline engine ~69). Set it to 1 on a machine shared with other jobs."""
    environ.setdefault("LEANFM_ADAPTIVE_THREADS", "0")


def parse_loras(specs: list[str], base_name: str) -> dict[str, str]:
    """--lora NAME=DIR flags -> {name: dir}, each adapter read and checked to be a plain LoRA (before the
    model loads; its fit to the model is checked once it has)."""
    from leanfm.checkpoint.lora_adapter import read_lora_adapter
    from leanfm.engine.lora import check_adapter_name

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LeanfmError(f"--lora takes NAME=DIR, got {spec!r}")
        if name in out or name == base_name:
            raise LeanfmError(f"--lora name {name!r} is used twice (or is the served model's name); give each "
                              "adapter its own name")
        check_adapter_name(name)
        read_lora_adapter(path)
        out[name] = path
    return out
