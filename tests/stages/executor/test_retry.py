"""The executor's retry schedule: full-jitter backoff and retry/fallback/fail by error type (DESIGN A8)."""

from __future__ import annotations

import random

import pytest

from pipeline.runtime.config import RetryPolicy
from stages.executor.retry import backoff_delay_s, decide

# --- retry ------------------------------------------------------------------------------------

def test_backoff_full_jitter_stays_within_the_exponential_cap() -> None:
    policy = RetryPolicy(base_delay_ms=100, max_delay_ms=1000, backoff_multiplier=2)
    rng = random.Random(7)
    for n, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        delays = [backoff_delay_s(policy, n, rng) for _ in range(300)]
        assert 0 <= min(delays) and max(delays) <= cap
        assert max(delays) > cap * 0.8  # full jitter spreads over the whole range


@pytest.mark.parametrize(
    ("error", "action"),
    [
        ("invalid_request", "fail"),
        ("content_filter", "fail"),
        ("authentication", "fallback"),
        ("model_not_found", "fallback"),
        ("context_length_exceeded", "fallback"),
        ("rate_limit", "retry"),
        ("server_error", "retry"),
        ("timeout", "retry"),
    ],
)
def test_decide_by_error_type(error: str, action: str) -> None:
    d = decide(error_type=error, attempt_number=1, policy=RetryPolicy(), remaining_s=60, rng=random.Random(1))
    assert d.action == action


def test_decide_counts_the_first_call_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=3, max_delay_ms=30_000)
    assert decide(error_type="server_error", attempt_number=3, policy=policy, remaining_s=60).action == "fallback"
    d = decide(error_type="rate_limit", attempt_number=1, policy=policy, remaining_s=60, retry_after_s=2)
    assert (d.action, d.delay_s) == ("retry", 2)
    too_long = decide(error_type="rate_limit", attempt_number=1, policy=policy, remaining_s=60, retry_after_s=31)
    assert too_long.action == "fallback"
    past_deadline = decide(error_type="rate_limit", attempt_number=1, policy=policy, remaining_s=1.5,
                           retry_after_s=2)
    assert past_deadline.action == "fallback"
    allowed = decide(error_type="content_filter", attempt_number=1, policy=policy, remaining_s=9,
                     allow_content_filter_fallback=True)
    assert allowed.action == "fallback"
