"""Circuit breaker and health monitor end to end: all seven stages, the emulator, both buses.

The sequence of events about a provider on ``ai.control`` is asserted exactly.
Timing is waited on (feed events, emulator calls), never slept on: the only
margins are the configured cool-offs (1 s, then 2 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import pytest
import pytest_asyncio

from pipeline import AIProviderManager
from pipeline.assembly.build import ALL_STAGES
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.protocol import Outgoing
from pipeline.bus.topics import Topics
from pipeline.emulator import EmulatorServer
from pipeline.runtime.config import PipelineConfig, config_from_mapping, preset
from pipeline.runtime.ownership import Ownership
from schemas import AIRequest, CircuitSnapshot, CircuitTransition, ControlEvent, Health
from tests.conftest import _RUN_ID, in_own_task
from tests.harness import FAST_RETRY, Harness, harness

pytestmark = pytest.mark.kafka

BREAKER = {"failure_threshold": 5, "min_requests": 50, "cool_off_s": 1, "max_cool_off_s": 4, "success_threshold": 2}


def circuit_config() -> PipelineConfig:
    providers: dict[str, Any] = {p: dict(FAST_RETRY) for p in ("openai", "anthropic", "cloudflare")}
    providers["cloudflare"] = {"retry": {"max_attempts": 1}, "breaker": BREAKER}
    return config_from_mapping(
        {
            "providers": providers,
            "health": {
                "interval_s": 0,
                "half_open_interval_s": 0.2,
                "probe_timeout_ms": 2000,
                "snapshot_interval_s": 1,
            },
        },
        base=preset("production"),
    )


@pytest_asyncio.fixture(scope="module", params=["memory", "kafka"])
async def cpipe(request: pytest.FixtureRequest, kafka_bootstrap: str) -> AsyncIterator[Harness]:
    """All seven stages (breaker and health included) with small breaker settings, on each bus."""
    kind = request.param
    prefix = f"circ-{kind}-{_RUN_ID}."
    bootstrap = kafka_bootstrap if kind == "kafka" else None
    factory = lambda: harness(kind, prefix, bootstrap=bootstrap, config=circuit_config(), stages=ALL_STAGES)  # noqa: E731
    async with in_own_task(factory) as h:
        yield h


class Watch:
    """Collects control events from the pipeline's broadcast feed and waits on them."""

    def __init__(self) -> None:
        self.events: list[ControlEvent] = []
        self._changed = anyio.Event()

    def __call__(self, event: ControlEvent) -> None:
        self.events.append(event)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def until(self, predicate: Callable[[list[ControlEvent]], bool], timeout_s: float = 10.0) -> None:
        with anyio.fail_after(timeout_s):
            while not predicate(self.events):
                await self._changed.wait()


def transitions(events: list[ControlEvent], provider: str) -> list[tuple[str, str]]:
    return [(e.from_state, e.to_state) for e in events if isinstance(e, CircuitTransition) and e.provider == provider]


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"circuit {rid}", "max_tokens": 32}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


def summary(event: ControlEvent) -> tuple[Any, ...]:
    if isinstance(event, Health):
        return ("health", event.source, event.ok, event.error_type, event.status_code)
    if isinstance(event, CircuitTransition):
        return ("circuit", event.from_state, event.to_state, event.cool_off_s)
    return (type(event).__name__,)


