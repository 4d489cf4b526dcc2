"""Perplexity under one stated protocol, so numbers are comparable across models, compressions and tools.

    from leanfm.bench.corpora import load_corpus
    res = perplexity(lm.model, lm.tokenizer, load_corpus("wiki"), PerplexityConfig(ctx=512))
    res.ppl, res.n_scored_tokens, res.tokens_per_second, res.protocol

Protocol (`PROTOCOL`, version 1):
1. Tokenize the whole text once, without special tokens: t_0 .. t_{N-1}; keep the first `max_tokens`
   of them when set.
2. Cut windows of `ctx` model tokens. With `add_bos` each window is BOS followed by up to W = ctx - 1 text
   tokens; without, up to W = ctx text tokens. Window k holds text tokens [b_k, e_k) with b_k = k * S,
   e_k = min(b_k + W, N), where S = `stride` (default W: disjoint windows, every text token in exactly
   one window). Windows stop with the first one that reaches the end (e_k = N); the last may be short.
3. Window k scores (predicts from the tokens before it in the same window) the text tokens
   [max(e_{k-1}, b_k + f), e_k), with e_{-1} = 0 and f = 0 with BOS, 1 without (a window's first token
   has nothing to be predicted from). So with S < W (sliding) each window scores only the tokens the
   previous one did not, with up to W - S tokens of context before them (HF's perplexity guide, lm-eval's
   rolling windows); every text token is scored exactly once, except without BOS: t_0, and with disjoint
   windows the first token of every window. A window with nothing to score is dropped.
4. Positions restart at 0 in every window; attention is plain causal (`attn_meta=None`).
5. ppl = exp(sum of -ln p(scored token) / number of scored tokens) (natural log; `nll` is that mean).

`window_token_ids` returns exactly these windows and their scored masks, so another tool (llama.cpp in a
benchmark, transformers in a test) scores identical tokens. Windows run `batch_size` at a time, the last
batch right-padded; logits are computed only for the scored positions, `LOGITS_CHUNK` at a time, so
(B, T, vocab) logits never exist at once. `seconds` covers the forward passes and scoring (not
tokenization); `tokens_per_second` counts the tokens fed to the model (BOS included, padding excluded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from leanfm.utils.errors import LeanfmError

PROTOCOL = "leanfm-perplexity-v1"
LOGITS_CHUNK = 128  # scored positions per logits block: 128 x 262144 fp32 = 128 MiB for Gemma 3


@dataclass(frozen=True)
class PerplexityConfig:
    ctx: int = 512  # model tokens per window (BOS included)
    stride: int | None = None  # new text tokens per window; None = ctx - add_bos (disjoint windows)
    add_bos: bool = True  # start every window with the tokenizer's BOS
    batch_size: int = 4  # windows per forward pass
    max_tokens: int | None = None  # score only the first max_tokens text tokens

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.add_bos, bool):
            raise LeanfmError(f"PerplexityConfig.add_bos must be True or False, got {self.add_bos!r}")
        if not is_int(self.ctx) or self.ctx < 2:
            raise LeanfmError(f"PerplexityConfig.ctx must be an integer >= 2, got {self.ctx!r}")
        width = self.ctx - int(self.add_bos)
        if self.stride is not None and (not is_int(self.stride) or not 1 <= self.stride <= width):
            raise LeanfmError(f"PerplexityConfig.stride must be an integer in [1, {width}] (the text tokens "
                              f"of a window) or None for disjoint windows, got {self.stride!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            raise LeanfmError(f"PerplexityConfig.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 2):
            raise LeanfmError(f"PerplexityConfig.max_tokens must be an integer >= 2 or None (all), "
                              f"got {self.max_tokens!r}")

    @property
    def width(self) -> int:
        """Text tokens per full window (W)."""
        return self.ctx - int(self.add_bos)

    @property
    def step(self) -> int:
        """The effective stride (S)."""
        return self.width if self.stride is None else self.stride

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token, nats
    n_scored_tokens: int
    n_windows: int
    seconds: float
    tokens_per_second: float
    protocol: dict[str, Any]
    n_input_tokens: int = 0  # tokens fed to the model (BOS included, padding excluded)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Windows:
    """The exact windows of the protocol. `input_ids[k]` is window k as fed to the model (BOS first when
    add_bos); `scored[k][j]` says whether token `input_ids[k][j]` is scored, i.e. whether
    -ln p(input_ids[k][j] | input_ids[k][:j]) counts (never for j = 0). `spans[k]` = (b_k, e_k, s_k):
    the window's text tokens [b_k, e_k), of which [s_k, e_k) are scored."""

    input_ids: list[list[int]]
    scored: list[list[bool]]
    spans: list[tuple[int, int, int]]
    n_text_tokens: int

    @property
    def n_scored(self) -> int:
        return sum(e - s for _, e, s in self.spans)


