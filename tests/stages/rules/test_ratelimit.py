"""Per-provider RPM/TPM limits: the pure sliding window, Redis sharing, and the executor's charging (issue 5)."""

from __future__ import annotations

import math
import random
import secrets
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.errors import ProviderServerError, ProviderTimeoutError
from pipeline.runtime.config import RateLimit, config_from_mapping, preset
from pipeline.runtime.messages import now_ms
from pipeline.runtime.runner import MessageContext
from pipeline.stores.rate_limit_store import RedisRateLimiter
from schemas.envelope import Candidate, Envelope
from schemas.request import AIRequest
from schemas.response import Usage
from stages.executor.stage import ExecutorStage
from stages.providers import ProviderCall, ProviderResult
from stages.rules.rate_limits import MemoryRateLimiter, SlidingWindowLimiter, admit, call_not_sent

RPM60 = RateLimit(requests_per_minute=60)


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def max_in_any_window(times: list[float], window_s: float = 60.0) -> int:
    """The most calls in any span of ``window_s`` seconds (two-pointer over sorted times)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# --- the pure sliding window --------------------------------------------------------------------


def test_sixty_rpm_admits_sixty_then_says_when_room_comes_back() -> None:
    clock = FakeClock()
    lim = SlidingWindowLimiter(clock=clock)
    for i in range(60):
        assert lim.acquire("openai", RPM60, 10, f"c{i}") == 0.0
        clock.advance(0.5)  # 60 calls over 30 s
    wait = lim.acquire("openai", RPM60, 10, "c60")
    assert wait == pytest.approx(30.0)  # the first call (t=0) leaves the window at t=60; now t=30
    assert lim.usage("openai").requests == 60
    assert lim.wait_s("openai", RPM60, 10) == pytest.approx(30.0)  # checking charges nothing
    clock.advance(wait)
    assert lim.acquire("openai", RPM60, 10, "c60") == 0.0
    assert lim.acquire("anthropic", RPM60, 10, "other") == 0.0  # one window per provider


def test_no_sixty_second_span_ever_holds_more_than_the_limit() -> None:
    clock = FakeClock()
    lim = SlidingWindowLimiter(clock=clock)
    rng = random.Random(4)
    admitted: list[float] = []
    for i in range(5_000):  # about 2.3 requests/s offered for 36 minutes, in bursts
        clock.advance(rng.expovariate(2.3) if rng.random() < 0.9 else 0.0)
        if lim.acquire("p", RPM60, 1, f"c{i}") == 0.0:
            admitted.append(clock())
    assert max_in_any_window(admitted) == 60
    minutes = (admitted[-1] - admitted[0]) / 60
    assert len(admitted) >= 0.95 * 60 * minutes  # and it does not under-admit either


def test_a_token_bucket_would_let_twice_the_limit_through_but_the_window_does_not() -> None:
    clock = FakeClock()
    lim = SlidingWindowLimiter(clock=clock)
    admitted = []
    for i in range(200):  # a full burst, then one call per second
        if lim.acquire("p", RPM60, 1, f"c{i}") == 0.0:
            admitted.append(clock())
        if i >= 60:
            clock.advance(1.0)
    assert max_in_any_window(admitted) <= 60


def test_tokens_per_minute_with_correction_and_refund() -> None:
    clock = FakeClock()
    lim = SlidingWindowLimiter(clock=clock)
    tpm = RateLimit(tokens_per_minute=1_000)
    assert lim.acquire("p", tpm, 600, "a") == 0.0  # estimate: prompt + max_tokens
    clock.advance(10)
    assert lim.acquire("p", tpm, 600, "b") == pytest.approx(50.0)  # room when "a" leaves, at t=60
    lim.settle("p", "a", 150)  # the answer used 150 tokens
    assert lim.usage("p").tokens == 150
    assert lim.acquire("p", tpm, 600, "b") == 0.0
    lim.release("p", "b")  # never sent: quota back
    assert lim.usage("p").tokens == 150 and lim.usage("p").requests == 1
    assert lim.wait_s("p", tpm, 1_001) == math.inf  # can never fit
    clock.advance(50)
    assert lim.usage("p").tokens == 0 and lim.usage("p").requests == 0


def test_call_not_sent_only_for_connections_never_made() -> None:
    def chained(outer: Exception, inner: BaseException) -> Exception:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise outer from exc
        except Exception as err:
            return err

    refused = chained(ProviderTimeoutError("could not connect"), ConnectionRefusedError(111, "refused"))
    assert call_not_sent(refused)
    assert call_not_sent(chained(ProviderTimeoutError("x"), httpx.ConnectError("no route")))
    assert not call_not_sent(chained(ProviderTimeoutError("x"), TimeoutError()))
    assert not call_not_sent(ProviderServerError("HTTP 500", status_code=500))
    assert call_not_sent(ValueError("bad payload"))  # failed before any HTTP


async def test_admit_charges_and_settles() -> None:
    lim = MemoryRateLimiter()
    limit = RateLimit(requests_per_minute=2, tokens_per_minute=10_000)
    charge = await admit(lim, "openai", limit, prompt_tokens=100, max_tokens=500)
    assert charge.admitted and (await lim.usage("openai")).tokens == 600
    await charge.settle_answer(Usage(prompt_tokens=100, completion_tokens=20, total_tokens=120))
    assert (await lim.usage("openai")).tokens == 120
    failed = await admit(lim, "openai", limit, prompt_tokens=100, max_tokens=500)
    await failed.settle_failure(ProviderServerError("HTTP 500", status_code=500))
    assert await lim.usage("openai") == type(await lim.usage("openai"))(requests=2, tokens=220)
    refused = await admit(lim, "openai", limit, prompt_tokens=100, max_tokens=500)
    assert not refused.admitted and refused.wait_s > 0
    unlimited = await admit(lim, "anthropic", RateLimit(), prompt_tokens=1, max_tokens=1)
    assert unlimited.admitted and unlimited.call_id is None


# --- Redis: one window for every replica ------------------------------------------------------


@pytest.fixture
def redis_limiters(unflushed_redis_url: str) -> Iterator[Any]:
    namespace = f"test-rl-{secrets.token_hex(4)}:"
    clock = FakeClock(time.time())

    def make(**kw: Any) -> RedisRateLimiter:
        return RedisRateLimiter.from_url(unflushed_redis_url, namespace=namespace, clock=kw.pop("clock", clock), **kw)

    make.clock = clock  # type: ignore[attr-defined]
    yield make


@pytest.mark.redis
async def test_redis_window_matches_the_in_process_one(redis_limiters: Any) -> None:
    lim = redis_limiters()
    clock = redis_limiters.clock
    try:
        for i in range(60):
            assert await lim.acquire("openai", RPM60, 10, f"c{i}") == 0.0
            clock.advance(0.5)
        assert await lim.acquire("openai", RPM60, 10, "c60") == pytest.approx(30.0, abs=0.002)
        assert await lim.wait_s("openai", RPM60, 10) == pytest.approx(30.0, abs=0.002)
        assert (await lim.usage("openai")).requests == 60
        clock.advance(30.0)
        assert await lim.acquire("openai", RPM60, 10, "c60") == 0.0
        tpm = RateLimit(tokens_per_minute=1_000)
        assert await lim.acquire("anthropic", tpm, 600, "a") == 0.0
        clock.advance(10)
        assert await lim.acquire("anthropic", tpm, 600, "b") == pytest.approx(50.0, abs=0.002)
        await lim.settle("anthropic", "a", 150)
        assert await lim.acquire("anthropic", tpm, 600, "b") == 0.0
        await lim.release("anthropic", "b")
        assert await lim.usage("anthropic") == type(await lim.usage("anthropic"))(requests=1, tokens=150)
        assert await lim.wait_s("anthropic", tpm, 1_001) == math.inf
    finally:
        await lim.aclose()


@pytest.mark.redis
async def test_two_replicas_racing_on_redis_admit_exactly_the_limit(redis_limiters: Any) -> None:
    a, b = redis_limiters(clock=time.time), redis_limiters(clock=time.time)
    granted: list[str] = []

    async def take(lim: RedisRateLimiter, i: int) -> None:
        if await lim.acquire("cloudflare", RPM60, 50, f"call-{i}") == 0.0:
            granted.append(f"call-{i}")

    try:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(take, a if i % 2 else b, i)
        assert len(granted) == 60
        assert (await a.usage("cloudflare")).requests == 60
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_falls_back_to_in_process_limits() -> None:
    lim = RedisRateLimiter.from_url("redis://127.0.0.1:1/0", namespace="down:")
    try:
        limit = RateLimit(requests_per_minute=2)
        assert [await lim.acquire("openai", limit, 1, f"c{i}") for i in range(2)] == [0.0, 0.0]
        assert await lim.acquire("openai", limit, 1, "c2") > 0
    finally:
        await lim.aclose()


# --- the executor charges every HTTP call -----------------------------------------------------


class FakeAdapter:
    """Answers from a script: an exception to raise or a usage to return, per call."""

    def __init__(self, name: str, script: list[Any] | None = None) -> None:
        self.name = name
        self.script = list(script or [])
        self.calls = 0

    async def complete(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> ProviderResult:
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        usage = step or Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
        return ProviderResult(content=f"from {self.name}", model=call.model, usage=usage)


def _executor(limits: dict[str, dict[str, int]], adapters: dict[str, FakeAdapter], limiter: Any) -> ExecutorStage:
    cfg = config_from_mapping(
        {
            "providers": {
                name: {"rate_limit": lim, "retry": {"base_delay_ms": 1, "max_delay_ms": 5}}
                for name, lim in limits.items()
            }
        },
        base=preset("production"),
    )
    return ExecutorStage(Topics("t."), cfg, adapters, None, rate_limiter=limiter)  # type: ignore[arg-type]


def _envelope(rid: str, providers: list[str], *, timeout_ms: int = 10_000) -> Envelope:
    models = {"cloudflare": "@cf/meta/llama-3.1-8b-instruct", "openai": "gpt-3.5-turbo", "anthropic": "claude"}
    request = msgspec.convert({"id": rid, "model": "gpt-3.5-turbo", "prompt": "hi", "max_tokens": 100}, AIRequest)
    start = now_ms()
    return Envelope(
        id=rid,
        request=request,
        received_at_ms=start,
        deadline_at_ms=start + timeout_ms,
        candidates=[Candidate(provider=p, model=models[p]) for p in providers],
    )


CTX = MessageContext(record=Record(topic="t", partition=0, offset=0, key=None, value=b""), stage="executor")


async def test_saturated_provider_is_skipped_for_the_next_candidate_without_an_attempt() -> None:
    adapters = {"cloudflare": FakeAdapter("cloudflare"), "openai": FakeAdapter("openai")}
    limiter = MemoryRateLimiter()
    ex = _executor({"cloudflare": {"requests_per_minute": 2}}, adapters, limiter)
    providers = [(await ex.execute(_envelope(f"r{i}", ["cloudflare", "openai"]), CTX)).provider for i in range(5)]
    assert providers == ["cloudflare", "cloudflare", "openai", "openai", "openai"]
    assert adapters["cloudflare"].calls == 2
    third = await ex.execute(_envelope("r5", ["cloudflare", "openai"]), CTX)
    assert [a.provider for a in third.attempts] == ["openai"]


async def test_retries_and_fallbacks_are_each_charged_and_usage_corrects_tokens() -> None:
    adapters = {
        "cloudflare": FakeAdapter("cloudflare", [ProviderServerError("HTTP 500", status_code=500)] * 3),
        "openai": FakeAdapter("openai", [Usage(prompt_tokens=8, completion_tokens=30, total_tokens=38)]),
    }
    limiter = MemoryRateLimiter()
    ex = _executor({p: {"requests_per_minute": 100, "tokens_per_minute": 100_000} for p in adapters}, adapters, limiter)
    outcome = await ex.execute(_envelope("r", ["cloudflare", "openai"]), CTX)
    assert outcome.status == "ok" and len(outcome.attempts) == 4
    cf, oa = await limiter.usage("cloudflare"), await limiter.usage("openai")
    assert cf.requests == 3 and oa.requests == 1
    prompt_estimate = cf.tokens // 3
    assert 0 < prompt_estimate < 100  # failed calls keep only the prompt estimate, not max_tokens
    assert oa.tokens == 38  # corrected to the answer's real usage


async def test_a_call_that_never_left_gives_its_quota_back() -> None:
    def refused() -> ProviderTimeoutError:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            err = ProviderTimeoutError("cloudflare: could not connect")
            err.__cause__ = exc
            return err

    adapters = {
        "cloudflare": FakeAdapter("cloudflare", [refused(), refused(), refused()]),
        "openai": FakeAdapter("openai"),
    }
    limiter = MemoryRateLimiter()
    ex = _executor({"cloudflare": {"requests_per_minute": 5}}, adapters, limiter)
    outcome = await ex.execute(_envelope("r", ["cloudflare", "openai"]), CTX)
    assert outcome.provider == "openai" and adapters["cloudflare"].calls == 3
    assert (await limiter.usage("cloudflare")).requests == 0


async def test_when_every_candidate_is_saturated_the_request_waits_for_room() -> None:
    adapters = {"cloudflare": FakeAdapter("cloudflare"), "openai": FakeAdapter("openai")}
    limiter = MemoryRateLimiter(window_s=0.4)  # "per minute" shrunk to 0.4 s so the wait is short
    ex = _executor({p: {"requests_per_minute": 1} for p in adapters}, adapters, limiter)
    first = await ex.execute(_envelope("a", ["cloudflare", "openai"]), CTX)
    second = await ex.execute(_envelope("b", ["cloudflare", "openai"]), CTX)
    started = time.monotonic()
    third = await ex.execute(_envelope("c", ["cloudflare", "openai"]), CTX)
    waited = time.monotonic() - started
    assert [first.provider, second.provider, third.provider] == ["cloudflare", "openai", "cloudflare"]
    assert third.status == "ok" and waited >= 0.3  # waited for cloudflare's call to leave the window


async def test_no_room_within_the_deadline_is_a_rate_limit_error_at_once() -> None:
    adapters = {"cloudflare": FakeAdapter("cloudflare")}
    ex = _executor({"cloudflare": {"requests_per_minute": 1}}, adapters, MemoryRateLimiter())
    assert (await ex.execute(_envelope("a", ["cloudflare"]), CTX)).status == "ok"
    started = time.monotonic()
    outcome = await ex.execute(_envelope("b", ["cloudflare"], timeout_ms=5_000), CTX)
    assert time.monotonic() - started < 1.0  # room is 60 s away: no point waiting 5 s
    assert outcome.status == "error" and outcome.error is not None
    assert outcome.error.type == "rate_limit" and outcome.attempts == []
    assert "cloudflare (1 requests/min" in outcome.error.message


# --- the router: strategy order, room check, allow-list -------------------------------------------


def _router(limits: dict[str, dict[str, int]], spec: Any, limiter: Any) -> Any:
    from stages.router.stage import RouterStage
    from stages.rules.strategies import StrategyState

    cfg = config_from_mapping({"providers": {p: {"rate_limit": lim} for p, lim in limits.items()}},
                              base=preset("production"))
    return RouterStage(Topics("t."), cfg, strategy=StrategyState(spec, providers=cfg.providers),
                       rate_limiter=limiter)


def _route_envelope(rid: str, **kw: Any) -> Envelope:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": "hi", "max_tokens": 100}
    data.update(kw)
    start = now_ms()
    return Envelope(id=rid, request=msgspec.convert(data, AIRequest), received_at_ms=start,
                    deadline_at_ms=start + 10_000)


async def test_router_leaves_saturated_providers_out_unless_all_are() -> None:
    from stages.rules.strategies import StrategySpec

    limiter = MemoryRateLimiter()
    router = _router({"cloudflare": {"requests_per_minute": 1}, "openai": {"requests_per_minute": 1}},
                     StrategySpec("priority"), limiter)
    [out] = await router.handle(_route_envelope("a"), CTX)
    assert [c.provider for c in out.value.candidates] == ["cloudflare", "openai", "anthropic"]
    await limiter.acquire("cloudflare", RateLimit(requests_per_minute=1), 1, "x")  # the executor's charge
    [out] = await router.handle(_route_envelope("b"), CTX)
    assert [c.provider for c in out.value.candidates] == ["openai", "anthropic"]
    # every candidate saturated: all go on, in strategy order, and the executor waits for room
    await limiter.acquire("openai", RateLimit(requests_per_minute=1), 1, "y")
    [out] = await router.handle(_route_envelope("c", providers=["openai", "cloudflare"]), CTX)
    assert [c.provider for c in out.value.candidates] == ["openai", "cloudflare"]  # the allow-list's order


async def test_router_answers_when_no_candidate_can_ever_fit_or_all_weights_are_zero() -> None:
    from stages.rules.strategies import StrategySpec

    tiny = {p: {"tokens_per_minute": 50} for p in ("cloudflare", "openai", "anthropic")}
    router = _router(tiny, StrategySpec("priority"), MemoryRateLimiter())
    [out] = await router.handle(_route_envelope("big", max_tokens=100), CTX)
    assert out.value.outcome.error.type == "invalid_request"
    message = out.value.outcome.error.message
    assert "needs about 108 tokens" in message and "cloudflare (300 requests/min, 50 tokens/min)" in message

    zero = StrategySpec("weighted", {"cloudflare": 0.0, "openai": 0.0, "anthropic": 0.0, "x": 1.0})
    router = _router({}, zero, MemoryRateLimiter())
    [out] = await router.handle(_route_envelope("w"), CTX)
    assert out.value.outcome.error.type == "all_providers_failed" and "weight 0" in out.value.outcome.error.message
