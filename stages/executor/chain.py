"""The fallback chain's pure rules (DESIGN A8 "Skips and deadlines"): the final error, attempt time limits.

* The error when the chain ends: failures of one provider give that
  provider's last error type (one provider answering ``rate_limit`` three
  times is ``rate_limit``); failures of two or more providers give
  ``all_providers_failed`` with every attempt listed; a chain of skips only
  gives the skip's type (``context_length_exceeded``, ``budget_exceeded``...;
  the preferred candidate's when they differ). ``error.provider`` is the
  provider of the last real failure. A passed deadline is always ``timeout``.
* Each attempt's time limit is the provider's ``timeout_ms``, capped at the
  time left minus a reserve for one attempt of the next untried candidate:
  ``retry.fallback_reserve_ms`` when set, else that candidate's observed p95
  latency, at least ``MIN_RESERVE_S``.
"""

from __future__ import annotations

from collections import deque

from schemas.response import Attempt, ErrorInfo

#: The least time (s) kept for the next untried candidate (DESIGN A8).
MIN_RESERVE_S = 2.0
#: An attempt is never given less than this (s) because of the reserve: below it, it gets all the time left.
MIN_ATTEMPT_S = 0.5
#: Latency samples kept per provider for its p95.
LATENCY_SAMPLES = 200


class LatencyWindow:
    """The latest successful call latencies (ms) per provider, for the p95 the reserve is based on."""

    def __init__(self, samples: int = LATENCY_SAMPLES) -> None:
        self._samples = samples
        self._by_provider: dict[str, deque[float]] = {}

    def add(self, provider: str, latency_ms: float) -> None:
        """Record one successful call's latency (ms)."""
        self._by_provider.setdefault(provider, deque(maxlen=self._samples)).append(latency_ms)

    def p95_s(self, provider: str) -> float | None:
        """The 95th percentile (nearest rank) of ``provider``'s recent latencies (s), ``None`` without samples."""
        samples = self._by_provider.get(provider)
        if not samples:
            return None
        ordered = sorted(samples)
        rank = max(0, -(-95 * len(ordered) // 100) - 1)
        return ordered[rank] / 1000


def reserve_s(next_provider: str | None, latencies: LatencyWindow, configured_ms: int | None) -> float:
    """The time (s) to keep for one attempt of ``next_provider`` (0 when no candidate is left)."""
    if next_provider is None:
        return 0.0
    if configured_ms is not None:
        return configured_ms / 1000
    return max(MIN_RESERVE_S, latencies.p95_s(next_provider) or 0.0)


def attempt_timeout_s(provider_timeout_s: float, left_s: float, reserve: float) -> float:
    """One attempt's limit (s): the provider's timeout, capped at the time left minus ``reserve``."""
    budget = left_s - reserve
    if budget < MIN_ATTEMPT_S:
        budget = left_s  # too little to share: this attempt takes what is left
    return max(0.0, min(provider_timeout_s, budget))


def final_error(attempts: list[Attempt], last_message: str | None = None) -> ErrorInfo:
    """The error of a chain that ended without an answer (module docstring).

    ``last_message`` is the last real failure's own text (e.g. ``could not connect to ...``),
    appended so the caller sees why, not only the error type.
    """
    failures = [a for a in attempts if a.outcome == "error"]
    skips = [a for a in attempts if a.outcome == "skipped"]
    if failures:
        providers = list(dict.fromkeys(a.provider for a in failures))
        last = failures[-1]
        skipped = f"; skipped: {_skips_text(skips)}" if skips else ""
        detail = f"; last error: {last_message}" if last_message else ""
        if all(a.error_type == "invalid_response" for a in failures):  # DESIGN A4: no answer validated
            return ErrorInfo(
                type="invalid_response",
                message=f"no answer held to the response format after {len(failures)} attempt(s){detail}{skipped}",
                provider=last.provider,
            )
        if len(providers) == 1:
            return ErrorInfo(
                type=last.error_type or "server_error",  # type: ignore[arg-type]
                message=f"{last.provider} failed after {len(failures)} attempt(s): "
                f"{last.error_type} ({last.status_code or '-'}){detail}{skipped}",
                provider=last.provider,
            )
        summary = "; ".join(f"{a.provider}: {a.error_type} ({a.status_code or '-'})" for a in failures)
        return ErrorInfo(
            type="all_providers_failed",
            message=f"all providers failed after {len(failures)} attempts: {summary}{detail}{skipped}",
            provider=last.provider,
        )
    if skips:
        return ErrorInfo(
            type=skips[0].error_type or "all_providers_failed",  # type: ignore[arg-type]
            message=f"every candidate was skipped: {_skips_text(skips)}",
        )
    return ErrorInfo(type="all_providers_failed", message="no candidate provider could be called")


def _skips_text(skips: list[Attempt]) -> str:
    return "; ".join(f"{a.provider}: {a.reason}" for a in skips)
