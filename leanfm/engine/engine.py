"""EngineCore: the serving loop's one step, schedule -> run -> update, and request admission.

    core = EngineCore(model, tokenizer, EngineConfig(max_num_seqs=16))
    core.add_request("Hello", SamplingParams(max_tokens=8))
    while core.has_unfinished:
        for req in core.step():          # requests that got a token or finished this step
            print(req.output().new_text)

Single-threaded; AsyncLLM runs it on a background thread, LLM drives it inline.

LoRA adapters (leanfm.engine.lora): `core.load_adapter(name, path)`, then `add_request(..., adapter=name)`;
requests for different adapters (and the base) share every step.

A model carrying a prompt or prefix tuning adapter (`model.num_virtual_tokens` = n > 0: leanfm.tune.prompt,
attached before the engine is built and fixed for it) gets n placeholder ids in front of every prompt
(Request), which hold its virtual tokens at positions 0..n-1 of every sequence; they count against
max_model_len. KV compression (which could evict them) and layer-skip drafts are refused with it.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import torch
from torch import nn

from leanfm.engine.config import EngineConfig, EngineConfigError
from leanfm.engine.kv.groups import plan_kv_groups
from leanfm.engine.kv.manager import KVCacheManager
from leanfm.engine.lora import AdapterInfo, LoraRegistry
from leanfm.engine.params import SamplingParams
from leanfm.engine.request import Request
from leanfm.engine.runner import ModelRunner
from leanfm.engine.scheduler import Scheduler
from leanfm.engine.stats import EngineStats
from leanfm.utils.errors import ContextLengthError, LeanfmError


class EngineCore:
    def __init__(self, model: nn.Module, tokenizer=None, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        mc = model.config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise EngineConfigError(f"max_model_len={self.max_model_len} exceeds the model's context of "
                                    f"{mc.max_position_embeddings} tokens; lower max_model_len")
        dtype = next(model.parameters()).dtype
        if config.dtype != "auto" and getattr(torch, config.dtype) != dtype:
            raise EngineConfigError(f"the model's weights are {str(dtype).removeprefix('torch.')} but dtype="
                                    f"{config.dtype!r}; pass dtype='auto' or load the model in {config.dtype}")
        kv_dtype = dtype if config.kv_cache_dtype == "auto" else getattr(torch, config.kv_cache_dtype)
        self.num_virtual_tokens = nv = int(getattr(model, "num_virtual_tokens", 0))
        if nv and config.compressed:
            raise EngineConfigError(f"kv_compression={config.kv_compression!r} could evict the model's {nv} virtual "
                                    "tokens (prompt/prefix tuning adapter); drop kv_compression or the adapter")
        if nv and config.speculative is not None and config.speculative.method == "layer_skip":
            raise EngineConfigError("layer_skip drafts cannot run a prompt/prefix tuning adapter; use "
                                    "speculative ngram or draft, or drop the adapter")
        if nv >= self.max_model_len:
            raise EngineConfigError(f"the model's adapter has {nv} virtual tokens but max_model_len is "
                                    f"{self.max_model_len}; raise max_model_len")
        groups = plan_kv_groups(mc, config, kv_dtype.itemsize, self.max_model_len)
        # a compressed cache's content depends on what was evicted, not on the tokens alone: no prefix cache
        self.kv = KVCacheManager(groups, config.block_size, config.enable_prefix_caching and not config.compressed)
        self.scheduler = Scheduler(config, self.kv)
        spec = None
        if config.speculative is not None:
            from leanfm.engine.spec.factory import build_spec_decoder

            spec = build_spec_decoder(config.speculative, model, groups, config, self.max_model_len)
        self.runner = ModelRunner(model, groups, config.block_size, kv_dtype, spec)
        self.lora = LoraRegistry(model)
        # how long a sequence may grow: the context, or unbounded when its cache is bounded
        self.max_seq_len = sys.maxsize if config.compressed else self.max_model_len
        self.default_stop_ids = frozenset(getattr(tokenizer, "stop_token_ids", None) or mc.eos_token_id)
        self.num_generated_tokens = 0
        self._next_id = itertools.count()

    # ---------------------------------------------------------------- requests
    def make_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0, arrival_time: float | None = None,
                     adapter: str | None = None) -> Request:
        """A validated Request (not yet added): bad input raises a one-line LeanfmError. `adapter` names a
        loaded LoRA adapter (None: the base model)."""
        info = None if adapter is None else self.lora.get(adapter)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise LeanfmError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ContextLengthError("the prompt is empty after tokenization; give a non-empty prompt")
        nv = self.num_virtual_tokens
        if len(ids) + nv >= self.max_seq_len:
            extra = f" (+ the adapter's {nv} virtual tokens)" if nv else ""
            raise ContextLengthError(f"prompt has {len(ids)} tokens{extra} but the context holds {self.max_model_len}; "
                                     "shorten the prompt (or raise max_model_len if the model supports it)")
        if params.stop and self.tokenizer is None:
            raise LeanfmError("stop strings need a tokenizer; give the engine one or use stop_token_ids")
        total = min(nv + len(ids) + params.max_tokens, self.max_seq_len)
        need = self.kv.max_blocks_needed(total, self.config.max_num_batched_tokens)
        for g, n, pool in zip(self.kv.groups, need, self.kv.pools, strict=True):
            if n > pool.num_usable:
                raise LeanfmError(f"a request of {total} tokens needs {n} KV blocks in the {g.name}-attention "
                                  f"group but the cache has {pool.num_usable}; raise num_blocks or kv_memory_bytes, "
                                  "or lower max_tokens")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.default_stop_ids)
        detok = None
        if self.tokenizer is not None:
            detok = self.tokenizer.stream_decoder(skip_special_tokens=params.skip_special_tokens)
        rid = str(next(self._next_id)) if request_id is None else str(request_id)
        return Request(rid, ids, params, stop_token_ids=stop_ids, max_model_len=self.max_seq_len,
                       detokenizer=detok, prompt=text, priority=priority, arrival_time=arrival_time,
                       adapter=adapter, lora_id=0 if info is None else info.lora_id,
                       cache_salt=None if info is None else info.cache_salt, num_virtual_tokens=nv)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ContextLengthError("the prompt is empty; give a non-empty prompt")
            if self.tokenizer is None:
                raise LeanfmError("a text prompt needs a tokenizer; give the engine one or pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        try:
            ids = [int(i) for i in prompt]
        except (TypeError, ValueError):
            raise LeanfmError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}") from None
        vocab = self.model.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise LeanfmError(f"token id {bad} is outside the vocabulary [0, {vocab}); check the prompt's ids")
        return None, ids

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, arrival_time: float | None = None,
                    adapter: str | None = None) -> Request:
        req = self.make_request(prompt, params, request_id, priority, arrival_time, adapter)
        self.scheduler.add_request(req)
        return req

    # ---------------------------------------------------------------- LoRA adapters
    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load the LoRA adapter at `path` (PEFT layout) under `name`; LeanfmError when it is not a plain
        LoRA, was made for another base model, or the name is taken."""
        return self.lora.load(name, str(path))

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Remove adapter `name`; refused while a request (waiting or running) uses it."""
        info = self.lora.get(name)
        users = [r.request_id for r in self.scheduler.requests.values() if r.lora_id == info.lora_id]
        if users:
            raise LeanfmError(f"adapter {name!r} is in use by {len(users)} request(s) ({', '.join(users[:3])}); "
                              "unload it when they finish, or abort them first")
        return self.lora.unload(name)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded LoRA adapters by name (a snapshot)."""
        return self.lora.adapters

    def abort(self, request_id: str) -> Request | None:
        """Stop a request now and free its KV blocks; returns it (finished, reason "abort") or None."""
        req = self.scheduler.abort(request_id)
        self._flush_if_idle()
        return req

    def _flush_if_idle(self) -> None:
        """With nothing left to run, tell the runner now which requests finished (it learns of them at the
        next step otherwise), so that per-request state such as a draft model's KV blocks is freed."""
        if not self.scheduler.has_unfinished:
            self.runner.execute(self.scheduler.drain_finished())

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---------------------------------------------------------------- the loop
    def step(self) -> list[Request]:
        """One engine iteration; returns the requests that got a new token or finished."""
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        if sched.is_empty and self.scheduler.requests and not self.scheduler.running:
            raise RuntimeError("the engine cannot schedule any waiting request (KV cache too small?)")
        self.num_generated_tokens += len(result.sampled_token_ids) + sum(result.num_accepted)
        updated = self.scheduler.update_from_output(sched, result)
        self._flush_if_idle()
        return updated

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(
            num_steps=s.num_steps, num_running=len(s.running), num_waiting=len(s.waiting),
            num_preemptions=s.num_preemptions, prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits, kv_groups=tuple(g.name for g in kv.groups),
            kv_blocks_total=tuple(p.num_usable for p in kv.pools), kv_blocks_free=tuple(p.num_free for p in kv.pools),
            kv_cache_bytes=self.runner.kv_bytes, last_step_tokens=s.last_step_tokens,
            num_scheduled_tokens=s.num_scheduled_tokens, num_generated_tokens=self.num_generated_tokens,
            spec_draft_tokens=s.num_draft_tokens, spec_accepted_tokens=s.num_accepted_tokens,
            spec_verify_steps=s.num_spec_steps, spec_off_steps=s.num_spec_off_steps,
            spec_draft_kv_bytes=self.runner.spec.kv_bytes if self.runner.spec is not None else 0)
