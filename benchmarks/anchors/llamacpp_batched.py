"""llama.cpp serving several sequences at once (llama-cpp-python's low-level API, as llama.cpp's
examples/parallel and examples/batched do): one context with n_seq_max sequences, every step one
llama_decode over a llama_batch holding a token of each running sequence.

    res = batched_generate("model.gguf", prompts, n_out=128, threads=2)
    res["output_tok_s"], res["wall_s"], res["cpu_s"], res["ttft_max_s"], res["tokens"]

Prompts are prefilled together, n_batch tokens per llama_decode across sequences (logits only at each
prompt's last token), then greedy decoding of n_out tokens per sequence (the first from the prefill),
EOS ignored. Output tokens/s counts every sampled token over the whole run, prefill included - the
same figure leanfm's concurrency benchmark reports.
"""

from __future__ import annotations

import time

import numpy as np


def _fill(batch, items) -> None:
    """items: (seq, pos, token, want_logits)."""
    for j, (seq, pos, tok, want) in enumerate(items):
        batch.token[j] = tok
        batch.pos[j] = pos
        batch.n_seq_id[j] = 1
        batch.seq_id[j][0] = seq
        batch.logits[j] = want
    batch.n_tokens = len(items)


def _argmax(ctx, row: int, n_vocab: int) -> int:
    import llama_cpp

    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(n_vocab,)).argmax())


def _open(gguf_path: str, n_seq: int, n_ctx: int, n_batch: int, threads: int):
    import llama_cpp as L
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # llama.cpp logs every tensor otherwise
        L.llama_backend_init()
        model = L.llama_model_load_from_file(str(gguf_path).encode(), L.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise RuntimeError("llama.cpp could not create the context")
    return model, ctx


def batched_generate(gguf_path: str, prompts: list[list[int]], n_out: int, threads: int, n_batch: int = 512) -> dict:
    import llama_cpp as L

    n_seq = len(prompts)
    n_ctx = -(-(max(len(p) for p in prompts) + n_out) // 256) * 256 * n_seq  # every sequence's share fits
    model, ctx = _open(gguf_path, n_seq, n_ctx, n_batch, threads)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(max(n_batch, n_seq), 0, n_seq)
    out: list[list[int]] = [[] for _ in prompts]
    first: list[float] = [0.0] * n_seq
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        items = [(s, i, t, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        for k in range(0, len(items), n_batch):
            part = items[k:k + n_batch]
            _fill(batch, part)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed in the prefill")
            for j, (s, _, _, want) in enumerate(part):
                if want:
                    out[s].append(_argmax(ctx, j, n_vocab))
                    first[s] = time.perf_counter() - t0
        t_decode = time.perf_counter()
        for step in range(n_out - 1):
            _fill(batch, [(s, len(prompts[s]) + step, out[s][-1], True) for s in range(n_seq)])
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while decoding")
            for s in range(n_seq):
                out[s].append(_argmax(ctx, s, n_vocab))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        decode_s = time.perf_counter() - t_decode
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    n_tokens = sum(map(len, out))
    return {"gguf": str(gguf_path), "sequences": n_seq, "output_tokens": n_tokens, "wall_s": wall, "cpu_s": cpu,
            "output_tok_s": n_tokens / wall, "output_tok_per_cpu_s": n_tokens / cpu, "prefill_phase_s": wall - decode_s,
            "decode_phase_tok_s": n_seq * (n_out - 1) / decode_s if decode_s else 0.0,
            "ttft_max_s": max(first), "tokens": out}
