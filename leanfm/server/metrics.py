"""/metrics in the Prometheus text format (0.0.4), without a client library.

Server-side counters and histograms are updated on the event loop as outputs stream (no locks needed);
the engine's gauges (queue, running, KV blocks, prefix cache, speculative acceptance) are read from an
EngineStats snapshot at scrape time. Names follow Prometheus conventions under the `leanfm_` prefix.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (inf above the last bucket; 0 when empty)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        return next((b for b, c in zip(self.bounds, self.counts, strict=True) if c >= rank), math.inf)

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """What the server counts itself: tokens, requests by outcome, latency histograms."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = Counter()  # finish reason -> requests (engine requests: one per choice)
        self.rejected = Counter()  # reason -> HTTP requests refused (queue_full, draining, invalid, auth)
        self.disconnects = 0  # HTTP requests whose client left before the answer was complete
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def observe_first(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens += num_prompt_tokens

    def observe_tokens(self, n: int) -> None:
        self.generation_tokens += n

    def observe_finished(self, out: Any) -> None:
        """A finished RequestOutput: its reason and timings."""
        m = out.metrics
        self.finished[out.finish_reason] += 1
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.finish_time is not None:
            self.e2e.observe(m.finish_time - m.arrival_time)
            n = len(out.token_ids)
            if n > 1 and m.first_token_time is not None:
                self.tpot.observe((m.finish_time - m.first_token_time) / (n - 1))

    def render(self, stats: Any, in_flight: int, capacity: int) -> str:
        """The exposition text: these counters plus the engine's EngineStats snapshot."""
        groups = stats.kv_groups
        used = [t - f for t, f in zip(stats.kv_blocks_total, stats.kv_blocks_free, strict=True)]
        rows: list[tuple[str, str, str, Any]] = [
            ("num_requests_running", "gauge", "requests in the engine's running batch", stats.num_running),
            ("num_requests_waiting", "gauge", "requests queued in the engine", stats.num_waiting),
            ("server_in_flight_requests", "gauge", "engine requests admitted by the server", in_flight),
            ("server_capacity_requests", "gauge", "max_num_seqs + max_queue", capacity),
            ("kv_blocks_used", "gauge", "KV blocks held by requests", _by(groups, used)),
            ("kv_blocks_free", "gauge", "KV blocks free (cached prefixes included)", _by(groups, stats.kv_blocks_free)),
            ("kv_cache_usage_ratio", "gauge", "fraction of KV blocks in use", stats.kv_usage),
            ("prompt_tokens_total", "counter", "prompt tokens of requests started", self.prompt_tokens),
            ("generation_tokens_total", "counter", "tokens generated and sent", self.generation_tokens),
            ("prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache",
             stats.prefix_cache_queries),
            ("prefix_cache_hits_total", "counter", "of which were cached", stats.prefix_cache_hits),
            ("prefix_cache_hit_rate", "gauge", "hits / queries since start", stats.prefix_cache_hit_rate),
            ("spec_decode_acceptance_rate", "gauge", "accepted / proposed draft tokens (0 without speculation)",
             spec_acceptance_rate(stats)),
            ("num_preemptions_total", "counter", "requests preempted by recompute", stats.num_preemptions),
            ("engine_steps_total", "counter", "engine steps run", stats.num_steps),
            ("request_success_total", "counter", "engine requests finished, by reason",
             _by_label("finished_reason", self.finished)),
            ("requests_rejected_total", "counter", "HTTP requests refused, by reason",
             _by_label("reason", self.rejected)),
            ("client_disconnects_total", "counter", "requests aborted because the client left", self.disconnects),
        ]
        lines: list[str] = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP leanfm_{name} {help_}", f"# TYPE leanfm_{name} {kind}"]
            if isinstance(value, list):
                lines += [f"leanfm_{name}{{{label}}} {_num(v)}" for label, v in value]
            else:
                lines.append(f"leanfm_{name} {_num(value)}")
        for name, help_, hist in (("time_to_first_token_seconds", "arrival to first token", self.ttft),
                                  ("time_per_output_token_seconds", "mean gap between output tokens", self.tpot),
                                  ("e2e_request_latency_seconds", "arrival to finish", self.e2e)):
            lines += [f"# HELP leanfm_{name} {help_}", f"# TYPE leanfm_{name} histogram"]
            lines += hist.lines(f"leanfm_{name}")
        return "\n".join(lines) + "\n"


def spec_acceptance_rate(stats: Any) -> float:
    """From EngineStats when speculative decoding reports it (any of the usual spellings), else 0."""
    rate = getattr(stats, "spec_acceptance_rate", None)
    if rate is None:
        accepted = getattr(stats, "spec_num_accepted_tokens", None)
        proposed = getattr(stats, "spec_num_draft_tokens", None)
        rate = accepted / proposed if accepted is not None and proposed else 0.0
    return float(rate)


def _by(groups: Iterable[str], values: Iterable[Any]) -> list[tuple[str, Any]]:
    return [(f'group="{g}"', v) for g, v in zip(groups, values, strict=True)]


def _by_label(label: str, counts: Counter) -> list[tuple[str, Any]]:
    return [(f'{label}="{k}"', v) for k, v in sorted(counts.items())]


def _num(v: float) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def parse(text: str) -> dict[str, float]:
    """Sample name (labels included, as written) -> value: for tests and the load benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
