"""Retries and fallback rules (DESIGN A8) end to end, with the emulator's faults, on both buses."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from schemas import AIRequest
from tests.harness import Harness

pytestmark = pytest.mark.kafka


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"resilience {rid}", "max_tokens": 32}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


def calls_by_provider(emu: Any) -> dict[str, int]:
    return {p: n for p, n in emu.counts().items() if n}


async def test_429_with_retry_after_2_then_200_waits_and_answers_from_the_same_provider(
    pipe: Harness, emu: Any
) -> None:
    emu.faults.schedule("cloudflare", {"status": 429, "retry_after_s": 2})
    resp = await pipe.client.request(request(f"ra2-{pipe.kind}"))
    assert resp.status == "ok" and resp.provider == "cloudflare"
    assert [(a.provider, a.outcome, a.status_code) for a in resp.attempts] == [
        ("cloudflare", "error", 429),
        ("cloudflare", "ok", 200),
    ]
    first, second = emu.calls("cloudflare")
    assert second.arrived_at - first.arrived_at >= 2.0
    assert calls_by_provider(emu) == {"cloudflare": 2}


async def test_retry_after_longer_than_the_time_left_falls_back_at_once(pipe: Harness, emu: Any) -> None:
    emu.faults.schedule("cloudflare", {"status": 429, "retry_after_s": 2})  # within max_delay_ms (3 s) ...
    with anyio.fail_after(1.5):  # ... but not within the request's 1.2 s deadline: no sleep
        resp = await pipe.client.request(request(f"ra-deadline-{pipe.kind}", timeout_ms=1200))
    assert resp.status == "ok" and resp.provider == "openai"
    assert [(a.provider, a.status_code) for a in resp.attempts] == [("cloudflare", 429), ("openai", 200)]


@pytest.mark.parametrize(
    ("status", "error_type", "falls_back"),
    [(404, "model_not_found", True), (401, "authentication", True), (400, "invalid_request", False)],
)
async def test_errors_that_are_never_retried_make_exactly_one_call(
    pipe: Harness, emu: Any, status: int, error_type: str, falls_back: bool
) -> None:
    emu.faults.set("cloudflare", {"default": {"status": status}})  # every call, 3 attempts allowed
    resp = await pipe.client.request(request(f"no-retry-{status}-{pipe.kind}"))
    assert resp.attempts[0].provider == "cloudflare" and resp.attempts[0].error_type == error_type
    assert emu.counts()["cloudflare"] == 1
    if falls_back:
        assert resp.status == "ok" and resp.provider == "openai"
        assert [a.provider for a in resp.attempts] == ["cloudflare", "openai"]
        assert calls_by_provider(emu) == {"cloudflare": 1, "openai": 1}
    else:
        assert resp.status == "error" and resp.error is not None
        assert resp.error.type == "invalid_request" and resp.error.provider == "cloudflare"
        assert len(resp.attempts) == 1 and calls_by_provider(emu) == {"cloudflare": 1}


async def test_a_content_policy_refusal_is_returned_and_no_other_provider_is_called(pipe: Harness, emu: Any) -> None:
    emu.faults.set("cloudflare", {"default": {"kind": "content_filter"}})
    resp = await pipe.client.request(request(f"refusal-{pipe.kind}"))
    assert resp.status == "error" and resp.error is not None
    assert resp.error.type == "content_filter" and resp.error.provider == "cloudflare"
    assert [(a.provider, a.error_type) for a in resp.attempts] == [("cloudflare", "content_filter")]
    assert calls_by_provider(emu) == {"cloudflare": 1}


async def test_two_provider_chain_failing_three_times_each_makes_six_calls(pipe: Harness, emu: Any) -> None:
    emu.faults.set("cloudflare", {"default": {"status": 503}})
    emu.faults.set("openai", {"default": {"status": 500}})
    resp = await pipe.client.request(request(f"chain-{pipe.kind}", providers=["cloudflare", "openai"]))
    assert resp.status == "error" and resp.error is not None
    assert resp.error.type == "all_providers_failed"
    assert [(a.provider, a.status_code) for a in resp.attempts] == [("cloudflare", 503)] * 3 + [("openai", 500)] * 3
    assert calls_by_provider(emu) == {"cloudflare": 3, "openai": 3}
    assert "6 attempts" in resp.error.message
