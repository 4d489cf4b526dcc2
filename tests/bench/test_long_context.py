"""Long-context perplexity through the engine's cache: the full cache equals one plain causal forward over
the whole text, a budget beyond the text equals the full cache, and compressed caches hold fewer bytes."""

import math

import pytest
import torch
from conftest import make_tiny_model

from leanfm.bench.long_context import cache_perplexity
from leanfm.bench.perplexity import scored_token_nll

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    m = make_tiny_model("gemma3", seed=2, tie_word_embeddings=False)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(m.config.hidden_size ** -0.5)  # context-dependent (engine_testing)
    return m


IDS = [1] + torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(0)).tolist()


def plain_ppl(model, ids):
    x = torch.tensor([ids])
    scored = torch.ones_like(x, dtype=torch.bool)
    scored[0, 0] = False
    return math.exp(scored_token_nll(model, x, scored).double().mean().item())


def test_full_cache_equals_plain_forward(model):
    res = cache_perplexity(model, IDS, chunk=32, block_size=4)
    assert res.n_scored == len(IDS) - 1
    assert res.ppl == pytest.approx(plain_ppl(model, IDS), rel=1e-4)
    assert res.kv_bytes_peak <= res.kv_pool_bytes


@pytest.mark.parametrize("options", [dict(kv_compression="streaming", kv_budget=200),
                                     dict(kv_compression="h2o", kv_budget=200)])
def test_budget_beyond_text_equals_full(model, options):
    full = cache_perplexity(model, IDS, chunk=32, block_size=4)
    assert cache_perplexity(model, IDS, chunk=32, block_size=4, **options).ppl == pytest.approx(full.ppl, rel=1e-4)


def test_compressed_caches_hold_fewer_bytes(model):
    full = cache_perplexity(model, IDS, chunk=16, block_size=4)
    results = [cache_perplexity(model, IDS, chunk=16, block_size=4, **o) for o in (
        dict(kv_cache_dtype="int8"), dict(kv_compression="streaming", kv_budget=32),
        dict(kv_compression="h2o", kv_budget=32))]
    for r in results:
        assert r.kv_bytes_peak < full.kv_bytes_peak and math.isfinite(r.ppl)
    assert results[0].ppl == pytest.approx(full.ppl, rel=2e-2)  # int8: close to the full cache
