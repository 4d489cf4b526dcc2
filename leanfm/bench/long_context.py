"""Long-context perplexity through the serving engine's own KV cache: full cache vs compressed caches.

    ids = tokenizer.encode(load_corpus("books", "eval"), add_special_tokens=False)[:4095]
    full = cache_perplexity(model, [bos] + ids, chunk=512)
    h2o = cache_perplexity(model, [bos] + ids, chunk=512, kv_compression="h2o", kv_budget=256)
    h2o.ppl, h2o.kv_bytes_peak, h2o.kv_bytes_per_token

Protocol: the token ids go through one EngineCore as a single request's prompt, `chunk` tokens per
step (chunked prefill), so each chunk attends to what the cache holds at that point - every earlier
token with a full cache, only what StreamingLLM / H2O kept (or int8 codes) with a compressed one -
plus the chunk's own earlier tokens. Every token after the first is scored, once: -ln p(t_i | cache
state, t_<i of the chunk), from the hidden states the runner hands to its hidden_hook. Unlike
leanfm.bench.perplexity's windows, nothing restarts: the context grows to len(ids) tokens. A smaller
chunk makes compressed caches evict more often (a chunk sees its own tokens uncompressed).

KV bytes: `kv_bytes_peak` is the largest number of bytes of KV blocks a step had in use (codes,
int8 scales and H2O metadata included; the blocks of the chunk being computed too), measured from the
block pools; `kv_bytes_per_token` divides it by the tokens of the text; `kv_pool_bytes` is what the
engine allocated.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

LOGITS_CHUNK = 128


@dataclass(frozen=True)
class CachePerplexity:
    label: str
    ppl: float
    nll: float
    n_tokens: int
    n_scored: int
    chunk: int
    kv_bytes_peak: int
    kv_pool_bytes: int
    seconds: float
    options: dict[str, Any]

    @property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_peak / self.n_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kv_bytes_per_token": self.kv_bytes_per_token}


class _Scorer:
    """The runner's hidden_hook: scores the step's rows and records the KV blocks in use."""

    def __init__(self, model, ids: list[int], core):
        self.model, self.ids, self.core = model, torch.tensor(ids), core
        self.total, self.count, self.peak = 0.0, 0, 0

    def __call__(self, chunks, hidden: torch.Tensor) -> None:
        kv = self.core.kv
        self.peak = max(self.peak, sum(p.num_used * g.bytes_per_block for p, g in zip(kv.pools, kv.groups, strict=True)))
        c = chunks[0]
        start, n = c.start_pos, len(c.token_ids)
        m = min(n, len(self.ids) - 1 - start)  # row i predicts token start + i + 1
        targets = self.ids[start + 1:start + 1 + m]
        for i in range(0, m, LOGITS_CHUNK):
            logits = self.model.compute_logits(hidden[:, i:min(m, i + LOGITS_CHUNK)])[0].float()
            tgt = targets[i:i + LOGITS_CHUNK]
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, tgt[:, None].to(logits.device))[:, 0]
            self.total += nll.double().sum().item()
            self.count += nll.numel()


def cache_perplexity(model, ids: list[int], *, chunk: int = 512, label: str = "", block_size: int = 16,
                     **engine_options: Any) -> CachePerplexity:
    """Perplexity of `ids` fed through the engine's KV cache (module doc); engine_options are EngineConfig
    fields (kv_compression, kv_budget, kv_cache_dtype, ...)."""
    from leanfm.engine.config import EngineConfig
    from leanfm.engine.engine import EngineCore
    from leanfm.engine.params import SamplingParams

    if len(ids) < 2:
        raise ValueError("cache_perplexity needs at least 2 tokens")
    if getattr(model, "num_virtual_tokens", 0):
        from leanfm.utils.errors import LeanfmError

        raise LeanfmError("cache_perplexity does not score models with a prompt/prefix tuning adapter (their "
                          "virtual tokens shift the cache positions); use windowed perplexity")
    max_len = min(len(ids) + 1, model.config.max_position_embeddings)
    config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=chunk, max_model_len=max_len, block_size=block_size,
                          enable_prefix_caching=False, **engine_options)
    core = EngineCore(model, None, config)
    scorer = _Scorer(model, ids, core)
    core.runner.hidden_hook = scorer
    t0 = time.perf_counter()
    req = core.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while not req.finished:
        core.step()
    seconds = time.perf_counter() - t0
    nll = scorer.total / scorer.count
    return CachePerplexity(label or config.kv_compression, math.exp(nll), nll, len(ids), scorer.count, chunk,
                           scorer.peak, core.runner.kv_bytes, seconds, dict(engine_options))
