"""benchmarks/workload_bound.py: the FLOP count of a serving workload against a direct loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from workload_bound import _pairs, measured_gemm_peak, workload_flops  # noqa: E402


@pytest.mark.parametrize("window", [None, 1, 4, 16])
def test_pairs_match_a_loop(window):
    for lo in range(0, 12):
        for hi in range(lo, 20):
            ref = sum(min(i + 1, window) if window else i + 1 for i in range(lo, hi))
            assert _pairs(lo, hi, window) == ref


def test_workload_flops_match_a_loop(tiny_config):
    c = tiny_config("gemma3")  # sliding and full layers
    assert any(c.layer_is_sliding(i) for i in range(c.num_hidden_layers))
    prompts, n_out = [5, 9, 40], 7
    h, inter = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    linear = 2 * c.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * inter)
    total = 0
    for n in prompts:
        for pos in range(n + n_out - 1):  # every position the model computes: prompt, then decoded tokens
            total += linear
            for i in range(c.num_hidden_layers):
                keys = pos + 1 if not c.layer_is_sliding(i) else min(pos + 1, c.sliding_window)
                total += 4 * q * keys
        total += n_out * 2 * c.vocab_size * h  # the head: the first output token, then each decoded one
    f = workload_flops(c, prompts, n_out)
    assert f["total"] == total
    assert f["prefill_linear"] == sum(prompts) * linear


def test_measured_gemm_peak_is_positive():
    assert measured_gemm_peak(repeats=2) > 0
