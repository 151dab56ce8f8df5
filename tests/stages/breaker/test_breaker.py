"""Circuit breaker: the pure state machine and the breaker/health stages' decisions, with a fake clock (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.client.health_board import HealthBoard
from pipeline.runtime.config import BreakerPolicy, config_from_mapping, preset
from pipeline.runtime.ownership import Ownership
from pipeline.runtime.runner import Emit, MessageContext
from schemas.events import CircuitSnapshot, CircuitTransition, Health
from stages.breaker.circuit_breaker import CircuitBreaker, Observation
from stages.breaker.stage import BreakerStage

POLICY = BreakerPolicy(
    failure_threshold=5,
    error_rate_threshold=0.5,
    window_s=60,
    min_requests=10,
    cool_off_s=30,
    max_cool_off_s=100,
    success_threshold=2,
)


def fail(at: float, error: str = "server_error", source: str = "attempt", **kw: Any) -> Observation:
    return Observation(ok=False, at_s=at, source=source, error_type=error, status_code=500, **kw)  # type: ignore[arg-type]


def ok(at: float, source: str = "attempt") -> Observation:
    return Observation(ok=True, at_s=at, source=source)  # type: ignore[arg-type]


def trip(cb: CircuitBreaker, at: float) -> None:
    for i in range(5):
        t = cb.observe(fail(at + i * 0.001), at + i * 0.001)
    assert t is not None and t.to_state == "OPEN"


def test_five_consecutive_counted_failures_open_it_and_a_success_resets_the_count() -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(4):
        assert cb.observe(fail(i), i) is None
    assert cb.observe(ok(4), 4) is None
    assert cb.consecutive_failures == 0
    for i in range(4):
        assert cb.observe(fail(5 + i), 5 + i) is None
    t = cb.observe(fail(9, "timeout"), 9)
    assert t is not None
    assert (t.from_state, t.to_state, t.cool_off_s, t.at_s) == ("CLOSED", "OPEN", 30, 9)
    assert t.reason == "5 consecutive failures (last: timeout (500))"
    assert cb.state == "OPEN" and cb.open_until_s == 39


@pytest.mark.parametrize("error", ["invalid_request", "model_not_found", "content_filter", "context_length_exceeded"])
def test_the_callers_errors_never_count(error: str) -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(50):
        assert cb.observe(fail(i, error), i) is None
    assert cb.state == "CLOSED" and cb.consecutive_failures == 0 and cb.error_rate(50) == (0.0, 0)


@pytest.mark.parametrize("error", ["server_error", "timeout", "rate_limit", "authentication"])
def test_every_counted_error_type_counts(error: str) -> None:
    cb = CircuitBreaker("p", POLICY)
    results = [cb.observe(fail(i, error), i) for i in range(5)]
    assert results[:4] == [None] * 4 and results[4] is not None


def test_error_rate_over_the_window_opens_it_only_with_min_requests() -> None:
    cb = CircuitBreaker("p", POLICY)
    # alternate ok, fail: never 5 in a row; rate 50% reached at the 10th call (min_requests)
    transitions = []
    for i in range(10):
        obs = fail(i) if i % 2 else ok(i)
        transitions.append(cb.observe(obs, i))
    assert transitions[:9] == [None] * 9
    t = transitions[9]
    assert t is not None and t.to_state == "OPEN"
    assert t.reason == "error rate 50% (5/10 calls in 60s) >= 50%"


def test_old_outcomes_leave_the_window() -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(4):
        cb.observe(fail(i), i)
        cb.observe(ok(i + 0.5), i + 0.5)
    assert cb.error_rate(30) == (0.5, 8)
    # at t=100 they are all older than the 60 s window
    assert cb.error_rate(100) == (0.0, 0)


def test_a_long_run_of_successes_keeps_only_the_windows_outcomes() -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(100_000):  # 100,000 successes, 100 a second: the 60 s window holds 6,000
        cb.observe(ok(i / 100), i / 100)
    assert len(cb._window) <= 6_001


def test_stale_and_pre_transition_outcomes_are_ignored() -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(5):
        assert cb.observe(fail(i), 1000) is None  # replayed history older than the window
    trip(cb, 2000)
    cb.tick(2100)
    assert cb.state == "HALF_OPEN"
    # a straggling attempt that ended before HALF_OPEN began, and user attempts in HALF_OPEN, do not count
    assert cb.observe(fail(2050, source="probe"), 2100) is None
    assert cb.observe(ok(2101, source="attempt"), 2101) is None
    assert cb.half_open_successes == 0 and cb.state == "HALF_OPEN"
    # a probe stamped by a clock a little behind the breaker's still counts
    assert cb.observe(ok(2099.5, source="probe"), 2100) is None
    assert cb.half_open_successes == 1


def test_open_half_open_closed_with_probes() -> None:
    cb = CircuitBreaker("p", POLICY, probe_deadline_s=20)
    trip(cb, 0)
    assert cb.tick(29.9) is None
    t = cb.tick(30.1)
    assert t is not None and (t.from_state, t.to_state) == ("OPEN", "HALF_OPEN")
    assert t.reason.startswith("cool-off of 30")
    assert cb.observe(ok(31, "probe"), 31) is None
    t = cb.observe(ok(32, "probe"), 32)
    assert t is not None and (t.from_state, t.to_state, t.reason) == ("HALF_OPEN", "CLOSED", "2 successful probes")
    assert cb.last_cool_off_s == 0


def test_failed_probe_reopens_with_a_doubled_capped_cool_off_and_closing_resets_it() -> None:
    cb = CircuitBreaker("p", POLICY, probe_deadline_s=20)
    trip(cb, 0)
    cool_offs = []
    now = 0.0
    for _ in range(4):
        now = cb.open_until_s
        assert cb.tick(now) is not None  # HALF_OPEN
        t = cb.observe(fail(now + 1, source="probe"), now + 1)
        assert t is not None and t.to_state == "OPEN" and t.reason == "probe failed: server_error (500)"
        cool_offs.append(t.cool_off_s)
    assert cool_offs == [60, 100, 100, 100]  # 30 doubled, capped at max_cool_off_s 100
    now = cb.open_until_s
    cb.tick(now)
    cb.observe(ok(now + 1, "probe"), now + 1)
    cb.observe(ok(now + 2, "probe"), now + 2)
    assert cb.state == "CLOSED"
    trip(cb, now + 10)
    assert cb.open_until_s == pytest.approx(now + 10.004 + 30)  # back to cool_off_s


def test_half_open_without_a_decisive_probe_result_reopens() -> None:
    cb = CircuitBreaker("p", POLICY, probe_deadline_s=20)
    trip(cb, 0)
    assert cb.tick(31) is not None
    # a probe refused for its own parameters is not decisive: it does not hold HALF_OPEN open
    assert cb.observe(fail(35, "model_not_found", source="probe"), 35) is None
    assert cb.tick(50.9) is None
    t = cb.tick(51)
    assert t is not None and (t.from_state, t.to_state, t.cool_off_s) == ("HALF_OPEN", "OPEN", 60)
    assert "no probe result within 20s" in t.reason


def test_retry_after_lengthens_a_cool_off_and_a_shorter_one_never_shortens_it() -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(4):
        cb.observe(fail(i, "rate_limit", retry_after_s=120), i)  # until 120..123
    t = cb.observe(fail(4, "rate_limit", retry_after_s=1), 4)
    assert t is not None and t.to_state == "OPEN"
    assert cb.open_until_s == 123 and t.cool_off_s == 119
    assert "Retry-After" in t.reason
    # while OPEN: a later, longer Retry-After lengthens it; a shorter one does not shorten it
    cb.observe(fail(10, "rate_limit", retry_after_s=200), 10)
    assert cb.open_until_s == 210
    cb.observe(fail(11, "rate_limit", retry_after_s=2), 11)
    assert cb.open_until_s == 210
    assert cb.tick(209) is None and cb.tick(210) is not None


def test_short_retry_after_does_not_shorten_the_computed_cool_off() -> None:
    cb = CircuitBreaker("p", POLICY)
    for i in range(5):
        t = cb.observe(fail(i, "rate_limit", retry_after_s=2), i)
    assert t is not None and t.cool_off_s == 30 and cb.open_until_s == 34


def test_restore_adopts_a_published_state() -> None:
    cb = CircuitBreaker("p", POLICY, probe_deadline_s=20)
    cb.restore("OPEN", 100, 60, 110)
    assert cb.state == "OPEN" and cb.open_until_s == 160
    assert cb.tick(159) is None and cb.tick(160) is not None
    t = cb.observe(fail(161, source="probe"), 161)
    assert t is not None and t.cool_off_s == 100  # 60 doubled, capped
    cb.restore("HALF_OPEN", 200, None, 205)
    assert cb.half_open_deadline_s == 225


def test_invalid_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="probe_deadline_s"):
        CircuitBreaker("p", POLICY, probe_deadline_s=0)


# --- the breaker stage's decisions (fake clock, no bus) --------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health(provider: str, at: float, ok: bool = False, source: str = "attempt", error: str = "server_error") -> Health:
    return Health(
        provider=provider,
        model="m",
        ok=ok,
        error_type=None if ok else error,
        status_code=200 if ok else 500,
        source=source,  # type: ignore[arg-type]
        at=datetime.fromtimestamp(at, UTC),
    )


def ctx(sent: list[Emit]) -> MessageContext:
    async def publish(out: Emit) -> None:
        sent.append(out)

    return MessageContext(record=Record("ai.control", 0, 0, b"p", b"{}"), stage="breaker", publish=publish)


def small_config() -> Any:
    return config_from_mapping(
        {"providers": {"openai": {"breaker": {"failure_threshold": 3, "cool_off_s": 5, "success_threshold": 1}}}},
        base=preset("development"),
    )


async def test_stage_publishes_transitions_in_order_and_snapshots_owned_providers() -> None:
    clock = FakeClock()
    stage = BreakerStage(Topics(), small_config(), clock=clock)
    sent: list[Emit] = []
    for _ in range(4):  # the 4th failure arrives while OPEN: ignored
        clock.now += 0.1
        assert await stage.handle(health("openai", clock.now), ctx(sent)) == []
    assert [(e.key, e.value.to_state) for e in sent] == [("openai", "OPEN")]
    opened: CircuitTransition = sent[0].value
    assert opened.cool_off_s == 5 and opened.reason.startswith("3 consecutive failures")
    clock.now += 5
    assert [t.to_state for t in await stage.tick()] == ["HALF_OPEN"]
    clock.now += 0.5
    await stage.handle(health("openai", clock.now, ok=True, source="probe"), ctx(sent))
    snap = await stage.snapshot()
    await stage._flush(ctx(sent).emit_now)
    assert [(e.key, getattr(e.value, "to_state", None)) for e in sent] == [
        ("openai", "OPEN"),
        ("openai", "HALF_OPEN"),
        ("openai", "CLOSED"),
        ("*", None),
    ]
    assert isinstance(snap, CircuitSnapshot)
    assert snap.states == {"cloudflare": "CLOSED", "openai": "CLOSED"}


async def test_a_new_owner_adopts_the_published_state_and_ignores_history_before_it() -> None:
    clock = FakeClock()
    stage = BreakerStage(Topics(), small_config(), clock=clock)
    opened_at = clock.now - 2
    # history: three failures, then the previous owner's transition
    stage.on_control(
        CircuitTransition(
            provider="openai",
            from_state="CLOSED",
            to_state="OPEN",
            reason="3 consecutive failures",
            cool_off_s=5,
            at=datetime.fromtimestamp(opened_at, UTC),
        )
    )
    sent: list[Emit] = []
    for i in range(3):
        await stage.handle(health("openai", opened_at - 1 + i * 0.1), ctx(sent))
    assert sent == [] and stage.machines["openai"].state == "OPEN"
    assert stage.machines["openai"].open_until_s == pytest.approx(opened_at + 5)
    clock.now = opened_at + 5
    assert [t.to_state for t in await stage.tick()] == ["HALF_OPEN"]


async def test_a_replica_that_owns_no_partition_decides_nothing() -> None:
    clock = FakeClock()
    stage = BreakerStage(Topics(), small_config(), clock=clock)

    class Runner:
        bus = None

        @staticmethod
        def assignment() -> frozenset[tuple[str, int]]:
            return frozenset()

    stage.bind_runner(Runner())
    stage.on_control(
        CircuitTransition(
            provider="openai",
            from_state="CLOSED",
            to_state="OPEN",
            reason="x",
            cool_off_s=1,
            at=datetime.fromtimestamp(clock.now - 10, UTC),
        )
    )
    assert await stage.tick() == [] and await stage.snapshot() is None


async def test_ownership_follows_the_partition_of_the_provider_key() -> None:
    class Bus:
        async def partition_for(self, topic: str, key: bytes) -> int:
            return {b"openai": 1, b"cloudflare": 4}[key]

    own = Ownership()
    held = frozenset({("ai.control", 1), ("ai.control", 2)})
    own.bind(Bus(), "ai.control", lambda: held)
    assert await own.owns("openai") and not await own.owns("cloudflare")
    assert await Ownership().owns("anything")  # unbound: one replica owns all


# --- health status fold ------------------------------------------------------------------------------


def test_health_board_folds_attempts_probes_and_circuits() -> None:
    clock = FakeClock()
    board = HealthBoard(preset("development"), window_s=60, clock=clock)
    t0 = clock.now - 30
    for i in range(3):
        event = health("openai", t0 + i, ok=True)
        board.apply(Health(**{**{f: getattr(event, f) for f in event.__struct_fields__}, "latency_ms": 10.0 * (i + 1)}))
    board.apply(health("openai", t0 + 3))  # server_error 500
    board.apply(health("openai", t0 + 4, error="invalid_request"))  # the caller's: not counted
    board.apply(health("cloudflare", clock.now - 120))  # outside the window
    (openai, cloudflare) = board.status(["openai", "cloudflare"])
    assert (openai.error_rate, openai.response_time_ms, openai.calls_in_window) == (0.25, 20.0, 4)
    assert openai.is_healthy and openai.circuit_breaker_state == "CLOSED"
    assert openai.last_error is not None and openai.last_error.startswith("server_error (HTTP 500) from attempt")
    assert openai.checked_at == datetime.fromtimestamp(t0 + 4, UTC)
    assert (cloudflare.error_rate, cloudflare.calls_in_window, cloudflare.is_healthy) == (0.0, 0, True)
    board.apply(
        CircuitTransition(
            provider="cloudflare",
            from_state="CLOSED",
            to_state="OPEN",
            reason="x",
            at=datetime.fromtimestamp(clock.now, UTC),
        )
    )
    cf = board.status_of("cloudflare")
    assert cf.circuit_breaker_state == "OPEN" and not cf.is_healthy
    assert [s.provider for s in board.status([])] == ["cloudflare", "openai"]


def test_control_values_a_version_does_not_know_are_skipped_and_garbage_is_dead_lettered() -> None:
    from pipeline.runtime.runner import InvalidInput
    from stages.health.stage import HealthStage

    stage = BreakerStage(Topics(), small_config())
    assert stage.decode(b'{"type": "from_the_future", "x": 1}') is None
    event = stage.decode(b'{"type": "cache_clear"}')
    assert event is not None and type(event).__name__ == "CacheClear"
    for bad in (b"not json", b'{"no_type": 1}', b'{"type": "health", "provider": 3}'):
        with pytest.raises(InvalidInput):
            stage.decode(bad)
    health_stage = HealthStage(Topics(), small_config(), {}, None)  # type: ignore[arg-type]
    assert health_stage.decode(b"not json") is None  # dead-lettered once, by the breaker's group


# --- the health stage's probes (fake adapters, no bus) -----------------------------------------------


class FakeAdapter:
    """An adapter whose answer is chosen by ``behaviour(call, timeout_s)``."""

    def __init__(self, behaviour: Any) -> None:
        self.name = "openai"
        self.calls: list[Any] = []
        self.behaviour = behaviour

    async def complete(self, client: Any, call: Any, timeout_s: float) -> Any:
        self.calls.append(call)
        return await self.behaviour(call, timeout_s)


async def answer_ok(call: Any, timeout_s: float) -> Any:
    from schemas.response import Usage
    from stages.providers import ProviderResult

    return ProviderResult(content="pong", model=call.model, usage=Usage(prompt_tokens=1, completion_tokens=1))


def health_config(**health: Any) -> Any:
    return config_from_mapping(
        {"providers": {"openai": {"breaker": {"success_threshold": 2}}}, "health": {"interval_s": 0, **health}},
        base=preset("development"),
    )


def transition(provider: str, src: str, dst: str, at: float) -> CircuitTransition:
    return CircuitTransition(
        provider=provider,
        from_state=src,
        to_state=dst,
        reason="t",
        at=datetime.fromtimestamp(at, UTC),  # type: ignore[arg-type]
    )


async def test_a_probe_is_one_cheap_call_and_a_refusal_for_its_parameters_is_not_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.errors import ModelNotFoundError
    from stages.health.stage import HealthStage

    async def refuse(call: Any, timeout_s: float) -> Any:
        raise ModelNotFoundError("no such model", provider="openai", status_code=404)

    sent: list[Emit] = []

    async def publish(out: Emit) -> None:
        sent.append(out)

    ok_adapter = FakeAdapter(answer_ok)
    stage = HealthStage(Topics(), health_config(), {"openai": ok_adapter}, None)  # type: ignore[arg-type,dict-item]
    event = await stage.probe("openai", publish)
    assert event is not None and event.ok and event.source == "probe" and event.request_id is None
    (call,) = ok_adapter.calls
    assert (call.model, call.max_tokens, call.temperature, len(call.messages)) == ("gpt-4o-mini", 1, 0.0, 1)
    stage.adapters = {"openai": FakeAdapter(refuse)}  # type: ignore[dict-item]
    with caplog.at_level("WARNING", logger="aipipe.health_stage"):
        refused = await stage.probe("openai", publish)
    assert refused is not None and (refused.ok, refused.error_type, refused.status_code) == (
        False,
        "model_not_found",
        404,
    )
    assert "refused for its own parameters" in caplog.text and "health.probe_models.openai" in caplog.text
    assert [(e.key, e.value.ok) for e in sent] == [("openai", True), ("openai", False)]
    board = HealthBoard(health_config())
    for e in sent:
        board.apply(e.value)
    assert board.status_of("openai").error_rate == 0.0 and board.status_of("openai").last_error is None


async def test_a_probe_that_never_finishes_is_a_timeout_failure() -> None:
    import anyio

    from stages.health.stage import PROBE_ABANDON_SLACK_S, HealthStage

    async def hang(call: Any, timeout_s: float) -> Any:
        await anyio.sleep_forever()

    sent: list[Emit] = []

    async def publish(out: Emit) -> None:
        sent.append(out)

    stage = HealthStage(Topics(), health_config(probe_timeout_ms=100), {"openai": FakeAdapter(hang)}, None)  # type: ignore[arg-type,dict-item]
    with anyio.fail_after(5):
        event = await stage.probe("openai", publish)
    assert event is not None and (event.ok, event.error_type) == (False, "timeout")
    assert 100 + PROBE_ABANDON_SLACK_S * 1000 <= event.latency_ms < 4000
    assert len(sent) == 1


async def test_half_open_provider_gets_exactly_the_probes_the_breaker_needs() -> None:
    import anyio

    from stages.health.stage import HealthStage

    adapter = FakeAdapter(answer_ok)
    stage = HealthStage(
        Topics(),
        health_config(half_open_interval_s=0.05),
        {"openai": adapter},
        None,
        tick_s=0.05,  # type: ignore[arg-type,dict-item]
    )
    sent: list[Emit] = []
    two = anyio.Event()

    async def publish(out: Emit) -> None:
        sent.append(out)
        if len(sent) == 2:
            two.set()

    now = datetime.now(UTC).timestamp()
    stage.on_control(transition("openai", "CLOSED", "OPEN", now - 2))
    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.background, publish)
        stage.on_control(transition("openai", "OPEN", "HALF_OPEN", now - 1))
        with anyio.fail_after(5):
            await two.wait()
            # two successes sent: the prober now waits for the breaker's verdict instead of probing on
            stage.on_control(transition("openai", "HALF_OPEN", "CLOSED", now))
            while "openai" in stage._busy:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert [(e.key, e.value.source, e.value.ok) for e in sent] == [("openai", "probe", True)] * 2
    assert len(adapter.calls) == 2
