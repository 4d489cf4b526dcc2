"""Helpers shared by the engine tests: attention-sensitive tiny models, the byte tokenizer, the
Generator reference, and running an EngineCore step by step."""

from __future__ import annotations

import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model

from leanfm.engine.config import EngineConfig
from leanfm.engine.engine import EngineCore
from leanfm.engine.generate import Generator
from leanfm.engine.params import SamplingParams

VARIANTS = ("llama", "gemma3")  # gemma3: 5 sliding layers (window 8) and 1 full layer
WINDOW = 8


def engine_model(variant: str, seed: int = 0):
    """A tiny random model whose greedy output depends on its whole context.

    The gemma3 twin gets an untied LM head and embeddings scaled down by sqrt(hidden): with tied,
    unit-variance embeddings times Gemma's sqrt(hidden) the residual stream is the last token's
    embedding and the model only repeats its input."""
    if variant == "gemma3":
        model = make_tiny_model("gemma3", seed=seed, tie_word_embeddings=False, **BYTE_VOCAB)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(model.config.hidden_size ** -0.5)
        return model
    return make_tiny_model(variant, seed=seed, **BYTE_VOCAB)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(4, 260, (n - 1,), generator=g).tolist()


def reference(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """Token ids the plain Generator produces for each prompt."""
    gen = Generator(model, make_byte_tokenizer())
    ps = params if isinstance(params, list) else [params] * len(prompts)
    return [gen.generate(p, sp).token_ids for p, sp in zip(prompts, ps, strict=True)]


def make_engine(model, **options) -> EngineCore:
    return EngineCore(model, make_byte_tokenizer(), EngineConfig(**options))


def run_to_end(core: EngineCore, arrivals: dict[int, list] | None = None, max_steps: int = 10_000) -> dict:
    """Step until idle; arrivals maps a step number to [(prompt, params, request_id), ...] added before it.
    Returns request id -> final RequestOutput."""
    arrivals = dict(arrivals or {})
    done, step = {}, 0
    while core.has_unfinished or any(k >= step for k in arrivals):
        for prompt, params, rid in arrivals.pop(step, []):
            core.add_request(prompt, params, request_id=rid)
        for req in core.step():
            if req.finished:
                done[req.request_id] = req.output()
        step += 1
        assert step < max_steps, "engine made no progress"
    return done


def assert_all_blocks_free(core: EngineCore) -> None:
    for pool in core.kv.pools:
        assert pool.num_free == pool.num_usable, (pool.num_free, pool.num_usable)
        assert all(c == 0 for c in pool.ref_cnt)
    assert not core.kv._reqs
