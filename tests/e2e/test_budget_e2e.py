"""Budgets through the whole pipeline: a race for the last dollar (in process, then two gates sharing
Redis), durable spend across a restart on the same broker, alerts once per threshold, provider
budgets that move traffic, and the manager's reports and the `aipipe costs` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import msgspec
import pytest

from pipeline import AIProviderManager, BudgetExceededError, create_ai_provider_manager
from pipeline.assembly.build import PIPELINE_STAGES, Pipeline
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.memory import MemoryBus
from pipeline.bus.protocol import Bus
from pipeline.bus.topics import Topics
from pipeline.client.cost_book import CostBook
from pipeline.client.pipeline_client import PipelineClient
from pipeline.client.report_reader import ReportReader, publish_control
from pipeline.emulator import EmulatorServer
from pipeline.runtime.endpoints import resolve_endpoints
from pipeline.runtime.settings import Settings
from schemas import AIRequest, AIResponse, CostEvent, Usage
from schemas.events import BudgetAlert, BudgetStatus, SetBudget
from stages.budget.stage import BudgetGateStage
from tests.harness import fast_config
from tests.stages.budget.test_budget import RACE_PRICES

USER = "racer"
SCOPE = f"user:{USER}"


@dataclass
class Node:
    """One process's worth of stages: its bus, settings and pipeline."""

    bus: Bus
    settings: Settings
    pipeline: Pipeline

    def gate(self) -> BudgetGateStage:
        stage = self.pipeline.stages["budget"]
        assert isinstance(stage, BudgetGateStage)
        return stage

    def processed(self, stage: str) -> int:
        return next(r.processed for r in self.pipeline.runners if r.stage.name == stage)


