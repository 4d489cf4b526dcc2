"""LLM: offline batched generation on the paged, continuously batched engine.

    from leanfm import LLM, SamplingParams
    llm = LLM("gemma-3-270m", max_num_seqs=16)
    outs = llm.generate(["a", "b"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].metrics.ttft

`model` is an alias / .gguf / HF directory (loaded with load_model and prepared for inference), a
LoadedModel, or a model module (then pass `tokenizer=`, or give token-id prompts). Engine options are
EngineConfig fields.

Several LoRA adapters over the one base, in the same batches (leanfm.engine.lora):

    llm = LLM(model, adapters={"sql": "out/lora-sql", "chat": "out/lora-chat"})
    llm.generate(["q1", "q2", "q3"], params, adapter=["sql", "chat", None])   # None = the base model
    llm.load_adapter("math", "out/lora-math"); llm.unload_adapter("sql")
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from leanfm.engine.config import EngineConfig
from leanfm.engine.engine import EngineCore
from leanfm.engine.lora import AdapterInfo
from leanfm.engine.params import SamplingParams
from leanfm.engine.request import RequestOutput
from leanfm.engine.stats import EngineStats
from leanfm.utils.errors import LeanfmError

Prompt = str | Sequence[int]


def build_engine(model: Any, tokenizer: Any = None, adapters: Mapping[str, str] | None = None,
                 **engine_options: Any) -> EngineCore:
    """An EngineCore from a model reference, a LoadedModel or a model module (see the module doc), with
    the LoRA adapters {name: path} loaded."""
    config = EngineConfig.from_options(**engine_options)
    if adapters is not None and not isinstance(adapters, Mapping):
        raise LeanfmError(f"adapters must map names to adapter directories, got {type(adapters).__name__}")
    if isinstance(model, str):
        import torch

        from leanfm.checkpoint.loader import load_model

        dtype = torch.float32 if config.dtype == "auto" else getattr(torch, config.dtype)
        model = load_model(model, dtype=dtype, progress=False)
    if hasattr(model, "model") and hasattr(model, "tokenizer"):  # a LoadedModel
        from leanfm.engine.runtime import prepare_for_inference

        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = prepare_for_inference(model.model)
    core = EngineCore(model, tokenizer, config)
    for name, path in (adapters or {}).items():
        core.load_adapter(name, path)
    return core


def normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):  # one prompt of token ids
        return [prompts]
    return prompts


class LLM:
    def __init__(self, model: Any = "gemma-3-270m", tokenizer: Any = None, adapters: Mapping[str, str] | None = None,
                 **engine_options: Any):
        self.engine = build_engine(model, tokenizer, adapters, **engine_options)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = False, priority: Sequence[int] | None = None,
                 adapter: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order (each with .text, .token_ids, .metrics).
        `adapter`: a loaded LoRA adapter's name for every prompt, or one per prompt (None = the base)."""
        prompts = normalize_prompts(prompts)
        params = _per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = _per_prompt(priority, len(prompts), "priority", default=0)
        names = [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else \
            _per_prompt(adapter, len(prompts), "adapter")
        reqs = [self.engine.make_request(p, sp, priority=pr, adapter=a)
                for p, sp, pr, a in zip(prompts, params, priorities, names, strict=True)]
        for req in reqs:
            self.engine.scheduler.add_request(req)
        bar = _progress(len(reqs)) if use_tqdm else None
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(reqs):
                for req in self.engine.step():
                    if req.finished:
                        done[req.request_id] = req.output()
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for req in reqs:
                self.engine.abort(req.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r.request_id] for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, priority: int = 0,
               adapter: str | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding an output (with .new_text) whenever it gets tokens."""
        req = self.engine.add_request(prompt, params, priority=priority, adapter=adapter)
        try:
            while not req.finished:
                for r in self.engine.step():
                    if r is req:
                        yield req.output()
        finally:
            if not req.finished:
                self.engine.abort(req.request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter (PEFT layout) for requests to pick by name."""
        return self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> AdapterInfo:
        return self.engine.unload_adapter(name)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return self.engine.adapters


def _per_prompt(value: Any, n: int, name: str, default: Any = None) -> list[Any]:
    if value is None:
        return [SamplingParams() if default is None else default] * n
    if isinstance(value, SamplingParams | int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise LeanfmError(f"{name} has {len(value)} entries for {n} prompts; give one, or one per prompt")
    return value


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req")