async def test_failing_provider_opens_is_skipped_half_opens_and_closes_after_probes(cpipe: Harness) -> None:
    h, emu = cpipe, cpipe.emulator
    emu.reset()
    watch = Watch()
    h.pipeline.control_feed.subscribe(watch)
    started = datetime.now(UTC)
    emu.faults.set("cloudflare", {"default": {"status": 500}})

    # five failures in a row (one cloudflare call per request), each answered by openai
    for i in range(5):
        resp = await h.client.request(request(f"trip-{h.kind}-{i}"))
        assert resp.status == "ok" and resp.provider == "openai"
        assert [(a.provider, a.status_code) for a in resp.attempts] == [("cloudflare", 500), ("openai", 200)]
    await watch.until(lambda ev: ("CLOSED", "OPEN") in transitions(ev, "cloudflare"))
    await watch.until(lambda _: h.pipeline.circuits.state("cloudflare") == "OPEN")

    # while OPEN, requests skip cloudflare without calling it
    skipped = await h.client.request(request(f"skip-{h.kind}"))
    # DESIGN A8: the open circuit is listed as a skip, with no call and no health event
    assert skipped.status == "ok" and [(a.provider, a.outcome) for a in skipped.attempts] == [
        ("cloudflare", "skipped"),
        ("openai", "ok"),
    ]
    assert skipped.attempts[0].reason == "circuit OPEN" and skipped.attempts[0].latency_ms == 0
    assert emu.counts()["cloudflare"] == 5

    # after the 1 s cool-off: HALF_OPEN, one probe, still failing -> OPEN again for 2 s
    await watch.until(lambda ev: ("HALF_OPEN", "OPEN") in transitions(ev, "cloudflare"))
    emu.faults.clear("cloudflare")  # the provider recovers during the second cool-off
    # after 2 s: HALF_OPEN, two successful probes, CLOSED
    await watch.until(lambda ev: ("HALF_OPEN", "CLOSED") in transitions(ev, "cloudflare"))
    await watch.until(lambda _: h.pipeline.circuits.state("cloudflare") == "CLOSED")
    back = await h.client.request(request(f"back-{h.kind}"))
    assert back.status == "ok" and back.provider == "cloudflare"

    def done(records: list[Any]) -> bool:
        return any(r.key == b"cloudflare" and back.id.encode() in r.value for r in records)

    records = await h.read_all(h.topics.control, until=done)
    decoded = [msgspec.json.decode(r.value, type=ControlEvent) for r in records if r.key == b"cloudflare"]
    mine = [e for e in decoded if e.at is not None and e.at >= started]
    assert [summary(e) for e in mine] == [
        *[("health", "attempt", False, "server_error", 500)] * 5,
        ("circuit", "CLOSED", "OPEN", 1.0),
        ("circuit", "OPEN", "HALF_OPEN", None),
        ("health", "probe", False, "server_error", 500),
        ("circuit", "HALF_OPEN", "OPEN", 2.0),
        ("circuit", "OPEN", "HALF_OPEN", None),
        ("health", "probe", True, None, 200),
        ("health", "probe", True, None, 200),
        ("circuit", "HALF_OPEN", "CLOSED", None),
        ("health", "attempt", True, None, 200),
    ]
    opened = [e for e in mine if isinstance(e, CircuitTransition)]
    assert opened[0].reason == "5 consecutive failures (last: server_error (500))"
    assert opened[2].reason == "probe failed: server_error (500)"
    assert opened[-1].reason == "2 successful probes"
    # the probes used the provider's cheapest model with one output token
    probes = [c for c in emu.calls("cloudflare") if c.max_tokens == 1]
    assert len(probes) == 3 and {c.model for c in probes} == {"@cf/meta/llama-3.1-8b-instruct"}
    # the breaker also publishes snapshots (keyed "*") of the circuits it owns
    snapshots = [
        e
        for e in (msgspec.json.decode(r.value, type=ControlEvent) for r in records if r.key == b"*")
        if isinstance(e, CircuitSnapshot)
    ]
    assert snapshots and set(snapshots[-1].states) >= {"cloudflare", "openai", "anthropic"}
    if h.kind == "kafka":
        await check_status_and_tail_from_the_command_line(h)


async def check_status_and_tail_from_the_command_line(cpipe: Harness) -> None:
    """`aipipe status --json` and `aipipe tail control` in their own processes, after the circuit test."""
    assert cpipe.bootstrap is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env.update(AIPIPE_KAFKA_BOOTSTRAP=cpipe.bootstrap, AIPIPE_TOPIC_PREFIX=cpipe.topics.prefix, AIPIPE_ENV="production")
    resp = await cpipe.client.request(request(f"cli-{time.time_ns()}"))
    assert resp.status == "ok"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=60
        )

    count = len(await cpipe.read_all(cpipe.topics.control))
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    async def cli(name: str, *args: str) -> None:
        results[name] = await anyio.to_thread.run_sync(run, *args)

    async with anyio.create_task_group() as tg:  # two processes at once: each spends ~2 s importing
        tg.start_soon(cli, "status", "status", "--json")
        tg.start_soon(cli, "tail", "tail", "control", "--from-beginning", "--limit", str(count))
    status, tail = results["status"], results["tail"]
    assert status.returncode == 0, status.stderr
    rows = {row["provider"]: row for row in msgspec.json.decode(status.stdout)}
    assert set(rows) >= {"cloudflare", "openai", "anthropic"}
    assert rows["cloudflare"]["circuit_breaker_state"] == "CLOSED" and rows["cloudflare"]["checked_at"]
    assert rows["openai"]["is_healthy"] is True and rows["openai"]["response_time_ms"] > 0
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert any("circuit  cloudflare: CLOSED -> OPEN (5 consecutive failures" in line for line in lines), lines[:20]
    assert any("health   cloudflare/@cf/meta/llama-3.1-8b-instruct ok" in line and "(probe)" in line for line in lines)


