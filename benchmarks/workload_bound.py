"""The compute a serving workload needs, and the fastest this machine could serve it.

    flops = workload_flops(config, prompt_lens, n_out)      # dict of FLOP counts by part
    peak = measured_gemm_peak()                              # GFLOP/s, best torch.mm this process does
    bound = n_out_total / (flops["total"] / (peak * 1e9))    # output tokens/s no engine can beat here

Counting (multiply-add = 2 FLOPs; norms, RoPE, activations and sampling left out, so the bound is
generous):
  * linear layers: 2 x (q, k, v, o, gate, up, down parameters) per token per layer, from the config;
  * the LM head: 2 x vocab x hidden for the last prompt token (the first output token) and for every
    decoded token;
  * attention: 4 x query heads x head_dim per (query, visible key) pair (QK^T and PV), where a query
    at position i sees i + 1 keys, or min(i + 1, window) on a sliding-window layer.
Decode tokens are the n_out - 1 tokens after the first (which the prefill produces).
"""

from __future__ import annotations

import time

import torch


def _pairs(n_queries_from: int, n_queries_to: int, window: int | None) -> int:
    """Sum over query positions i in [from, to) of the visible keys min(i + 1, window)."""
    total = 0
    lo, hi = n_queries_from, n_queries_to
    if window is None:
        return (hi * (hi + 1) - lo * (lo + 1)) // 2
    cut = min(max(lo, window - 1), hi)  # positions below window - 1 see i + 1 keys
    total += (cut * (cut + 1) - lo * (lo + 1)) // 2
    total += (hi - cut) * window
    return total


def workload_flops(config, prompt_lens: list[int], n_out: int) -> dict[str, float]:
    c = config
    h, inter = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter
    linear = 2 * per_layer * c.num_hidden_layers
    head = 2 * c.vocab_size * h
    pair = 4 * q_dim
    windows = [c.sliding_window if c.layer_is_sliding(i) else None for i in range(c.num_hidden_layers)]
    out = {"prefill_linear": 0.0, "prefill_attention": 0.0, "decode_linear": 0.0, "decode_attention": 0.0,
           "head": 0.0}
    for n in prompt_lens:
        out["prefill_linear"] += n * linear
        out["prefill_attention"] += pair * sum(_pairs(0, n, w) for w in windows)
        out["decode_linear"] += (n_out - 1) * linear
        out["decode_attention"] += pair * sum(_pairs(n, n + n_out - 1, w) for w in windows)
        out["head"] += n_out * head
    out["total"] = sum(out.values())
    return out


def measured_gemm_peak(repeats: int = 20) -> float:
    """GFLOP/s of the best fp32 torch.mm (2048 x 640 @ 640 x 2048) in this process: the rate the
    prefill GEMMs run at, and more than the decode and attention parts reach."""
    a, b = torch.randn(2048, 640), torch.randn(640, 2048)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * 640 * 2048 / best / 1e9