@asynccontextmanager
async def node(
    kind: str,
    prefix: str,
    emulator: EmulatorServer,
    *,
    bootstrap: str | None = None,
    bus: Bus | None = None,
    stages: tuple[str, ...] = PIPELINE_STAGES,
    redis_url: str | None = None,
) -> AsyncIterator[Node]:
    """Stages on their own bus (Kafka) or on ``bus`` (memory), priced with ``RACE_PRICES``."""
    env = {"AIPIPE_TOPIC_PREFIX": prefix, "AIPIPE_EMULATE": "1"}
    if redis_url:
        env["AIPIPE_REDIS_URL"] = redis_url
    settings = Settings.from_env(env, env_name="production")
    async with AsyncExitStack() as stack:
        if bus is None:
            assert kind == "kafka" and bootstrap is not None
            bus = KafkaBus(bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
            await bus.start()
            stack.push_async_callback(bus.stop)
        resolved = resolve_endpoints(settings, fast_config(), emulator.url)
        pipeline = await stack.enter_async_context(Pipeline(settings, resolved, bus, stages=stages, prices=RACE_PRICES))
        yield Node(bus, settings, pipeline)


@asynccontextmanager
async def client_and_reader(bus: Bus, topics: Topics) -> AsyncIterator[tuple[PipelineClient, ReportReader]]:
    async with anyio.create_task_group() as tg:
        client = PipelineClient(bus, topics)
        reader = ReportReader(bus, topics)
        await tg.start(client.run)
        await tg.start(reader.run)
        yield client, reader
        client.stop()
        reader.stop()


def race_request(rid: str, user: str = USER) -> AIRequest:
    # gpt-4o-mini is priced $0 input / $5,000 output per million tokens here, and the emulator
    # answers exactly max_tokens=10 tokens: every request's worst case and real cost is $0.05.
    return msgspec.convert(
        {"id": rid, "model": "gpt-4o-mini", "prompt": f"question {rid}", "max_tokens": 10, "user": user},
        AIRequest,
    )


async def seed_budget(bus: Bus, topics: Topics, *, limit_usd: float, spent_usd: float, user: str = USER) -> None:
    """The user's daily budget on ai.control and earlier spend on ai.costs, as a running system would have."""
    now = datetime.now(UTC)
    await bus.ensure_topics(topics.all())
    await publish_control(bus, topics, SetBudget(scope=f"user:{user}", daily_usd=limit_usd, at=now))
    if spent_usd:
        earlier = CostEvent(
            id=f"earlier-{user}",
            user=user,
            provider="openai",
            model="gpt-4o-mini",
            usage=Usage(prompt_tokens=0, completion_tokens=180, total_tokens=180),
            cost_usd=spent_usd,
            at=now,
        )
        from pipeline.bus.protocol import Outgoing
        from pipeline.runtime.runner import encode

        await bus.publish(Outgoing(topics.costs, encode(earlier), key=earlier.id.encode()))


def gate_spent(scope: str, usd: float, *, after: datetime | None = None) -> Callable[[CostBook], bool]:
    """A ``wait_for`` predicate: a gate published ``scope``'s daily spend ``usd`` (at or after ``after``)."""

    def check(book: CostBook) -> bool:
        status = book.statuses.get(scope)
        if status is None or (after is not None and status.at < after):
            return False
        return abs(status.windows["daily"].spent_usd - usd) < 1e-9 and status.windows["daily"].reserved_usd == 0

    return check


async def read_control(
    bus: Bus, topics: Topics, until: Callable[[list[Any]], bool], timeout_s: float = 10
) -> list[Any]:
    """Every decodable event on ai.control, read from the beginning until ``until(events)`` (or timeout)."""
    decoder = msgspec.json.Decoder(BudgetAlert | BudgetStatus)
    consumer = await bus.consumer([topics.control], group=None, from_beginning=True)
    events: list[Any] = []
    try:
        with anyio.move_on_after(timeout_s):
            while True:
                for record in await consumer.getmany(100, max_records=1000):
                    try:
                        events.append(decoder.decode(record.value))
                    except msgspec.ValidationError:
                        continue
                if until(events):
                    break
    finally:
        await consumer.stop()
    return events


def alerts_of(events: list[Any], scope: str) -> list[tuple[str, int]]:
    return [(e.window, e.threshold_pct) for e in events if isinstance(e, BudgetAlert) and e.scope == scope]


async def race(client: PipelineClient, emu: EmulatorServer, tag: str) -> list[AIResponse]:
    """20 concurrent requests for the last $0.10; the emulator holds every call it receives until the
    gate has decided all 20 (18 answered budget_exceeded and 2 held at the provider), then lets them go."""
    emu.hold(1000, provider="openai")
    responses: list[AIResponse] = []
    changed = anyio.Event()

    async def one(i: int) -> None:
        nonlocal changed
        responses.append(await client.request(race_request(f"{tag}-{i}"), timeout_s=60))
        changed.set()
        changed = anyio.Event()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
            await emu.wait_for_calls(2, "openai", timeout_s=30)
            while len(responses) < 18:
                await changed.wait()
            assert emu.state.holding() == 2  # the pipeline took in all 20: 2 admitted and held, 18 refused
            assert emu.release() == 2
    return responses


def check_race(responses: list[AIResponse]) -> None:
    ok = [r for r in responses if r.status == "ok"]
    refused = [r for r in responses if r.status == "error"]
    assert len(responses) == 20
    assert len(ok) == 2 and all(r.cost_usd == 0.05 and r.provider == "openai" for r in ok)
    assert len(refused) == 18
    assert all(r.error is not None and r.error.type == "budget_exceeded" for r in refused)
    assert all(r.error is not None and "user:racer daily limit $1" in r.error.message for r in refused)
    assert 0.90 + sum(r.cost_usd for r in ok) <= 1.00 + 1e-12


async def test_race_for_the_last_dime_in_process() -> None:
    bus = MemoryBus()
    await bus.start()
    topics = Topics("race-mem.")
    await seed_budget(bus, topics, limit_usd=1.00, spent_usd=0.90)
    async with EmulatorServer() as emu, node("memory", topics.prefix, emu, bus=bus) as n:
        async with client_and_reader(bus, topics) as (client, reader):
            responses = await race(client, emu, "mem")
            check_race(responses)
            assert {p: c for p, c in emu.counts().items() if c} == {"openai": 2}
            assert await reader.wait_for(gate_spent(SCOPE, 1.00), 10)
            state = await n.gate().store.status(SCOPE, datetime.now(UTC))
            assert state["daily"].spent_usd == 1 and state["daily"].reserved_usd == 0
            await reader.sync()
            assert reader.book.budget_status(SCOPE, datetime.now(UTC)).daily.spent_usd == pytest.approx(1.00)
    events = await read_control(bus, topics, lambda ev: len(alerts_of(ev, SCOPE)) >= 3, timeout_s=5)
    assert alerts_of(events, SCOPE) == [("daily", 50), ("daily", 80), ("daily", 100)]
    await bus.stop()


@pytest.mark.kafka
@pytest.mark.redis
async def test_race_with_two_gate_replicas_sharing_redis(
    kafka_bootstrap: str, unflushed_redis_url: str, unique_prefix: str
) -> None:
    redis_url = unflushed_redis_url  # keys live under the unique prefix; other sessions flush database 15
    topics = Topics(unique_prefix)
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(EmulatorServer())
        a = await stack.enter_async_context(
            node("kafka", topics.prefix, emu, bootstrap=kafka_bootstrap, redis_url=redis_url)
        )
        await seed_budget(a.bus, topics, limit_usd=1.00, spent_usd=0.90)
        b = await stack.enter_async_context(
            node("kafka", topics.prefix, emu, bootstrap=kafka_bootstrap, redis_url=redis_url, stages=("budget",))
        )
        client, reader = await stack.enter_async_context(client_and_reader(a.bus, topics))
        assert type(a.gate().store).__name__ == type(b.gate().store).__name__ == "RedisBudgetStore"
        with anyio.fail_after(30):
            await a.gate().ready.wait()
            await b.gate().ready.wait()
        responses = await race(client, emu, "redis")
        check_race(responses)
        assert a.processed("budget") > 0 and b.processed("budget") > 0  # both replicas decided requests
        assert a.processed("budget") + b.processed("budget") >= 20
        assert await reader.wait_for(gate_spent(SCOPE, 1.00), 15)
        for gate in (a.gate(), b.gate()):
            state = await gate.store.status(SCOPE, datetime.now(UTC))
            assert state["daily"].spent_usd == 1 and state["daily"].reserved_usd == 0
        events = await read_control(a.bus, topics, lambda ev: len(alerts_of(ev, SCOPE)) >= 3)
    assert alerts_of(events, SCOPE) == [("daily", 50), ("daily", 80), ("daily", 100)]  # once, across replicas


def _cli_env(bootstrap: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPIPE_", "OPENAI_", "ANTHROPIC_", "CLOUDFLARE_"))}
    env.update({"AIPIPE_KAFKA_BOOTSTRAP": bootstrap, "AIPIPE_TOPIC_PREFIX": prefix, "LOG_LEVEL": "WARNING"})
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.kafka
async def test_spend_survives_a_restart_of_the_stages(kafka_bootstrap: str, unique_prefix: str) -> None:
    topics = Topics(unique_prefix)
    env = _cli_env(kafka_bootstrap, topics.prefix)
    # the budget is set with the CLI before any gate runs; it is applied when a gate reads ai.control
    done = await anyio.to_thread.run_sync(_cli, env, "budget", "set", "user:dur", "--daily", "0.20", "--wait-s", "0")
    assert done.returncode == 0, done.stderr
    assert "user:dur" in done.stdout and "$0.200000" in done.stdout
    manager = AIProviderManager(
        fast_config(), {**env, "AIPIPE_EMULATE": "1", "AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000"}, bus="kafka"
    )
    async with EmulatorServer() as emu, manager:
        assert manager.pipeline is None  # a client of the stages below
        async with node("kafka", topics.prefix, emu, bootstrap=kafka_bootstrap) as first:
            async with client_and_reader(first.bus, topics) as (client, reader):
                for i in range(3):
                    response = await client.request(race_request(f"dur-{i}", user="dur"))
                    assert response.status == "ok" and response.cost_usd == 0.05
                assert await reader.wait_for(gate_spent("user:dur", 0.15), 10)
        before = await manager.get_budget_status("user:dur")
        assert before.daily.spent_usd == pytest.approx(0.15) and before.daily.limit_usd == 0.20
        assert before.daily.percentage == pytest.approx(75.0)

        restarted_at = datetime.now(UTC)
        async with node("kafka", topics.prefix, emu, bootstrap=kafka_bootstrap) as second:
            async with client_and_reader(second.bus, topics) as (client, reader):
                # the restarted gate rebuilt its spend from ai.costs and says so on ai.control
                assert await reader.wait_for(gate_spent("user:dur", 0.15, after=restarted_at), 15)
                state = await second.gate().store.status("user:dur", datetime.now(UTC))
                assert state["daily"].spent_usd == Decimal("0.15")
                after = await manager.get_budget_status("user:dur")
                assert after.daily.spent_usd == before.daily.spent_usd
                # and enforces it: $0.05 of room is left, not $0.20
                assert (await client.request(race_request("dur-3", user="dur"))).status == "ok"
                refused = await client.request(race_request("dur-4", user="dur"))
                assert refused.error is not None and refused.error.type == "budget_exceeded"
                assert await reader.wait_for(gate_spent("user:dur", 0.20), 10)
            events = await read_control(second.bus, topics, lambda ev: len(alerts_of(ev, "user:dur")) >= 3)
        # 50 % once before the restart (not again after it), then 80 % and 100 %
        assert alerts_of(events, "user:dur") == [("daily", 50), ("daily", 80), ("daily", 100)]
        summary = await manager.get_cost_summary()
        assert summary["openai"].request_count == 4
        assert summary["openai"].total_cost_usd == pytest.approx(0.20)
    runs: dict[str, subprocess.CompletedProcess[str]] = {}

    async def cli(name: str, *args: str) -> None:
        runs[name] = await anyio.to_thread.run_sync(lambda: _cli(env, *args))

    async with anyio.create_task_group() as tg:  # three reporting commands at once
        tg.start_soon(cli, "json", "costs", "--json", "--days", "2")
        tg.start_soon(cli, "table", "costs")
        tg.start_soon(cli, "status", "budget", "status", "user:dur", "--json")
    result, table, status = runs["json"], runs["table"], runs["status"]
    assert result.returncode == table.returncode == status.returncode == 0, result.stderr + table.stderr
    report = json.loads(result.stdout)
    assert report["cost_summary"]["openai"]["request_count"] == 4
    dur = next(b for b in report["budgets"] if b["scope"] == "user:dur")
    assert dur["daily"]["spent_usd"] == pytest.approx(0.20) and dur["daily"]["limit_usd"] == 0.20
    assert report["top_users"][0]["user"] == "dur"
    assert report["daily_costs"][-1]["total_cost_usd"] == pytest.approx(0.20)
    assert "cost per provider" in table.stdout and "user:dur" in table.stdout
    [windows] = json.loads(status.stdout)
    assert windows["scope"] == "user:dur" and windows["daily"]["percentage"] == pytest.approx(100.0)


async def test_manager_budgets_and_reports_in_process() -> None:
    env = {"AIPIPE_EMULATE": "1", "AIPIPE_TOPIC_PREFIX": "mgr-costs."}
    async with create_ai_provider_manager("development", env) as manager:
        await manager.set_budget("user:mallory", daily=0)
        with pytest.raises(BudgetExceededError, match="user:mallory daily"):
            await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": "hi", "user": "mallory"})
        answers: dict[str, list[AIResponse]] = {"alice": [], "bob": []}
        for i, user in enumerate(("alice", "alice", "bob", "alice")):
            answers[user].append(
                await manager.generate_content(
                    {"model": "gpt-3.5-turbo", "prompt": f"reports question {i}", "max_tokens": 50, "user": user}
                )
            )
        hit = await manager.generate_content(
            {"model": "gpt-3.5-turbo", "prompt": "reports question 0", "max_tokens": 50, "user": "alice"}
        )
        assert hit.cached
        every = answers["alice"] + answers["bob"]
        summary = await manager.get_cost_summary()
        cf = summary["cloudflare"]
        assert cf.request_count == 4 and cf.cache_hits == 1
        assert cf.total_cost_usd == pytest.approx(sum(r.cost_usd for r in every), abs=1e-9)
        assert cf.total_tokens == sum(r.usage.total_tokens for r in every)
        assert cf.average_cost_per_token_usd == pytest.approx(cf.total_cost_usd / cf.total_tokens)
        assert cf.saved_usd == pytest.approx(answers["alice"][0].cost_usd)
        users = await manager.get_top_users(5)
        assert [u.user for u in users] == ["alice", "bob"]
        assert users[0].total_cost_usd == pytest.approx(sum(r.cost_usd for r in answers["alice"]), abs=1e-9)
        [model] = await manager.get_top_models(1)
        assert (model.provider, model.model, model.request_count) == ("cloudflare", "@cf/meta/llama-3.1-8b-instruct", 4)
        days = await manager.get_daily_costs(3)
        assert len(days) == 3 and days[-1].request_count == 4 and days[0].request_count == 0
        status = await manager.get_budget_status("user:alice")
        assert status.daily.spent_usd == pytest.approx(users[0].total_cost_usd) and status.daily.limit_usd is None
        glob = await manager.get_budget_status("global")
        assert glob.daily.limit_usd == 5.0  # the development preset's global daily budget, from the gate
        projection = await manager.get_cost_projection("global", 1)
        assert projection.daily >= glob.daily.spent_usd > 0 and projection.monthly >= projection.weekly
        # a spent provider budget moves traffic to the next provider
        pipeline = manager.pipeline
        assert pipeline is not None
        await manager.set_budget("cloudflare", {"daily": 0.0})
        with anyio.fail_after(5):
            while pipeline.provider_budgets.allows("cloudflare"):
                await anyio.sleep(0.01)
        moved = await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": "after", "user": "bob"})
        assert moved.provider == "openai"
        with pytest.raises(BudgetExceededError, match="cloudflare"):
            await manager.generate_content(
                {"model": "gpt-3.5-turbo", "prompt": "only cloudflare", "providers": ["cloudflare"]}
            )
        await manager.set_budget("cloudflare", daily=None)
        with anyio.fail_after(5):
            while not pipeline.provider_budgets.allows("cloudflare"):
                await anyio.sleep(0.01)
        with pytest.raises(ValueError, match="budget scope"):
            await manager.set_budget("gpt-4o", daily=1)
