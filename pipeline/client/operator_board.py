"""What the operator dashboard shows, folded from the topics (pure: no I/O; time passed in or read from a clock).

``OperatorBoard`` folds ``ai.control`` (health, circuit transitions and
snapshots, budget status and alerts, cache statistics), ``ai.costs``,
``ai.responses`` and ``ai.deadletter`` into one ``DashboardSnapshot``: the
providers (deployments) with their circuit and its recent transitions, error
rate, latency p50/p95 and calls per second; traffic by outcome per second;
spend today, this week and this month per provider and per top user, each
budget against its limit with its alerts and a projection to the end of its
window; the cache's hit rate, entries and savings; the latest requests with
their attempts, trace id and cost event; the latest dead letters.

Everything it holds is bounded: samples and buckets over ``window_s``, the
latest ``max_requests`` requests and ``max_dead_letters`` dead letters, the
``max_transitions`` latest circuit transitions per provider; spend comes
from ``CostBook`` (one total per scope and day).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec
from msgspec import Struct

from pipeline.client.cost_book import CostBook
from pipeline.client.health_board import HealthBoard
from pipeline.client.metrics_book import percentile
from pipeline.runtime.config import PipelineConfig
from schemas import DeadLetter
from schemas.events import BudgetAlert, CacheStats, CircuitTransition, ControlEvent, CostEvent, Health
from schemas.response import AIResponse
from stages.rules.ledger import WINDOWS, window_end, window_start

__all__ = ["DashboardSnapshot", "OperatorBoard"]

#: Calls kept per provider for its latency, error rate and calls/s: the window at ~330 calls/s (5 min).
MAX_CALL_SAMPLES = 100_000
#: A cache replica whose statistics (sent every 10 s) are older than this (s) has stopped: they leave the total.
CACHE_STATS_STALE_S = 60.0
#: Latest requests sent with every snapshot (the detail of one, with its cost event, is asked for apart).
REQUESTS_IN_SNAPSHOT = 50


class Transition(Struct, kw_only=True):
    """One circuit transition: ``at`` (epoch ms), from and to state, and why."""

    at_ms: int
    from_state: str
    to_state: str
    reason: str


class ProviderView(Struct, kw_only=True):
    """One deployment: circuit state and its latest transitions, health over the window, latency (ms), calls/s."""

    name: str
    state: str
    healthy: bool
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    calls_per_s: float
    last_error: str | None
    transitions: list[Transition]


class TrafficSecond(Struct, kw_only=True):
    """Answers in second ``t`` (epoch s): ok, cached, fallback (ok after a failed attempt), errors by type."""

    t: int
    ok: int = 0
    cached: int = 0
    fallback: int = 0
    errors: dict[str, int] = {}


class Traffic(Struct, kw_only=True):
    """Requests per second by outcome over the window, and the totals of the last minute."""

    seconds: list[TrafficSecond]
    per_s_last_minute: float
    failovers_last_minute: int
    errors_last_minute: dict[str, int]


class Spend(Struct, kw_only=True):
    """USD spent today, this week and this month (budget time zone) for one provider or user."""

    name: str
    today_usd: float
    week_usd: float
    month_usd: float


class BudgetBar(Struct, kw_only=True):
    """One budget window against its limit (USD): spent, reserved, percent, projection to the window's end, alerts.

    ``projected_usd``: the spend at the window's end if it goes on at the window's average rate so far.
    ``alerts``: the thresholds (percent) the gate announced (``budget_alert``) in this window.
    """

    scope: str
    window: str
    limit_usd: float
    spent_usd: float
    reserved_usd: float
    percent: float
    projected_usd: float
    resets_at: datetime
    alerts: list[int]


class CacheView(Struct, kw_only=True):
    """The response cache: hits, misses, hit rate (0..1), entries (sum over replicas), USD saved by hits."""

    hits: int
    misses: int
    hit_rate: float | None
    entries: int
    saved_usd: float


class AttemptView(Struct, kw_only=True):
    """One attempt of a request: provider, model, outcome, error type, latency (ms)."""

    provider: str
    model: str
    outcome: str
    error_type: str | None
    latency_ms: float


class RequestView(Struct, kw_only=True):
    """One answered request: id, outcome, model, provider, attempts, cost (USD), latency (ms), cached, trace id."""

    id: str
    at_ms: int
    status: str
    error_type: str | None
    model: str | None
    provider: str | None
    attempts: list[AttemptView]
    cost_usd: float
    latency_ms: float
    cached: bool
    trace_id: str | None
    cost_event: CostEvent | None = None


class DeadLetterView(Struct, kw_only=True):
    """One dead letter: when, from which topic and stage, its key, why, and its size (bytes)."""

    at: datetime
    source_topic: str
    stage: str
    key: str | None
    reason: str
    size: int


class DashboardSnapshot(Struct, kw_only=True):
    """Everything the page shows at ``at`` (the JSON of ``/dashboard/state`` and of each server-sent event)."""

    at: datetime
    providers: list[ProviderView]
    traffic: Traffic
    spend_by_provider: list[Spend]
    spend_by_user: list[Spend]
    budgets: list[BudgetBar]
    cache: CacheView
    requests: list[RequestView]
    dead_letters: list[DeadLetterView]
    events_seen: int


def trace_id_of(traceparent: bytes | None) -> str | None:
    """The trace id (32 hex digits) of a W3C ``traceparent`` header value, if well formed (W3C Trace Context)."""
    if not traceparent:
        return None
    parts = traceparent.decode("ascii", "replace").split("-")
    return parts[1] if len(parts) >= 4 and len(parts[1]) == 32 else None


class OperatorBoard:
    """Folds the topics into a ``DashboardSnapshot`` (see the module docstring).

    Args:
        config: the pipeline's configuration (the deployments to list, breaker thresholds, budget time zone).
        window_s: span of the traffic chart and of the latency and error-rate samples (s).
        max_requests: latest requests kept (with their cost events).
        max_dead_letters: latest dead letters kept.
        max_transitions: latest circuit transitions kept per provider.
        top_users: users listed in the spend table.
        clock: current time as Unix epoch seconds.

    Raises:
        ValueError: when a size or the window is not positive.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        window_s: float = 300.0,
        max_requests: int = 200,
        max_dead_letters: int = 50,
        max_transitions: int = 20,
        top_users: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if min(window_s, max_requests, max_dead_letters, max_transitions, top_users) <= 0:
            raise ValueError("window_s and the sizes must be > 0")
        self.config = config
        self.window_s = window_s
        self.clock = clock
        self.tz = ZoneInfo(config.budget.timezone)
        self.health = HealthBoard(config, window_s=window_s, max_samples=MAX_CALL_SAMPLES, clock=clock)
        self.costs = CostBook(self.tz)
        self.top_users = top_users
        self._max_transitions = max_transitions
        self._transitions: dict[str, deque[Transition]] = {}
        self._calls: dict[str, deque[tuple[float, float, bool]]] = {}
        self._seconds: dict[int, TrafficSecond] = {}
        self._requests: deque[RequestView] = deque(maxlen=max_requests)
        self._by_id: dict[str, RequestView] = {}
        self._cost_events: dict[str, CostEvent] = {}
        self._dead: deque[DeadLetterView] = deque(maxlen=max_dead_letters)
        self._alerts: dict[tuple[str, str], dict[int, datetime]] = {}
        self._cache: dict[str, CacheStats] = {}
        self._saved = Decimal(0)
        self.events_seen = 0

    # --- folding ---------------------------------------------------------------------------

    def apply_control(self, event: ControlEvent) -> None:
        """Fold one ``ai.control`` event."""
        self.events_seen += 1
        self.health.apply(event)
        self.costs.add_control(event)
        if isinstance(event, Health):
            calls = self._calls.setdefault(event.provider, deque(maxlen=MAX_CALL_SAMPLES))
            calls.append((event.at.timestamp(), event.latency_ms, event.ok))
        elif isinstance(event, CircuitTransition):
            kept = self._transitions.setdefault(event.provider, deque(maxlen=self._max_transitions))
            kept.append(
                Transition(
                    at_ms=int(event.at.timestamp() * 1000),
                    from_state=event.from_state,
                    to_state=event.to_state,
                    reason=event.reason,
                )
            )
        elif isinstance(event, BudgetAlert):
            self._alerts.setdefault((event.scope, event.window), {})[event.threshold_pct] = event.at
        elif isinstance(event, CacheStats):
            self._cache[event.replica or "-"] = event

    def apply_cost(self, event: CostEvent) -> None:
        """Fold one ``ai.costs`` event (a request id counted once)."""
        self.events_seen += 1
        if self.costs.add_cost(event):
            self._saved += Decimal(str(event.saved_usd))
        if len(self._cost_events) >= 4 * (self._requests.maxlen or 1):
            self._cost_events.pop(next(iter(self._cost_events)))
        self._cost_events[event.id] = event
        known = self._by_id.get(event.id)
        if known is not None:
            known.cost_event = event

    def apply_response(self, response: AIResponse, *, at_s: float, traceparent: bytes | None = None) -> None:
        """Fold one ``ai.responses`` answer, read at ``at_s`` (epoch s, the record's timestamp)."""
        self.events_seen += 1
        if response.id in self._by_id:
            return  # a duplicate answer (at-least-once): counted once
        failed_before = any(a.outcome == "error" for a in response.attempts)
        second = int(at_s)
        if second >= self.clock() - self.window_s - 1:
            bucket = self._seconds.setdefault(second, TrafficSecond(t=second))
            if response.status == "ok":
                bucket.ok += 1
                bucket.cached += response.cached
                bucket.fallback += failed_before
            else:
                kind = response.error.type if response.error is not None else "error"
                bucket.errors = {**bucket.errors, kind: bucket.errors.get(kind, 0) + 1}
            self._prune_seconds()
        view = RequestView(
            id=response.id,
            at_ms=int(at_s * 1000),
            status=response.status,
            error_type=response.error.type if response.error is not None else None,
            model=response.model,
            provider=response.provider,
            attempts=[
                AttemptView(
                    provider=a.provider,
                    model=a.model,
                    outcome=a.outcome,
                    error_type=a.error_type,
                    latency_ms=round(a.latency_ms, 1),
                )
                for a in response.attempts
            ],
            cost_usd=response.cost_usd,
            latency_ms=round(response.latency_ms, 1),
            cached=response.cached,
            trace_id=trace_id_of(traceparent),
            cost_event=self._cost_events.get(response.id),
        )
        if len(self._requests) == self._requests.maxlen:
            self._by_id.pop(self._requests[0].id, None)
        self._requests.append(view)
        self._by_id[view.id] = view

    def apply_dead_letter(self, letter: DeadLetter) -> None:
        """Fold one ``ai.deadletter`` record."""
        self.events_seen += 1
        self._dead.append(
            DeadLetterView(
                at=letter.at,
                source_topic=letter.source_topic,
                stage=letter.stage,
                key=letter.key,
                reason=letter.reason,
                size=letter.raw_size if letter.raw_size is not None else len(letter.raw),
            )
        )

    def _prune_seconds(self) -> None:
        horizon = self.clock() - self.window_s - 1
        for second in [s for s in self._seconds if s < horizon]:
            del self._seconds[second]

    # --- reading ---------------------------------------------------------------------------

    def request(self, request_id: str) -> RequestView | None:
        """One of the latest requests by id (with its cost event when it arrived), else ``None``."""
        return self._by_id.get(request_id)

    def snapshot(self, now_s: float | None = None) -> DashboardSnapshot:
        """The dashboard's state at ``now_s`` (epoch s; default the clock)."""
        now_s = self.clock() if now_s is None else now_s
        now = datetime.fromtimestamp(now_s, UTC)
        self._prune_seconds()
        return DashboardSnapshot(
            at=now,
            providers=self._providers(now_s),
            traffic=self._traffic(now_s),
            spend_by_provider=[self._spend(name, name, now) for name in self._provider_names()],
            spend_by_user=self._top_users(now),
            budgets=self._budgets(now),
            cache=self._cache_view(now_s),
            requests=[
                msgspec.structs.replace(r, cost_event=None)
                for r in list(reversed(self._requests))[:REQUESTS_IN_SNAPSHOT]
            ],
            dead_letters=list(reversed(self._dead)),
            events_seen=self.events_seen,
        )

    def _provider_names(self) -> list[str]:
        configured = [name for name, p in self.config.providers.items() if p.enabled]
        return configured + [p for p in self.health.providers() if p not in configured]

    def _providers(self, now_s: float) -> list[ProviderView]:
        out: list[ProviderView] = []
        horizon = now_s - self.window_s
        for name in self._provider_names():
            status = self.health.status_of(name, now_s)
            recent = [c for c in self._calls.get(name, ()) if c[0] >= horizon]
            latencies = sorted(c[1] for c in recent if c[2])
            minute = sum(1 for c in recent if c[0] >= now_s - 60)
            p50 = percentile(latencies, 50) if latencies else None
            p95 = percentile(latencies, 95) if latencies else None
            out.append(
                ProviderView(
                    name=name,
                    state=status.circuit_breaker_state,
                    healthy=status.is_healthy,
                    error_rate=status.error_rate,
                    p50_ms=round(p50, 1) if p50 is not None else None,
                    p95_ms=round(p95, 1) if p95 is not None else None,
                    calls_per_s=round(minute / 60, 2),
                    last_error=status.last_error,
                    transitions=list(self._transitions.get(name, ())),
                )
            )
        return out

    def _traffic(self, now_s: float) -> Traffic:
        first = int(now_s - self.window_s) + 1
        seconds = [self._seconds.get(t) or TrafficSecond(t=t) for t in range(first, int(now_s) + 1)]
        minute = [s for s in seconds if s.t > now_s - 60]
        errors: dict[str, int] = {}
        for s in minute:
            for kind, n in s.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        answered = sum(s.ok + sum(s.errors.values()) for s in minute)
        return Traffic(
            seconds=seconds,
            per_s_last_minute=round(answered / 60, 2),
            failovers_last_minute=sum(s.fallback for s in minute),
            errors_last_minute=errors,
        )

    def _top_users(self, now: datetime) -> list[Spend]:
        """The users who spent most this month (then this week, today), as the table's columns say."""
        spends = [self._spend(user, f"user:{user}", now) for user in self.costs.users]
        spends = [s for s in spends if s.month_usd > 0]
        spends.sort(key=lambda s: (s.month_usd, s.week_usd, s.today_usd, s.name), reverse=True)
        return spends[: self.top_users]

    def _spend(self, name: str, scope: str, now: datetime) -> Spend:
        def spent(window: str) -> float:
            return float(round(self.costs.spent(scope, window_start(window, now, self.tz), now), 6))

        return Spend(name=name, today_usd=spent("daily"), week_usd=spent("weekly"), month_usd=spent("monthly"))

    def _budgets(self, now: datetime) -> list[BudgetBar]:
        bars: list[BudgetBar] = []
        for scope in self.costs.budget_scopes():
            report = self.costs.budget_status(scope, now)
            for window in WINDOWS:
                w = report.window(window)
                if w.limit_usd is None or not math.isfinite(w.limit_usd) or w.limit_usd < 0:
                    continue  # no limit, or one the gate refused (a raw set_budget it ignored)
                start, end = window_start(window, now, self.tz), window_end(window, now, self.tz)
                elapsed = max((now - start).total_seconds(), 60.0)  # a projection from under a minute means nothing
                projected = w.spent_usd * (end - start).total_seconds() / elapsed
                bars.append(
                    BudgetBar(
                        scope=scope,
                        window=window,
                        limit_usd=w.limit_usd,
                        spent_usd=w.spent_usd,
                        reserved_usd=w.reserved_usd,
                        percent=w.percentage or 0.0,
                        projected_usd=round(projected, 6),
                        resets_at=w.resets_at,
                        alerts=sorted(t for t, at in self._alerts.get((scope, window), {}).items() if at >= start),
                    )
                )
        return bars

    def _cache_view(self, now_s: float) -> CacheView:
        live = [s for s in self._cache.values() if s.at.timestamp() >= now_s - CACHE_STATS_STALE_S]
        hits = sum(s.hits for s in live)
        misses = sum(s.misses for s in live)
        lookups = hits + misses
        return CacheView(
            hits=hits,
            misses=misses,
            hit_rate=round(hits / lookups, 4) if lookups else None,
            entries=sum(s.entries for s in live),
            saved_usd=float(round(self._saved, 6)),
        )