async def test_manager_health_status_and_test_provider() -> None:
    config = config_from_mapping(
        {"providers": {"openai": {"retry": {"max_attempts": 1}}, "cloudflare": {"retry": {"max_attempts": 1}}}},
        base=preset("development"),
    )
    async with EmulatorServer() as emu:
        emu.faults.set("cloudflare", {"default": {"status": 503}})
        env = {"AIPIPE_EMULATE": "1", "AIPIPE_EMULATOR_URL": emu.url, "AIPIPE_TOPIC_PREFIX": "mgrh."}
        async with AIProviderManager(config, env) as manager:
            for i in range(3):
                await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": f"q{i}", "max_tokens": 10})
            statuses = {s.provider: s for s in await manager.get_health_status()}
            assert list(statuses) == ["cloudflare", "openai"]  # the enabled providers, in configuration order
            cf, oa = statuses["cloudflare"], statuses["openai"]
            assert (cf.error_rate, cf.calls_in_window, cf.is_healthy) == (1.0, 3, False)
            assert cf.circuit_breaker_state == "CLOSED" and cf.last_error is not None
            assert cf.last_error.startswith("server_error (HTTP 503) from attempt")
            assert (oa.error_rate, oa.calls_in_window, oa.is_healthy, oa.last_error) == (0.0, 3, True, None)
            assert oa.response_time_ms > 0 and oa.checked_at is not None
            assert await manager.test_provider("openai") is True
            assert await manager.test_provider("cloudflare") is False
            assert await manager.test_provider("anthropic") is False  # disabled in development
            with pytest.raises(ValueError, match="unknown provider"):
                await manager.test_provider("mistral")
        calls = emu.calls("openai")
        assert calls[-1].max_tokens == 8 and calls[-1].model == "gpt-4o-mini"


async def test_each_provider_has_exactly_one_owner_in_a_group(kafka_bootstrap: str, unique_prefix: str) -> None:
    topics = Topics(unique_prefix)
    bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
    await bus.start()
    members: list[Any] = []
    try:
        await bus.ensure_topics([topics.control])
        providers = ["openai", "anthropic", "cloudflare", "p4", "p5", "p6", "p7", "p8"]
        # the partition partition_for names is the one a keyed record lands on
        for p in providers:
            await bus.publish(Outgoing(topics.control, b"{}", key=p.encode()))
        reader = await bus.consumer([topics.control], group=None)
        landed: dict[str, int] = {}
        with anyio.fail_after(10):
            while len(landed) < len(providers):
                for r in await reader.getmany(100, max_records=100):
                    landed[(r.key or b"").decode()] = r.partition
        await reader.stop()
        assert landed == {p: await bus.partition_for(topics.control, p.encode()) for p in providers}
        # two members of one group split the partitions; each provider has exactly one owner
        group = f"{unique_prefix}owners"
        members = [await bus.consumer([topics.control], group=group) for _ in range(2)]
        with anyio.fail_after(20):
            while True:
                for m in members:
                    await m.getmany(50, max_records=100)
                a, b = (m.assignment() for m in members)
                if a and b and not a & b and len(a | b) == bus.settings.partitions:
                    break
        owners = []
        for m in members:
            own = Ownership()
            own.bind(bus, topics.control, m.assignment)
            owners.append(own)
        for p in providers:
            assert [await o.owns(p) for o in owners].count(True) == 1, p
    finally:
        for m in members:
            await m.stop()
        await bus.stop()
