"""Routing through the real broker: strategy switched by the CLI, RPM limits, limits shared via Redis (issue 5)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from pipeline.assembly.build import PIPELINE_STAGES, Pipeline
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.cli.strategy_commands import _show
from pipeline.client.pipeline_client import PipelineClient
from pipeline.client.strategy_control import publish_strategy, wait_applied
from pipeline.emulator import EmulatorServer
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.endpoints import resolve_endpoints
from pipeline.runtime.settings import Settings
from pipeline.stores.rate_limit_store import RedisRateLimiter
from schemas import AIRequest, AIResponse
from stages.rules.rate_limits import MemoryRateLimiter
from stages.rules.strategies import StrategySpec
from tests.conftest import in_own_task
from tests.harness import Harness, fast_config

pytestmark = pytest.mark.kafka

AIPIPE = [sys.executable, "-m", "pipeline.cli"]


class FakeClock:
    """Monotonic seconds that move only when told, so a minute of rate limiting takes no real minute."""

    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


def routing_config() -> PipelineConfig:
    """Production preset, fast retries, Cloudflare (priority 1) limited to 60 requests per minute."""
    return fast_config(
        providers={
            "cloudflare": {"retry": {"base_delay_ms": 5}, "rate_limit": {"requests_per_minute": 60}},
            "openai": {"retry": {"base_delay_ms": 5}, "rate_limit": {"requests_per_minute": 100_000}},
            "anthropic": {"retry": {"base_delay_ms": 5}, "rate_limit": {"requests_per_minute": 100_000}},
        }
    )


def kafka_bus(bootstrap: str) -> KafkaBus:
    return KafkaBus(bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))


@asynccontextmanager
async def routing_harness(prefix: str, bootstrap: str, clock: FakeClock) -> AsyncIterator[Harness]:
    settings = Settings.from_env({"AIPIPE_TOPIC_PREFIX": prefix, "AIPIPE_EMULATE": "1"}, env_name="production")
    bus = kafka_bus(bootstrap)
    await bus.start()
    try:
        async with EmulatorServer() as emulator:
            resolved = resolve_endpoints(settings, routing_config(), emulator.url)
            limiter = MemoryRateLimiter(clock=clock)
            async with (
                Pipeline(settings, resolved, bus, stages=PIPELINE_STAGES, rate_limiter=limiter) as pipeline,
                anyio.create_task_group() as tg,
            ):
                client = PipelineClient(bus, settings.topics)
                await tg.start(client.run)
                yield Harness("kafka", bus, settings.topics, client, emulator, pipeline, bootstrap)
                client.stop()
    finally:
        await bus.stop()


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
async def routed(kafka_bootstrap: str, clock: FakeClock) -> AsyncIterator[Harness]:
    prefix = f"route-{os.getpid()}-{id(clock) % 100_000}."
    async with in_own_task(lambda: routing_harness(prefix, kafka_bootstrap, clock)) as h:
        yield h


def req(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"routing question {rid}", "max_tokens": 32}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


async def burst(client: PipelineClient, ids: list[str]) -> dict[str, AIResponse]:
    out: dict[str, AIResponse] = {}

    async def one(rid: str) -> None:
        out[rid] = await client.request(req(rid))

    async with anyio.create_task_group() as tg:
        for rid in ids:
            tg.start_soon(one, rid)
    return out


async def cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = await anyio.run_process([*AIPIPE, *args], env=env, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def until(condition: Any, timeout_s: float = 15.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.02)


async def use_strategy(h: Harness, spec: StrategySpec) -> None:
    event = await publish_strategy(h.bus, h.topics, spec)
    assert await wait_applied(h.pipeline.strategy, event, timeout_s=15)


# --- strategy switched at run time by the CLI ------------------------------------------------------


async def test_strategy_set_by_the_cli_takes_effect_for_the_next_requests(routed: Harness) -> None:
    h = routed
    h.emulator.reset()
    before = await burst(h.client, [f"prio-{i}" for i in range(6)])
    assert {r.provider for r in before.values()} == {"cloudflare"}  # priority: lowest number first

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env.update(AIPIPE_KAFKA_BOOTSTRAP=h.bootstrap or "", AIPIPE_TOPIC_PREFIX=h.topics.prefix, LOG_LEVEL="WARNING")
    code, out, err = await cli(env, "strategy", "set", "round-robin")
    assert code == 0, err
    assert "strategy set: round_robin" in out
    await until(lambda: h.pipeline.strategy.name == "round_robin")

    h.emulator.reset()
    answers = await burst(h.client, [f"rr-{i}" for i in range(30)])
    assert all(r.status == "ok" for r in answers.values())
    assert Counter(r.provider for r in answers.values()) == {"cloudflare": 10, "openai": 10, "anthropic": 10}
    assert {k: v for k, v in h.emulator.counts().items() if v} == {"cloudflare": 10, "openai": 10, "anthropic": 10}

    code, _, err = await cli(env, "strategy", "set", "weighted", "--weights", "openai=1,anthropic=0,cloudflare=0")
    assert code == 0, err
    await until(lambda: h.pipeline.strategy.describe() == "weighted (openai=1, anthropic=0, cloudflare=0)")
    weighted = await burst(h.client, [f"w-{i}" for i in range(10)])
    assert {r.provider for r in weighted.values()} == {"openai"}

    code, out, err = await cli(env, "status")
    assert code == 0, err
    assert "load balancing: weighted (openai=1, anthropic=0, cloudflare=0)" in out

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            if key.startswith("AIPIPE_"):
                mp.setenv(key, value)
        mp.delenv("AIPIPE_CONFIG", raising=False)
        buf: list[str] = []
        mp.setattr("builtins.print", lambda *a, **k: buf.append(" ".join(map(str, a))))
        assert await _show(argparse.Namespace(json=True, timeout_s=10.0)) == 0
    assert json.loads(buf[-1]) == {"name": "weighted", "weights": {"openai": 1.0, "anthropic": 0.0, "cloudflare": 0.0}}


# --- 60 RPM ----------------------------------------------------------------------------------------


async def test_a_provider_limited_to_60_rpm_gets_at_most_60_in_a_minute_and_the_rest_go_elsewhere(
    routed: Harness, clock: FakeClock
) -> None:
    h = routed
    await use_strategy(h, StrategySpec("priority"))
    clock.t += 120  # a fresh minute for this test
    h.emulator.reset()
    answers = await burst(h.client, [f"rpm-{i}" for i in range(100)])  # one burst: well inside one minute
    assert all(r.status == "ok" for r in answers.values()), [r.error for r in answers.values() if r.error]
    by_provider = Counter(r.provider for r in answers.values())
    assert by_provider == {"cloudflare": 60, "openai": 40}
    assert h.emulator.counts().get("cloudflare") == 60
    # the ones cloudflare had no room for never called it: no attempt, no 429
    assert all([a.provider for a in r.attempts] == ["openai"] for r in answers.values() if r.provider == "openai")

    clock.t += 60  # the minute has passed: cloudflare takes traffic again
    h.emulator.reset()
    later = await burst(h.client, [f"rpm-later-{i}" for i in range(10)])
    assert {r.provider for r in later.values()} == {"cloudflare"}


# --- two router replicas share one provider's RPM through Redis ------------------------------------


class CountingAdapter:
    """Counts one replica's calls to a provider, passing them through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    async def complete(self, *args: Any) -> Any:
        self.calls += 1
        return await self.inner.complete(*args)


