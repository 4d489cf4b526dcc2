"""Serving throughput through the engine at several concurrency levels (`leanfm bench --concurrency 1,4,16`).

    sweep = measure_concurrency(model, tokenizer, levels=(1, 4, 16), prompt_tokens=128, output_tokens=64)
    sweep["16"]["output_tokens_per_second"], sweep["16"]["ttft_seconds"]["median"], sweep["16"]["tpot_seconds"]

Per level N: a fresh engine (max_num_seqs=N, no prefix cache), one untimed warm-up request, then N
requests submitted at once, each `prompt_tokens` tokens of real text (the benchmark passage at a
different offset per request) and `output_tokens` greedy tokens (EOS ignored), stepped to the end.
Reported: output tokens/s and total (prompt + output) tokens/s over the whole run (prefill included),
TTFT per request (arrival to first token) and TPOT per request (seconds per output token after the
first), each as min / median / max, plus the run's wall and CPU seconds (time.process_time).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from leanfm.bench.cost import prompt_ids, stats
from leanfm.utils.errors import LeanfmError


def _level(model, tokenizer, n: int, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    from leanfm.engine.llm import LLM
    from leanfm.engine.params import SamplingParams

    llm = LLM(model, tokenizer, max_num_seqs=n, enable_prefix_caching=False,
              max_model_len=prompt_tokens + output_tokens + 1)
    llm.generate([prompt_ids(tokenizer, min(8, prompt_tokens))], SamplingParams(max_tokens=2, temperature=0.0))
    prompts = [prompt_ids(tokenizer, prompt_tokens, offset=17 * i) for i in range(n)]
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_out = sum(len(o.token_ids) for o in outs)
    tpot = [(o.metrics.finish_time - o.metrics.first_token_time) / (len(o.token_ids) - 1)
            for o in outs if len(o.token_ids) > 1]
    return {"requests": n, "prompt_tokens": prompt_tokens, "output_tokens": n_out, "wall_seconds": wall,
            "cpu_seconds": cpu, "output_tokens_per_second": n_out / wall,
            "total_tokens_per_second": (n_out + n * prompt_tokens) / wall,
            "output_tokens_per_cpu_second": n_out / cpu if cpu > 0 else None,
            "ttft_seconds": stats([o.metrics.ttft for o in outs]),
            "tpot_seconds": stats(tpot) if tpot else None}


def measure_concurrency(model, tokenizer, levels: Sequence[int] = (1, 4, 16), prompt_tokens: int = 128,
                        output_tokens: int = 64) -> dict[str, Any]:
    """{str(N): figures of N concurrent requests} (see the module doc); prompts clamped to the context."""
    if not levels or any(not isinstance(n, int) or n < 1 for n in levels):
        raise LeanfmError(f"concurrency levels must be positive integers, got {list(levels)}; e.g. --concurrency 1,4,16")
    if output_tokens < 2:
        raise LeanfmError(f"output_tokens must be >= 2 to measure TPOT, got {output_tokens}")
    max_ctx = int(model.config.max_position_embeddings)
    p = max(1, min(prompt_tokens, max_ctx - output_tokens - 1))
    return {str(n): _level(model, tokenizer, n, p, output_tokens) for n in levels}
