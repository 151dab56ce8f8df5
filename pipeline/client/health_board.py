"""``HealthStatus`` per provider, folded from ``ai.control`` (pure: no I/O, time passed in or read from a clock).

Passive health comes from every executor attempt, active health from the
health monitor's probes (both ``health`` events); circuit states from the
breaker's ``circuit_transition`` and ``circuit_snapshot`` events. Over a
sliding window of ``window_s`` seconds:

* ``error_rate``: counted failures (DESIGN A8: ``server_error``, ``timeout``,
  ``rate_limit``, ``authentication``) over successes plus counted failures; the
  caller's errors (``invalid_request`` ...) say nothing about the provider;
* ``response_time_ms``: average latency of the successful calls (ms);
* ``is_healthy``: the circuit is ``CLOSED`` and the error rate is below the
  provider's ``breaker.error_rate_threshold``;
* ``last_error``: the latest counted failure, e.g. ``server_error (HTTP 500)``;
* ``checked_at``: the time of the latest health event.

The manager (``get_health_status``) and ``aipipe status`` feed it from a
broadcast reader of ``ai.control``, so it works in any client process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from msgspec import Struct

from pipeline.errors import BREAKER_COUNTED_TYPES
from pipeline.runtime.config import PipelineConfig
from schemas.events import CircuitState, ControlEvent, Health
from stages.rules.circuit_view import CircuitView


class HealthStatus(Struct, kw_only=True):
    """The health of one provider (DESIGN A5; the seed's ``HealthStatus``).

    ``error_rate`` is a fraction 0..1 over the window, ``response_time_ms`` the
    average latency of successful calls in the window (ms, 0 when none),
    ``checked_at`` the time of the latest call or probe (``None``: never seen),
    ``calls_in_window`` how many calls the rates are computed from.
    """

    provider: str
    is_healthy: bool
    error_rate: float
    response_time_ms: float
    circuit_breaker_state: CircuitState
    last_error: str | None = None
    checked_at: datetime | None = None
    calls_in_window: int = 0


@dataclass(frozen=True, slots=True)
class _Sample:
    at_s: float
    failed: bool
    latency_ms: float
    ok: bool


class HealthBoard:
    """Folds control events into a ``HealthStatus`` per provider.

    Args:
        config: provider thresholds (``breaker.error_rate_threshold``); ``None``: 0.5 for all.
        window_s: sliding window of the error rate and average response time (s).
        max_samples: most calls kept per provider.
        clock: current time as Unix epoch seconds.

    Raises:
        ValueError: when ``window_s`` or ``max_samples`` is not positive.
    """

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        window_s: float = 300.0,
        max_samples: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0 or max_samples <= 0:
            raise ValueError("window_s and max_samples must be > 0")
        self.config = config
        self.window_s = window_s
        self.clock = clock
        self.circuits = CircuitView()
        self._max_samples = max_samples
        self._samples: dict[str, deque[_Sample]] = {}
        self._last_error: dict[str, str] = {}
        self._checked_at: dict[str, datetime] = {}

    def apply(self, event: ControlEvent) -> None:
        """Fold one control event (a listener for ``pipeline.runtime.feeds.BroadcastFeed``)."""
        if isinstance(event, Health):
            self._health(event)
        else:
            self.circuits.apply(event)

    def _health(self, event: Health) -> None:
        provider = event.provider
        known = self._checked_at.get(provider)
        if known is None or event.at > known:
            self._checked_at[provider] = event.at
        failed = not event.ok and event.error_type in BREAKER_COUNTED_TYPES
        if failed:
            code = f" (HTTP {event.status_code})" if event.status_code is not None else ""
            at = event.at.isoformat(timespec="seconds")
            self._last_error[provider] = f"{event.error_type}{code} from {event.source} at {at}"
        if not event.ok and not failed:
            return  # the caller's error: says nothing about the provider
        samples = self._samples.setdefault(provider, deque(maxlen=self._max_samples))
        samples.append(_Sample(event.at.timestamp(), failed, event.latency_ms, event.ok))

    def _threshold(self, provider: str) -> float:
        if self.config is not None and provider in self.config.providers:
            return self.config.providers[provider].breaker.error_rate_threshold
        return 0.5

    def status_of(self, provider: str, now_s: float | None = None) -> HealthStatus:
        """The ``HealthStatus`` of one provider now (or at ``now_s``, epoch s)."""
        now = self.clock() if now_s is None else now_s
        horizon = now - self.window_s
        recent = [s for s in self._samples.get(provider, ()) if s.at_s >= horizon]
        failures = sum(1 for s in recent if s.failed)
        error_rate = failures / len(recent) if recent else 0.0
        latencies = [s.latency_ms for s in recent if s.ok]
        state = self.circuits.state(provider)
        return HealthStatus(
            provider=provider,
            is_healthy=state == "CLOSED" and error_rate < self._threshold(provider),
            error_rate=round(error_rate, 4),
            response_time_ms=round(sum(latencies) / len(latencies), 3) if latencies else 0.0,
            circuit_breaker_state=state,
            last_error=self._last_error.get(provider),
            checked_at=self._checked_at.get(provider),
            calls_in_window=len(recent),
        )

    def providers(self) -> list[str]:
        """Every provider seen in an event, sorted."""
        return sorted(set(self._samples) | set(self._checked_at) | set(self.circuits.states))

    def status(self, providers: Iterable[str] = (), now_s: float | None = None) -> list[HealthStatus]:
        """``HealthStatus`` of ``providers`` (in that order) and then of every other provider seen."""
        wanted = list(dict.fromkeys(providers))
        wanted += [p for p in self.providers() if p not in wanted]
        return [self.status_of(p, now_s) for p in wanted]
