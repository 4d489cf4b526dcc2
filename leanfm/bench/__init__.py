"""Measuring: quality (perplexity on built-in or user corpora, tasks) and cost (latency, throughput, memory).

    from leanfm.bench.corpora import load_corpus, calibration_samples
    from leanfm.bench.perplexity import PerplexityConfig, perplexity, window_token_ids
"""
