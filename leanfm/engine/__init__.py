"""Running models: sampling parameters, the plain generator, chat, and the paged serving engine.

Engine layout (DESIGN.md principle 6; the scheduler side never imports torch):

    request.py     Request / RequestOutput / RequestMetrics
    kv/            block pools, per-request block tables, prefix cache (torch-free)
    scheduler.py   token-budget scheduling, chunked prefill, preemption (torch-free)
    messages.py    SchedulerOutput -> runner -> RunnerOutput (data only)
    runner.py      KV tensors, PagedAttentionMeta, one model forward per step, sampling
    spec/          speculative decoding: n-gram / draft-model / layer-skip proposers, exact verification
    engine.py      EngineCore: schedule -> run -> update
    llm.py         LLM (offline batches), async_llm.py AsyncLLM (streaming, background thread)
"""
