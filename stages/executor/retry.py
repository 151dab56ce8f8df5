"""Retry and fallback decisions (DESIGN A8), pure: what to do after a failed attempt.

Backoff is exponential with full jitter: the n-th retry (n = 1, 2, ...) waits a
uniform random time in [0, min(max_delay_ms, base_delay_ms * multiplier**(n-1))]
(the "full jitter" scheme of the AWS Architecture Blog, "Exponential Backoff
And Jitter", 2015). A provider's ``Retry-After`` replaces the computed wait;
when that wait is longer than ``max_delay_ms`` or than the time left before
the request's deadline, the request falls back at once instead of sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pipeline.runtime.config import RetryPolicy

#: Errors that end the request at once: the caller's mistake fails everywhere.
FAIL_NOW: frozenset[str] = frozenset({"invalid_request"})
#: Errors that move on to the next candidate without retrying this one.
#: ``invalid_response`` (an answer that broke the request's response format) is in this set: asking the
#: same model again mostly gives the same answer (DESIGN A4).
FALLBACK_NOW: frozenset[str] = frozenset(
    {"authentication", "model_not_found", "context_length_exceeded", "invalid_response"}
)

Action = Literal["retry", "fallback", "fail"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do next: ``retry`` after ``delay_s`` (s), ``fallback`` to the next candidate, or ``fail``."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""


def backoff_delay_s(policy: RetryPolicy, retry_number: int, rng: random.Random | None = None) -> float:
    """Full-jitter wait (s) before retry number ``retry_number`` (1 = first retry)."""
    cap_ms = min(policy.max_delay_ms, policy.base_delay_ms * policy.backoff_multiplier ** max(retry_number - 1, 0))
    return (rng or random).uniform(0, cap_ms) / 1000


def decide(
    *,
    error_type: str,
    attempt_number: int,
    policy: RetryPolicy,
    remaining_s: float,
    retry_after_s: float | None = None,
    allow_content_filter_fallback: bool = False,
    rng: random.Random | None = None,
) -> Decision:
    """The next step after attempt ``attempt_number`` (1-based) on one provider failed with ``error_type``.

    ``remaining_s`` is the time left before the request's deadline (s).
    """
    if error_type in FAIL_NOW:
        return Decision("fail", reason=f"{error_type} is not retried or sent elsewhere")
    if error_type == "content_filter":
        if allow_content_filter_fallback:
            return Decision("fallback", reason="content_filter (fallback allowed by setting)")
        return Decision("fail", reason="content_filter: a refusal is not sent to another provider")
    if error_type in FALLBACK_NOW or error_type not in policy.retryable_errors:
        return Decision("fallback", reason=f"{error_type} is not retried on the same provider")
    if attempt_number >= policy.max_attempts:
        return Decision("fallback", reason=f"retry.max_attempts ({policy.max_attempts}) used")
    if retry_after_s is not None:
        if retry_after_s * 1000 > policy.max_delay_ms:
            return Decision("fallback", reason=f"Retry-After {retry_after_s:g}s exceeds retry.max_delay_ms")
        if retry_after_s >= remaining_s:
            return Decision("fallback", reason=f"Retry-After {retry_after_s:g}s exceeds the time left")
        return Decision("retry", delay_s=retry_after_s, reason="Retry-After")
    delay = backoff_delay_s(policy, attempt_number, rng)
    if delay >= remaining_s:
        return Decision("fallback", reason="backoff exceeds the time left")
    return Decision("retry", delay_s=delay, reason="backoff")