@pytest.mark.redis
async def test_two_router_replicas_together_respect_one_rpm_limit_through_redis(
    routed: Harness, kafka_bootstrap: str, unflushed_redis_url: str
) -> None:
    emulator = routed.emulator
    prefix = f"route-redis-{os.getpid()}-{id(emulator) % 100_000}."
    env = {"AIPIPE_TOPIC_PREFIX": prefix, "AIPIPE_EMULATE": "1", "AIPIPE_REDIS_URL": unflushed_redis_url}
    settings = Settings.from_env(env, env_name="production")
    resolved = resolve_endpoints(settings, routing_config(), emulator.url)
    bus_a, bus_b = kafka_bus(kafka_bootstrap), kafka_bus(kafka_bootstrap)
    await bus_a.start()
    await bus_b.start()
    try:
        async with (
            Pipeline(settings, resolved, bus_a, stages=PIPELINE_STAGES) as replica_a,
            # a second router + executor in the same consumer groups: Kafka splits the partitions
            Pipeline(settings, resolved, bus_b, stages=("router", "executor")) as replica_b,
            anyio.create_task_group() as tg,
        ):
            assert isinstance(replica_a.rate_limiter, RedisRateLimiter)
            assert isinstance(replica_b.rate_limiter, RedisRateLimiter)
            assert replica_a.rate_limiter is not replica_b.rate_limiter
            counters = []
            for replica in (replica_a, replica_b):
                executor: Any = replica.stages["executor"]
                counting = CountingAdapter(executor.adapters["cloudflare"])
                executor.adapters = {**executor.adapters, "cloudflare": counting}
                counters.append(counting)
            client = PipelineClient(bus_a, settings.topics)
            await tg.start(client.run)
            emulator.reset()
            answers = await burst(client, [f"redis-{i}" for i in range(100)])
            client.stop()
            assert all(r.status == "ok" for r in answers.values())
            by_provider = Counter(r.provider for r in answers.values())
            assert by_provider == {"cloudflare": 60, "openai": 40}
            assert emulator.counts().get("cloudflare") == 60
            # both replicas routed and called cloudflare; alone, each would have let all its ~50 through
            handled = [r.runners[[s.name for s in (x.stage for x in r.runners)].index("executor")].processed
                       for r in (replica_a, replica_b)]
            assert all(n > 0 for n in handled), handled
            assert all(c.calls > 0 for c in counters), [c.calls for c in counters]
            assert sum(c.calls for c in counters) == 60
            assert (await replica_a.rate_limiter.usage("cloudflare")).requests == 60
    finally:
        await bus_b.stop()
        await bus_a.stop()


# --- the manager's API -----------------------------------------------------------------------------


async def test_manager_set_load_balancing_strategy_switches_the_next_requests() -> None:
    from pipeline import LOAD_BALANCING_STRATEGIES, create_ai_provider_manager

    env = {"AIPIPE_EMULATE": "1", "AIPIPE_TOPIC_PREFIX": "mgr-strategy."}
    async with create_ai_provider_manager("development", env) as manager:
        await manager.set_load_balancing_strategy({"type": "round-robin"})
        providers = [
            (await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": f"rr {i}", "max_tokens": 16})).provider
            for i in range(4)
        ]
        assert providers == ["cloudflare", "openai", "cloudflare", "openai"]  # development: two providers
        await manager.set_load_balancing_strategy({"type": "weighted", "weights": {"openai": 1, "cloudflare": 0}})
        response = await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": "w", "max_tokens": 16})
        assert response.provider == "openai"
        await manager.set_load_balancing_strategy(LOAD_BALANCING_STRATEGIES["priority"])
        assert manager.pipeline is not None and manager.pipeline.strategy.name == "priority"
        with pytest.raises(ValueError, match="unknown strategy 'fastest'"):
            await manager.set_load_balancing_strategy("fastest")
