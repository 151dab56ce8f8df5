"""Circuit breaker of one provider: a pure state machine (DESIGN A8, B1), no I/O, time passed in.

States ``CLOSED`` -> ``OPEN`` -> ``HALF_OPEN`` -> ``CLOSED`` (or back to ``OPEN``):

* ``CLOSED``: every call outcome counts (executor attempts and health probes).
  The circuit opens after ``failure_threshold`` consecutive counted failures,
  or when the error rate over the last ``window_s`` seconds reaches
  ``error_rate_threshold`` with at least ``min_requests`` outcomes in the window.
* ``OPEN``: user traffic skips the provider; outcomes are ignored. After the
  cool-off the circuit goes ``HALF_OPEN``. The first trip waits ``cool_off_s``;
  each re-open from ``HALF_OPEN`` doubles the previous cool-off, capped at
  ``max_cool_off_s``; closing resets it.
* ``HALF_OPEN``: user traffic still skips the provider; only health-monitor
  probes count. ``success_threshold`` successful probes close it; one failed
  probe re-opens it; no decisive probe result within ``probe_deadline_s``
  counts as a failed probe, so ``HALF_OPEN`` never sticks.

Counted failures are ``server_error``, ``timeout``, ``rate_limit`` and
``authentication`` (``pipeline.errors.BREAKER_COUNTED_TYPES``); the caller's
errors (``invalid_request``, ``model_not_found``, ``content_filter``,
``context_length_exceeded``) count neither as failures nor as successes.

``Retry-After`` on a counted ``rate_limit`` sets a floor on the cool-off: the
circuit stays ``OPEN`` at least until the latest such deadline, and a later,
shorter ``Retry-After`` never shortens a longer one.

Outcomes carry their own time (``at_s``); an outcome older than the last state
change, or older than the window, is ignored: it belongs to a period whose
verdict is already known (a straggling attempt that started before the circuit
opened, or history replayed at start). Probes get ``PROBE_CLOCK_SKEW_S`` of
slack, as the prober's clock may differ a little from the breaker's.

All times are Unix epoch seconds (floats).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import BREAKER_COUNTED_TYPES
from pipeline.runtime.config import BreakerPolicy
from schemas.events import CircuitState

Source = Literal["attempt", "probe"]

#: A probe that ended up to this long (s) before the last transition still counts: the
#: health monitor and the breaker may run on hosts whose clocks differ by a little.
PROBE_CLOCK_SKEW_S = 1.0


@dataclass(frozen=True, slots=True)
class Observation:
    """One call outcome fed to a breaker.

    ``at_s``: when the call ended (epoch s). ``error_type``: the ``error.type``
    of a failed call. ``retry_after_s``: the provider's ``Retry-After`` (s).
    """

    ok: bool
    at_s: float
    source: Source = "attempt"
    error_type: str | None = None
    status_code: int | None = None
    retry_after_s: float | None = None

    @property
    def counted_failure(self) -> bool:
        """Whether this outcome is a failure that counts toward the breaker (DESIGN A8)."""
        return not self.ok and self.error_type in BREAKER_COUNTED_TYPES

    @property
    def decisive(self) -> bool:
        """A success or a counted failure (the caller's errors are neither)."""
        return self.ok or self.counted_failure

    def describe(self) -> str:
        """Short text such as ``server_error (500)`` or ``ok``."""
        if self.ok:
            return "ok"
        return f"{self.error_type} ({self.status_code})" if self.status_code is not None else f"{self.error_type}"


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change decided at ``at_s`` (epoch s); ``cool_off_s`` is set when it goes ``OPEN`` (s)."""

    provider: str
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    at_s: float
    cool_off_s: float | None = None


class CircuitBreaker:
    """The circuit of one provider.

    Args:
        provider: provider name (copied into transitions).
        policy: thresholds of DESIGN A8 (``breaker.*``).
        probe_deadline_s: longest wait in ``HALF_OPEN`` for a decisive probe result (s).

    Raises:
        ValueError: when ``probe_deadline_s`` is not positive.
    """

    def __init__(self, provider: str, policy: BreakerPolicy, *, probe_deadline_s: float = 30.0) -> None:
        if probe_deadline_s <= 0:
            raise ValueError("probe_deadline_s must be > 0")
        self.provider = provider
        self.policy = policy
        self.probe_deadline_s = probe_deadline_s
        self.state: CircuitState = "CLOSED"
        #: When the current state began (epoch s); ``-inf`` before any change.
        self.changed_at_s = float("-inf")
        #: End of the current cool-off (epoch s), meaningful in ``OPEN``.
        self.open_until_s = 0.0
        #: The computed cool-off of the last trip (s), doubled on each re-open; 0 after closing.
        self.last_cool_off_s = 0.0
        self.consecutive_failures = 0
        self.half_open_successes = 0
        self.half_open_deadline_s = 0.0
        self._retry_after_until_s = 0.0
        self._window: deque[tuple[float, bool]] = deque()

    # --- reading ----------------------------------------------------------------------------------

    def error_rate(self, now_s: float) -> tuple[float, int]:
        """Counted-failure rate over the window and the number of outcomes in it (``(0.0, 0)`` when empty)."""
        self._prune(now_s)
        n = len(self._window)
        if n == 0:
            return 0.0, 0
        return sum(1 for _, failed in self._window if failed) / n, n

    # --- events -----------------------------------------------------------------------------------

    def observe(self, obs: Observation, now_s: float) -> Transition | None:
        """Fold one call outcome; returns the transition it causes, if any."""
        if obs.at_s < now_s - self.policy.window_s:
            return None
        if obs.counted_failure and obs.error_type == "rate_limit" and obs.retry_after_s:
            self._retry_after_until_s = max(self._retry_after_until_s, obs.at_s + obs.retry_after_s)
        skew_s = PROBE_CLOCK_SKEW_S if obs.source == "probe" else 0.0
        if obs.at_s < self.changed_at_s - skew_s:
            if self.state == "OPEN":
                self.open_until_s = max(self.open_until_s, self._retry_after_until_s)
            return None
        if self.state == "CLOSED":
            return self._observe_closed(obs, now_s)
        if self.state == "OPEN":
            self.open_until_s = max(self.open_until_s, self._retry_after_until_s)
            return None
        return self._observe_half_open(obs, now_s)

    def tick(self, now_s: float) -> Transition | None:
        """Let time pass: ``OPEN`` -> ``HALF_OPEN`` after the cool-off; a ``HALF_OPEN`` without probes re-opens."""
        if self.state == "OPEN" and now_s >= self.open_until_s:
            cool = self.open_until_s - self.changed_at_s
            self.half_open_successes = 0
            self.half_open_deadline_s = now_s + self.probe_deadline_s
            return self._change("HALF_OPEN", f"cool-off of {cool:.3g}s elapsed", now_s)
        if self.state == "HALF_OPEN" and now_s >= self.half_open_deadline_s:
            return self._open(
                f"no probe result within {self.probe_deadline_s:.3g}s (counted as a failed probe)",
                now_s,
                reopen=True,
            )
        return None

    def restore(self, state: CircuitState, at_s: float, cool_off_s: float | None, now_s: float) -> None:
        """Adopt a state published on ``ai.control`` (by a previous owner of this provider) at ``at_s``.

        ``cool_off_s`` is the published cool-off of an ``OPEN`` state (s); the
        next re-open doubles it. Counters start afresh.
        """
        self.state = state
        self.changed_at_s = at_s
        self.consecutive_failures = 0
        self.half_open_successes = 0
        self._window.clear()
        if state == "OPEN":
            cool = cool_off_s if cool_off_s is not None else self.policy.cool_off_s
            self.last_cool_off_s = min(cool, self.policy.max_cool_off_s)
            self.open_until_s = at_s + cool
        elif state == "HALF_OPEN":
            self.half_open_deadline_s = max(at_s, now_s) + self.probe_deadline_s
        else:
            self.last_cool_off_s = 0.0

    # --- internals --------------------------------------------------------------------------------

    def _prune(self, now_s: float) -> None:
        horizon = now_s - self.policy.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _observe_closed(self, obs: Observation, now_s: float) -> Transition | None:
        if not obs.decisive:
            return None
        failed = obs.counted_failure
        self._window.append((obs.at_s, failed))
        self._prune(now_s)  # on every outcome, so a long run of successes keeps only the window's
        if not failed:
            self.consecutive_failures = 0
            return None
        self.consecutive_failures += 1
        p = self.policy
        if self.consecutive_failures >= p.failure_threshold:
            return self._open(
                f"{self.consecutive_failures} consecutive failures (last: {obs.describe()})", now_s, reopen=False
            )
        rate, n = self.error_rate(now_s)
        if n >= p.min_requests and rate >= p.error_rate_threshold:
            failures = round(rate * n)
            return self._open(
                f"error rate {rate:.0%} ({failures}/{n} calls in {p.window_s:g}s) >= {p.error_rate_threshold:.0%}",
                now_s,
                reopen=False,
            )
        return None

    def _observe_half_open(self, obs: Observation, now_s: float) -> Transition | None:
        if obs.source != "probe" or not obs.decisive:
            return None
        if obs.counted_failure:
            return self._open(f"probe failed: {obs.describe()}", now_s, reopen=True)
        self.half_open_successes += 1
        self.half_open_deadline_s = now_s + self.probe_deadline_s
        if self.half_open_successes >= self.policy.success_threshold:
            self.last_cool_off_s = 0.0
            self._window.clear()
            self.consecutive_failures = 0
            return self._change("CLOSED", f"{self.half_open_successes} successful probes", now_s)
        return None

    def _open(self, reason: str, now_s: float, *, reopen: bool) -> Transition:
        p = self.policy
        if reopen and self.last_cool_off_s > 0:
            cool = min(self.last_cool_off_s * 2, p.max_cool_off_s)
        else:
            cool = min(p.cool_off_s, p.max_cool_off_s)
        self.last_cool_off_s = cool
        until = max(now_s + cool, self._retry_after_until_s)
        if until > now_s + cool:
            reason = f"{reason}; Retry-After holds it open until {until - now_s:.3g}s from now"
        self.open_until_s = until
        self.consecutive_failures = 0
        self.half_open_successes = 0
        self._window.clear()
        return self._change("OPEN", reason, now_s, cool_off_s=round(until - now_s, 3))

    def _change(self, to: CircuitState, reason: str, now_s: float, *, cool_off_s: float | None = None) -> Transition:
        transition = Transition(self.provider, self.state, to, reason, now_s, cool_off_s)
        self.state = to
        self.changed_at_s = now_s
        return transition
