"""Per-provider performance metrics (the seed's ``getMetrics``), folded from topics (pure, no I/O).

Calls, successes, failures and latency come from the executor's ``health``
events on ``ai.control`` (``source: attempt``: one per provider call of user
traffic; the health monitor's probes are left out); cost and tokens from the
cost-recorder's ``CostEvent`` on ``ai.costs`` (``pipeline.client.cost_book.CostBook``).

Percentiles use the nearest-rank method (the smallest latency with at least
p % of the calls at or below it) over the latest ``LATENCY_SAMPLE`` calls of
each provider; counts, the average and the totals cover every call read.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from msgspec import Struct

from pipeline.client.cost_book import CostSummary
from schemas.events import ControlEvent, Health

#: Latencies kept per provider for the percentiles (the latest ones).
LATENCY_SAMPLE = 100_000


class ProviderMetrics(Struct, kw_only=True):
    """One provider's calls and cost (DESIGN A5; the seed's ``ProviderMetrics``).

    ``request_count`` is the provider calls made for user requests (retries
    included), ``success_count`` + ``failure_count`` = ``request_count``;
    latencies in ms over those calls; ``total_cost_usd`` (USD) and
    ``total_tokens`` over the requests it answered (from ``ai.costs``).
    """

    request_count: int
    success_count: int
    failure_count: int
    average_latency_ms: float
    p50_latency_ms: float
    p95_latency_ms: float
    p99_latency_ms: float
    total_cost_usd: float
    total_tokens: int

    @property
    def average_latency(self) -> float:
        """The seed's name (``averageLatency``) for ``average_latency_ms`` (ms)."""
        return self.average_latency_ms

    @property
    def total_cost(self) -> float:
        """The seed's name (``totalCost``) for ``total_cost_usd`` (USD)."""
        return self.total_cost_usd

    @property
    def success_rate(self) -> float:
        """``success_count / request_count`` (0..1; 0 with no calls)."""
        return self.success_count / self.request_count if self.request_count else 0.0


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of ascending ``sorted_values``; 0.0 when empty.

    Source: the nearest-rank definition, https://en.wikipedia.org/wiki/Percentile#The_nearest-rank_method.

    Raises:
        ValueError: when ``pct`` is outside 0..100.
    """
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class _Calls:
    ok: int = 0
    failed: int = 0
    latency_sum_ms: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLE))


class MetricsBook:
    """Folds ``health`` attempt events; ``metrics(costs)`` joins them with the cost summary."""

    def __init__(self) -> None:
        self.calls: dict[str, _Calls] = {}

    def apply(self, event: ControlEvent) -> None:
        """Count one control event: only ``health`` events of executor attempts."""
        if not isinstance(event, Health) or event.source != "attempt":
            return
        calls = self.calls.get(event.provider)
        if calls is None:
            calls = self.calls[event.provider] = _Calls()
        if event.ok:
            calls.ok += 1
        else:
            calls.failed += 1
        calls.latency_sum_ms += event.latency_ms
        calls.latencies.append(event.latency_ms)

    def metrics(self, costs: dict[str, CostSummary], providers: list[str] | None = None) -> dict[str, ProviderMetrics]:
        """``ProviderMetrics`` per provider: ``providers`` first (zeros when unseen), then any other seen.

        Args:
            costs: ``CostBook.cost_summary()`` (USD and tokens per provider).
            providers: providers to list even without calls (the enabled ones).
        """
        names = list(dict.fromkeys([*(providers or []), *sorted(self.calls), *sorted(costs)]))
        out: dict[str, ProviderMetrics] = {}
        for name in names:
            calls = self.calls.get(name, _Calls())
            total = calls.ok + calls.failed
            ordered = sorted(calls.latencies)
            cost = costs.get(name)
            out[name] = ProviderMetrics(
                request_count=total,
                success_count=calls.ok,
                failure_count=calls.failed,
                average_latency_ms=round(calls.latency_sum_ms / total, 3) if total else 0.0,
                p50_latency_ms=percentile(ordered, 50),
                p95_latency_ms=percentile(ordered, 95),
                p99_latency_ms=percentile(ordered, 99),
                total_cost_usd=cost.total_cost_usd if cost is not None else 0.0,
                total_tokens=cost.total_tokens if cost is not None else 0,
            )
        return out


__all__ = ["LATENCY_SAMPLE", "MetricsBook", "ProviderMetrics", "percentile"]
