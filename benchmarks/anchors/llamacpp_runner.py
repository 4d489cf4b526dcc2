"""llama.cpp (through llama-cpp-python) running the GGUF natively: NLL on windows, prefill, greedy decode.

Build it from source on the machine (it compiles llama.cpp; pip caches the wheel afterwards):
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON" pip install llama-cpp-python
"""

from __future__ import annotations

import time

import numpy as np
import torch

from anchors.common import Window, nll_on_scored


def build_info() -> str:
    import llama_cpp

    flags = llama_cpp.llama_print_system_info().decode().strip()
    return f"llama-cpp-python {llama_cpp.__version__}; {flags}"


class LlamaCppRunner:
    """One llama.cpp context per use: `logits_all` for perplexity, last-token logits for speed."""

    name = "llama.cpp"

    def __init__(self, gguf_path, threads: int, n_ctx: int, flash_attn: bool = False):
        self.gguf_path, self.threads, self.n_ctx, self.flash_attn = str(gguf_path), threads, n_ctx, flash_attn
        self.llm = self._open(n_ctx, logits_all=False)

    def _open(self, n_ctx: int, logits_all: bool):
        from llama_cpp import Llama

        return Llama(model_path=self.gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=self.threads,
                     n_threads_batch=self.threads, logits_all=logits_all, flash_attn=self.flash_attn,
                     verbose=False)

    def window_nll(self, windows: list[Window]) -> tuple[float, int]:
        ctx = max(len(w.ids) for w in windows)
        llm = self._open(ctx, logits_all=True)  # keeps (n_ctx, vocab) float32 logits
        total, count = 0.0, 0
        for w in windows:
            llm.reset()
            llm.eval(w.ids)
            nll, n = nll_on_scored(torch.from_numpy(llm.scores[: len(w.ids)]), w)
            total, count = total + nll, count + n
        del llm
        return total, count

    def _last_argmax(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def prefill(self, ids: list[int]) -> float:
        """Seconds to evaluate the prompt and pick the first token (as leanfm's prefill_seconds)."""
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._last_argmax()
        return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        """Greedy, EOS ignored: n tokens, the first from the prefill; rate = (n - 1) / decode seconds."""
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._last_argmax()]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([out[-1]])
            out.append(self._last_argmax())
        return (n - 1) / (time.perf_counter() - t0), out
