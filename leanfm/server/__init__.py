"""The HTTP edge: an OpenAI-compatible server over the engine's AsyncLLM (DESIGN.md principle 7).

    leanfm serve --model gemma-3-270m --port 8000 [--api-key K] [--max-queue 64]

    schemas.py    pydantic request bodies (the edge only) -> SamplingParams and token ids at once
    service.py    admission control (bounded queue, 429), prompts and chat templates, metrics counting
    app.py        the FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize,
                  /detokenize, /health, /metrics; the API-key middleware
    responses.py  OpenAI response bodies and stream chunks as plain dicts
    streaming.py  SSE responses and non-streaming answers that abort their requests when the client leaves
    metrics.py    Prometheus text exposition
    errors.py     OpenAI's error shape; bad input is a 4xx, never a 500
    run.py        uvicorn with a graceful shutdown on SIGTERM

Importing leanfm.server is light; fastapi and uvicorn load with its submodules.
"""
