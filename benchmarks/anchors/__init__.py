"""Runners for bench_anchors.py: the same measurements on leanfm, transformers and llama.cpp.

Each runner has `window_nll(windows) -> (nll_sum, n_scored)`, `prefill(ids) -> seconds` and
`decode(ids, n) -> (decode tokens/s, greedy token ids)`.
"""
