"""benchmarks/anchors/llamacpp_quant.py: its NLL agrees with leanfm's perplexity code, its windows are leanfm's,
its size report adds up; with llama-cpp-python, a tiny leanfm model exported as F16 and quantized by llama.cpp
scores like leanfm on the same windows, and the files are cached."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from anchors.common import Window, nll_on_scored  # noqa: E402
from anchors.llamacpp_quant import (  # noqa: E402
    WindowSpec,
    cached_files,
    gguf_size_report,
    llamacpp_quant_rows,
    llamacpp_windows_nll,
    scored_nll,
)
from conftest import make_tiny_model  # noqa: E402

from leanfm.bench.perplexity import (  # noqa: E402
    PerplexityConfig,
    pad_batch,
    perplexity,
    scored_token_nll,
    windows_from_ids,
)
from leanfm.checkpoint.gguf_writer import write_gguf  # noqa: E402


class LogitsModel(nn.Module):
    """A stand-in whose hidden states are given logits and whose head is the identity."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.dummy = logits, nn.Parameter(torch.zeros(1))

    def forward(self, ids, positions, attn_meta=None):
        return self.logits[:, : ids.shape[1]]

    def compute_logits(self, hidden):
        return hidden


CONFIGS = [PerplexityConfig(ctx=16), PerplexityConfig(ctx=16, stride=5), PerplexityConfig(ctx=16, add_bos=False),
           PerplexityConfig(ctx=16, stride=3, add_bos=False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bos", "bos-stride", "nobos", "nobos-stride"])
def test_scored_nll_matches_leanfm_scored_token_nll(cfg):
    g = torch.Generator().manual_seed(0)
    vocab = 50
    ids = torch.randint(3, vocab, (70,), generator=g).tolist()
    w = windows_from_ids(ids, cfg, bos_token_id=1)
    logits = 4 * torch.randn(len(w.input_ids), cfg.ctx, vocab, generator=g)
    batch, mask = pad_batch(w.input_ids, w.scored, pad_id=0)
    ref = scored_token_nll(LogitsModel(logits), batch, mask, chunk=7).double().numpy()  # row-major: window order
    ours = np.concatenate([scored_nll(logits[k].numpy(), w.input_ids[k], w.scored[k], chunk=5)
                           for k in range(len(w.input_ids))])
    assert ours.dtype == np.float64 and ours.shape == ref.shape == (w.n_scored,)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for k in range(len(w.input_ids)):  # and the anchors' torch helper, window by window
        total, n = nll_on_scored(logits[k, : len(w.input_ids[k])], Window(w.input_ids[k], w.scored[k]))
        part = scored_nll(logits[k].numpy(), w.input_ids[k], w.scored[k])
        assert n == part.size and math.isclose(total, part.sum(), rel_tol=1e-5)


def test_scored_nll_float64_matches_exact_log_softmax():
    rng = np.random.default_rng(1)
    logits = (30 * rng.standard_normal((9, 40))).astype(np.float32)  # large logits: needs the max shift
    ids, scored = rng.integers(0, 40, 10).tolist(), [False] + [True] * 9
    want = -torch.log_softmax(torch.from_numpy(logits).double(), -1)[torch.arange(9), torch.tensor(ids[1:])]
    np.testing.assert_allclose(scored_nll(logits, ids, scored), want.numpy(), rtol=1e-12)


def test_scored_nll_rejects_bad_input():
    logits = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="first token"):
        scored_nll(logits, [1, 2, 3], [True, True, False])
    with pytest.raises(ValueError, match="one length"):
        scored_nll(logits, [1, 2, 3], [False, True])
    with pytest.raises(ValueError, match="logits"):
        scored_nll(logits, list(range(7)), [False] + [True] * 6)


@pytest.mark.parametrize("stride,add_bos", [(None, True), (5, True), (None, False), (3, False)])
def test_window_spec_gives_exactly_n_full_windows(stride, add_bos):
    spec = WindowSpec(ctx=16, n_windows=4, stride=stride, add_bos=add_bos)
    w = windows_from_ids(list(range(3, 500)), spec.perplexity_config(), bos_token_id=1)
    assert len(w.input_ids) == 4 and all(len(ids) == 16 for ids in w.input_ids)
    with pytest.raises(ValueError, match="n_windows"):
        WindowSpec(n_windows=0)


def test_gguf_size_report_adds_up(tmp_path):
    m = make_tiny_model("llama")  # untied: embedding and head both stored
    n = sum(p.numel() for p in m.parameters())
    for qtype, linear_bpw in (("F32", 32.0), ("Q8_0", 8.5)):
        path = write_gguf(tmp_path / f"{qtype}.gguf", m.config, m.state_dict(), qtype=qtype)
        r = gguf_size_report(path)
        assert r["params"] == n and r["bytes"] == path.stat().st_size
        assert r["bits_per_weight"] == r["bytes"] * 8 / n and r["bpw_tensors"] < r["bits_per_weight"]
        assert sum(t["params"] for t in r["tensor_types"].values()) == n
        assert sum(t["bytes"] for t in r["tensor_types"].values()) == r["tensor_bytes"]
        assert r["bpw_linear"] == linear_bpw and r["bpw_embedding"] == linear_bpw


# ---------------------------------------------------------------- llama.cpp
def tiny_tokenizer_fields(vocab: int) -> dict:
    tokens = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"\u2581t{i}" for i in range(4, vocab)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 4 + [-float(i) for i in range(4, vocab)],
            "tokenizer.ggml.token_type": [3, 3, 3, 2] + [1] * (vocab - 4), "tokenizer.ggml.add_bos_token": True}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny Gemma 3 (window 8, so 24-token windows cross it) and its 'source GGUF' with tokenizer metadata."""
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("tiny-src")
    m = make_tiny_model("gemma3", query_pre_attn_scalar=16)  # GGUF derives the query scale from head_dim
    with torch.no_grad():  # F16-exact matrices: the F16 export is lossless, any difference is llama.cpp's math
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    src = write_gguf(d / "tiny.gguf", m.config, m.state_dict(), tiny_tokenizer_fields(m.config.vocab_size), "F32")
    return SimpleNamespace(model=m, source=str(src), gguf_path=src, path=src, tokenizer=None)


def test_llamacpp_quantized_files_score_like_leanfm_and_are_cached(tiny_source, tmp_path):
    logs: list[str] = []
    files = cached_files(tiny_source, ["F16", "Q8_0", "Q4_0"], threads=1, cache=tmp_path, log=logs.append)
    assert set(files) == {"F16", "Q8_0", "Q4_0"} and len(logs) == 3
    stamps = {k: p.stat().st_mtime_ns for k, p in files.items()}
    assert cached_files(tiny_source, ["Q8_0", "Q4_0"], threads=1, cache=tmp_path, log=logs.append) == files
    assert len(logs) == 3 and {k: p.stat().st_mtime_ns for k, p in files.items()} == stamps  # nothing redone

    sizes = {k: gguf_size_report(p) for k, p in files.items()}
    assert sizes["F16"]["bpw_linear"] == 16.0 and sizes["Q8_0"]["bpw_linear"] == 8.5
    assert sizes["Q4_0"]["bpw_linear"] == 4.5

    cfg = PerplexityConfig(ctx=24, batch_size=2)
    ids = torch.randint(4, 128, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    w = windows_from_ids(ids, cfg, bos_token_id=1)
    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: ids, bos_token_id=1, pad_token_id=0)
    base = perplexity(tiny_source.model, tok, "unused", cfg, progress=False)
    res = {k: llamacpp_windows_nll(p, w.input_ids, w.scored, threads=1) for k, p in files.items()}
    assert all(r["n_scored_tokens"] == base.n_scored_tokens for r in res.values())
    assert abs(res["F16"]["nll"] - base.nll) < 1e-3, (res["F16"]["nll"], base.nll)  # ~1e-4 measured
    assert abs(res["Q8_0"]["nll"] - base.nll) < 2e-2
    assert math.isfinite(res["Q4_0"]["nll"])


def test_llamacpp_quant_rows_on_a_tiny_model(tiny_source, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 20)
    tok = SimpleNamespace(encode=lambda s, add_special_tokens=False: [4 + ord(c) % 120 for c in s],
                          bos_token_id=1, pad_token_id=0)
    lm = SimpleNamespace(**{**vars(tiny_source), "tokenizer": tok})
    spec = WindowSpec(corpus=str(text), ctx=32, n_windows=3)
    rows = llamacpp_quant_rows(lm, spec, ("Q8_0",), check=True, threads=1, cache=tmp_path / "c", log=lambda m: None)
    assert [(r["engine"], r["name"]) for r in rows] == [("leanfm", "leanfm float base (float32)"),
                                                        ("llama.cpp", "F16"), ("llama.cpp", "Q8_0")]
    assert all(r["n_scored_tokens"] == 3 * 31 == r["windows"]["n_scored_tokens"] for r in rows)
    assert rows[0]["bits_per_weight"] == 32.0 and rows[0]["params"] == rows[1]["params"]
    assert abs(rows[1]["ppl_vs_leanfm"]) < 1e-3 and rows[0]["ppl_vs_leanfm"] == 0.0
    with pytest.raises(ValueError, match="either spec"):
        llamacpp_quant_rows(lm, spec, windows=2)