def plan_windows(n_tokens: int, width: int, step: int, has_bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) text-token spans of the windows over n_tokens tokens (protocol steps 2-3)."""
    if width < 1 or not 1 <= step <= width:
        raise ValueError(f"need 1 <= step <= width, got step={step}, width={width}")
    spans, prev_end, begin = [], 0, 0
    while n_tokens > 0:
        end = min(begin + width, n_tokens)
        score_from = max(prev_end, begin + (0 if has_bos else 1))
        if score_from < end:  # only without BOS can a (1-token) window have nothing to score
            spans.append((begin, end, score_from))
        if end == n_tokens:
            break
        prev_end, begin = end, begin + step
    return spans


def windows_from_ids(ids: list[int], cfg: PerplexityConfig, bos_token_id: int | None = None) -> Windows:
    """The protocol's windows over already-tokenized text (`bos_token_id` required when cfg.add_bos)."""
    if cfg.add_bos and bos_token_id is None:
        raise LeanfmError("the tokenizer has no BOS token; use PerplexityConfig(add_bos=False)")
    ids = list(ids[: cfg.max_tokens] if cfg.max_tokens is not None else ids)
    spans = plan_windows(len(ids), cfg.width, cfg.step, cfg.add_bos)
    prefix = [bos_token_id] if cfg.add_bos else []
    input_ids = [prefix + ids[b:e] for b, e, _ in spans]
    scored = [[False] * len(prefix) + [i >= s for i in range(b, e)] for b, e, s in spans]
    windows = Windows(input_ids, scored, spans, len(ids))
    if windows.n_scored == 0:
        raise LeanfmError(f"the text has {len(ids)} token(s): too short to score; give a longer text")
    return windows


def window_token_ids(tokenizer, text: str, cfg: PerplexityConfig | None = None) -> Windows:
    """Tokenize `text` as the protocol does and return its windows (see `Windows`)."""
    cfg = cfg or PerplexityConfig()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return windows_from_ids(ids, cfg, getattr(tokenizer, "bos_token_id", None))


def pad_batch(input_ids: list[list[int]], scored: list[list[bool]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad windows to one (B, T) int64 tensor and its (B, T) bool scored mask (padding unscored)."""
    t = max(len(w) for w in input_ids)
    ids = torch.full((len(input_ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), t), dtype=torch.bool)
    for i, (w, m) in enumerate(zip(input_ids, scored, strict=True)):
        ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


@torch.inference_mode()
def scored_token_nll(model, input_ids: Tensor, scored: Tensor, chunk: int = LOGITS_CHUNK) -> Tensor:
    """-ln p(input_ids[b, j] | input_ids[b, :j]) for every scored (b, j), in row-major order, fp32 (M,).

    One causal forward over (B, T); logits only at the positions that predict a scored token, `chunk` of
    them at a time, as logsumexp(logits) - logits[target]."""
    if scored[:, 0].any():
        raise ValueError("the first token of a window cannot be scored")
    device = next(model.parameters()).device
    input_ids, scored = input_ids.to(device), scored.to(device)
    positions = torch.arange(input_ids.shape[1], device=device)
    hidden = model(input_ids, positions, None)  # (B, T, H)
    target_mask = scored[:, 1:]
    h = hidden[:, :-1][target_mask]  # (M, H): the hidden state before each scored token
    targets = input_ids[:, 1:][target_mask]  # (M,)
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=device)
    for i in range(0, targets.shape[0], chunk):
        logits = model.compute_logits(h[None, i : i + chunk])[0].float()  # (c, V)
        tgt = logits.gather(1, targets[i : i + chunk, None])[:, 0]
        out[i : i + chunk] = torch.logsumexp(logits, dim=-1) - tgt
    return out


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def perplexity(model, tokenizer, text: str, cfg: PerplexityConfig | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `text` under the module's protocol (see the module docstring)."""
    cfg = cfg or PerplexityConfig()
    windows = window_token_ids(tokenizer, text, cfg)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and cfg.ctx > max_pos:
        raise LeanfmError(f"ctx {cfg.ctx} exceeds the model's {max_pos} positions; use ctx <= {max_pos}")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    n = len(windows.input_ids)

    bar = tqdm(total=n, unit="window", desc="perplexity", disable=not progress)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for i in range(0, n, cfg.batch_size):
            ids, mask = pad_batch(windows.input_ids[i : i + cfg.batch_size],
                                  windows.scored[i : i + cfg.batch_size], pad_id)
            nll = scored_token_nll(model, ids, mask)
            total += nll.double().sum().item()
            count += nll.numel()
            bar.update(ids.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    n_input = sum(len(w) for w in windows.input_ids)
    protocol = {"name": PROTOCOL, **cfg.to_dict(), "window_text_tokens": cfg.width, "effective_stride": cfg.step,
                "bos_token_id": getattr(tokenizer, "bos_token_id", None) if cfg.add_bos else None,
                "n_text_tokens": windows.n_text_tokens, "text_sha256": text_fingerprint(text)}
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_scored_tokens=count, n_windows=n,
                            seconds=seconds, tokens_per_second=n_input / seconds if seconds > 0 else float("inf"),
                            protocol=protocol, n_input_tokens=n_input)
