"""Prompt and prefix tuning in generation: the virtual tokens at KV-cache positions 0..n-1 (leanfm.tune.prompt).

The oracle is the scoring forward (attn_meta=None, PEFT-equivalent) run token by token with a greedy argmax;
the Generator's contiguous cache and the serving engine's paged cache (batches, chunked prefill, prompts
crossing block boundaries, sliding windows, prefix-cache hits, the fused kernels) must give its tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import BYTE_VOCAB, make_byte_tokenizer, make_tiny_model
from engine_testing import engine_model, prompt_ids
from typer.testing import CliRunner

from leanfm.engine.config import EngineConfigError
from leanfm.engine.generate import Generator
from leanfm.engine.llm import LLM
from leanfm.engine.params import SamplingParams
from leanfm.engine.runtime import prepare_for_inference
from leanfm.models.interface import ContiguousKVCache, KVCacheMeta
from leanfm.tune import (
    AdapterError,
    PrefixTuningConfig,
    PromptTuningConfig,
    add_adapter,
    save_adapter,
    set_adapter,
    trainable_parameters,
)
from leanfm.utils.errors import ContextLengthError

pytestmark = pytest.mark.usefixtures("single_thread")
N = 5  # virtual tokens: more than a block of 4, so the placeholders cross a block boundary
METHODS = {"prompt": PromptTuningConfig(num_virtual_tokens=N), "prefix": PrefixTuningConfig(num_virtual_tokens=N)}
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def adapted(variant: str, method: str, fused: bool = False, seed: int = 0):
    """A tiny engine model (gemma3: sliding window 8) with random, non-zero virtual tokens."""
    model = engine_model(variant, seed=seed)
    add_adapter(model, METHODS[method])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    return prepare_for_inference(model) if fused else model


def scored_greedy(model, ids: list[int], k: int) -> list[int]:
    """k greedy tokens from the full-sequence scoring forward (no cache), one forward per token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(k):
            x = torch.tensor([ids])
            nxt = int(model.compute_logits(model(x, torch.arange(x.shape[1]))[:, -1]).argmax(-1))
            out.append(nxt)
            ids.append(nxt)
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("variant, fused", [("llama", False), ("gemma3", False), ("gemma3", True)])
def test_generator_and_engine_match_scoring(variant, fused, method):
    model = adapted(variant, method, fused)
    prompts = [prompt_ids(n, seed) for n, seed in ((3, 0), (11, 1), (21, 2))]  # to 26 positions: past the window
    want = [scored_greedy(model, p, GREEDY.max_tokens) for p in prompts]
    set_adapter(model, None)
    assert [scored_greedy(model, p, GREEDY.max_tokens) for p in prompts] != want  # the adapter matters
    set_adapter(model, "default")

    gen = Generator(model, make_byte_tokenizer())
    got = [gen.generate(p, GREEDY) for p in prompts]
    assert [r.token_ids for r in got] == want
    assert [r.prompt_tokens for r in got] == [len(p) for p in prompts]

    # one batch, chunked prefill (a step of 6 tokens splits the placeholders and the prompts), blocks of 4
    llm = LLM(model, make_byte_tokenizer(), block_size=4, num_blocks=64, max_num_batched_tokens=6)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == want
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [o.metrics.num_prompt_tokens for o in outs] == [len(p) for p in prompts]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_prefix_cache_hit_and_context_accounting(method):
    model = adapted("gemma3", method)
    p = prompt_ids(14, 3)
    want = scored_greedy(model, p, GREEDY.max_tokens)
    llm = LLM(model, make_byte_tokenizer(), block_size=4, num_blocks=64)
    first = llm.generate([p], GREEDY)[0]
    again = llm.generate([p + want[:2]], GREEDY)[0]  # same prompt, longer: served from the prefix cache
    assert first.token_ids == want
    assert again.token_ids == scored_greedy(model, p + want[:2], GREEDY.max_tokens)
    assert llm.stats().prefix_cache_hits > 0
    assert first.metrics.num_cached_tokens == 0
    # blocks of 4 over 5 + 16 positions: 20 cached, of which the prompt's 15 (the virtual ones not counted)
    assert again.metrics.num_cached_tokens == 20 - N

    # the virtual tokens count against the context
    short = LLM(model, make_byte_tokenizer(), block_size=4, num_blocks=64, max_model_len=len(p) + N + 3)
    out = short.generate([p], GREEDY)[0]
    assert out.token_ids == want[:3] and out.finish_reason == "length"
    with pytest.raises(ContextLengthError, match="virtual tokens"):
        short.generate([prompt_ids(len(p) + 3, 4)], GREEDY)
    gen = Generator(model, make_byte_tokenizer(), max_context=len(p) + N + 3)
    assert gen.generate(p, GREEDY).token_ids == want[:3]
    with pytest.raises(ContextLengthError, match="virtual tokens"):
        gen.generate(prompt_ids(len(p) + 3, 4), GREEDY)


def test_ngram_speculation_and_repetition_penalty():
    model = adapted("llama", "prompt")
    p = prompt_ids(9, 5) * 2  # repeats: the n-gram proposer finds drafts
    want = scored_greedy(model, p, GREEDY.max_tokens)
    llm = LLM(model, make_byte_tokenizer(), block_size=4, num_blocks=64, speculative="ngram")
    assert llm.generate([p], GREEDY)[0].token_ids == want
    # repetition penalty (over the prompt without the placeholders): the same tokens through both paths
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5)
    gen = Generator(model, make_byte_tokenizer()).generate(p, params).token_ids
    eng = LLM(model, make_byte_tokenizer(), block_size=4, num_blocks=64).generate([p], params)[0].token_ids
    assert gen == eng


@pytest.mark.parametrize("options, match", [
    ({"kv_compression": "streaming", "kv_budget": 16}, "could evict"),
    ({"kv_compression": "h2o", "kv_budget": 16}, "could evict"),
    ({"speculative": {"method": "layer_skip", "skip_layers": [1]}}, "layer_skip"),
])
def test_unsupported_engine_options_are_refused(options, match):
    model = adapted("gemma3", "prefix")
    with pytest.raises(EngineConfigError, match=match):
        LLM(model, make_byte_tokenizer(), block_size=4, num_blocks=64, **options)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_cache_without_room_is_refused(method):
    """Callers that do not put the placeholders (a plain KVCacheMeta) get the old refusal, not wrong logits."""
    model = adapted("llama", method)
    cache = ContiguousKVCache(model.config, 1, 8, torch.float32)
    with pytest.raises(AdapterError, match="virtual tokens"), torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), torch.arange(3), KVCacheMeta(cache, 0))


def test_cli_generate_with_a_saved_prompt_adapter(tiny_model_dir, tmp_path):
    from leanfm.cli import app

    model = make_tiny_model("gemma3", seed=0, **BYTE_VOCAB)  # tiny_model_dir's model
    add_adapter(model, METHODS["prompt"])
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    save_adapter(model, tmp_path / "prompt")
    tok = make_byte_tokenizer()
    ids = tok.encode("say cat:")
    params = SamplingParams(temperature=0.0, max_tokens=6)
    expected = Generator(model.eval(), tok).generate(ids, params)
    assert expected.token_ids == scored_greedy(model, ids, 6)[:len(expected.token_ids)]
    res = CliRunner().invoke(app, ["generate", "-m", str(tiny_model_dir), "--adapter", str(tmp_path / "prompt"),
                                   "--temperature", "0", "--max-tokens", "6", "say cat:"])
    assert res.exit_code == 0, res.output
    assert res.output == expected.text + "\n"
