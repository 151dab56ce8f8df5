"""Scale-out with real processes: every stage its own OS process, one broker, one emulator, Redis.

Two executor and two router replicas share their consumer groups; 1,000 requests go in; one
executor replica is killed with SIGKILL half way, while it holds provider calls in flight. Every
request is still answered, with exactly one cost event per answered id, and the logs of the
processes show both executor replicas held partitions before the kill and the survivor took the
dead one's partitions after it. The proof comes from each process's own log lines ("assigned
partitions [...] in group G"), not from group-describe calls.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition as KafkaTopicPartition
from confluent_kafka import Producer

from pipeline.assembly.build import ALL_STAGES
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.emulator import EmulatorServer, parse_profile
from schemas.events import CostEvent
from schemas.response import AIResponse

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.timeout(170)]

AIPIPE = [sys.executable, "-m", "pipeline.cli"]
REQUESTS = 1000
HALF = REQUESTS // 2
#: Not the default (6) and not the embedded broker's auto-create count (4): the assignments in the
#: logs prove ``AIPIPE_KAFKA_PARTITIONS`` is honoured.
PARTITIONS = 8
REPLICAS = {"router": 2, "executor": 2}
EMULATOR_LATENCY_MS = 20
#: The stages whose consumer groups carry requests, with their input topic (short name).
PIPELINE_GROUPS = {
    "cache": "requests",
    "budget": "stage_budget",
    "router": "stage_route",
    "executor": "stage_execute",
    "recorder": "stage_record",
}
_ASSIGNED = re.compile(r"assigned partitions \[([^\]]*)\] in group ([^\"\s]+)")
_REQUEST_ID = re.compile(r"(so-\d{4})")

T = TypeVar("T")

CONFIG_TOML = """
# Limits far above the test's load, fast retries: this test is about processes, not limits.
[providers.cloudflare]
rate_limit = { requests_per_minute = 1000000, tokens_per_minute = 1000000000 }
retry = { base_delay_ms = 5, max_delay_ms = 200 }
[providers.openai]
rate_limit = { requests_per_minute = 1000000, tokens_per_minute = 1000000000 }
retry = { base_delay_ms = 5, max_delay_ms = 200 }
[providers.anthropic]
rate_limit = { requests_per_minute = 1000000, tokens_per_minute = 1000000000 }
retry = { base_delay_ms = 5, max_delay_ms = 200 }
"""


# --------------------------------------------------------------------------- processes


@dataclass
class StageProcess:
    """One ``aipipe run --stage NAME`` OS process and its log file."""

    stage: str
    replica: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.replica}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def assignments(self, group: str) -> list[frozenset[tuple[str, int]]]:
        """Every assignment this process logged for ``group``, oldest first."""
        found: list[frozenset[tuple[str, int]]] = []
        for match in _ASSIGNED.finditer(self.log()):
            if match.group(2) != group:
                continue
            items = [item.strip() for item in match.group(1).split(",") if item.strip()]
            found.append(frozenset((topic, int(part)) for topic, _, part in (i.rpartition(":") for i in items)))
        return found

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} (pid {self.proc.pid}, exit {self.proc.poll()}) ---\n" + "\n".join(
            self.log().splitlines()[-lines:]
        )


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("AIPIPE_", "OPENAI_", "ANTHROPIC_", "CLOUDFLARE_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _start(stage: str, replica: int, env: dict[str, str], log_dir: Path) -> StageProcess:
    log_path = log_dir / f"{stage}-{replica}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*AIPIPE, "run", "--stage", stage], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return StageProcess(stage, replica, proc, log_path)


def _cpu_s(pid: int) -> float | None:
    """CPU time (user + system, s) a live process has used so far, from /proc (Linux); ``None`` elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop_all(procs: list[StageProcess]) -> dict[str, int | None]:
    """SIGTERM every live process at once, wait for each (20 s), SIGKILL the stragglers; exit codes by name."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            codes[p.name] = p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
            codes[p.name] = None
    return codes


async def _wait_for(
    predicate: Callable[[], T | None],
    what: str,
    procs: list[StageProcess],
    *,
    timeout_s: float,
    abort: Callable[[], str | None] = lambda: None,
    tick: Callable[[], Awaitable[object]] = lambda: anyio.sleep(0.02),
) -> T:
    """Poll ``predicate`` until it returns a truthy value, awaiting ``tick`` (default: 20 ms) between polls.

    Fails with the processes' logs on timeout or when one of them exited, and at once when ``abort``
    returns a reason.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        reason = abort()
        if reason:
            pytest.fail(f"while waiting for {what}: {reason}")
        dead = [p for p in procs if p.proc.poll() is not None and p.proc.returncode != -signal.SIGKILL]
        if dead:
            pytest.fail(f"while waiting for {what}: a stage process exited\n" + "\n".join(p.tail() for p in dead))
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n" + "\n".join(p.tail(15) for p in procs))
        await tick()


# --------------------------------------------------------------------------- what the topics say


@dataclass
class TopicWatch:
    """A broadcast reader of the pipeline's topics: first response per id, cost events, ends seen."""

    topics: Topics
    responses: dict[str, AIResponse] = field(default_factory=dict)
    response_records: Counter[str] = field(default_factory=Counter)
    different_answers: list[str] = field(default_factory=list)
    costs: list[CostEvent] = field(default_factory=list)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        self.ends[(record.topic, record.partition)] = record.offset + 1
        if record.topic == self.topics.responses:
            response = msgspec.json.decode(record.value, type=AIResponse)
            self.response_records[response.id] += 1
            first = self.responses.setdefault(response.id, response)
            if first is response:
                self.answered_at[response.id] = time.monotonic()
            elif msgspec.json.encode(first) != msgspec.json.encode(response):
                self.different_answers.append(response.id)
        elif record.topic == self.topics.costs:
            self.costs.append(msgspec.json.decode(record.value, type=CostEvent))


async def _committed(admin: Any, group: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    offsets = await admin.list_consumer_group_offsets(
        group, partitions=[KafkaTopicPartition(t, p) for t, p in partitions]
    )
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta is not None}


# --------------------------------------------------------------------------- the test


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs"
    path.mkdir()
    yield path


async def test_replicas_split_partitions_and_survive_a_killed_executor(
    kafka_bootstrap: str, unflushed_redis_url: str, unique_prefix: str, tmp_path: Path, log_dir: Path
) -> None:
    topics = Topics(unique_prefix)
    config_path = tmp_path / "aipipe.toml"
    config_path.write_text(CONFIG_TOML, encoding="utf-8")
    latency = {"latency": {"dist": "fixed", "ms": EMULATOR_LATENCY_MS}}
    profile = parse_profile({"providers": {p: dict(latency) for p in ("openai", "anthropic", "cloudflare")}})
    started = time.monotonic()

    async with EmulatorServer(profile=profile) as emu:
        env = _clean_env(
            AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap,
            AIPIPE_TOPIC_PREFIX=unique_prefix,
            AIPIPE_HOME=str(tmp_path / "home"),
            AIPIPE_ENV="production",
            AIPIPE_CONFIG=str(config_path),
            AIPIPE_EMULATE="1",
            AIPIPE_EMULATOR_URL=emu.url,
            AIPIPE_REDIS_URL=unflushed_redis_url,
            AIPIPE_KAFKA_SESSION_TIMEOUT_MS="2000",
            AIPIPE_KAFKA_PARTITIONS=str(PARTITIONS),
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
        )
        procs = [
            _start(stage, replica, env, log_dir) for stage in ALL_STAGES for replica in range(REPLICAS.get(stage, 1))
        ]
        bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        codes: dict[str, int | None] = {}
        try:
            await bus.start()
            await admin.start()
            await _run_scenario(emu, bus, admin, topics, procs, kafka_bootstrap)
        finally:
            await admin.close()
            await bus.stop()
            cpu = {p.name: _cpu_s(p.proc.pid) for p in procs if p.proc.poll() is None}
            codes = _stop_all(procs)
        print("scale-out CPU s per process: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v is not None))

    print(f"scale-out test: {time.monotonic() - started:.1f} s in all")
    victim = next(p for p in procs if p.name == "executor-0")
    for p in procs:
        if p is victim:
            assert codes[p.name] == -signal.SIGKILL
            continue
        assert codes[p.name] == 0, p.tail()
        assert "Traceback" not in p.log(), p.tail(80)
    # A Redis client pool smaller than a stage's concurrency (redis-py's default pool: 100 connections,
    # then MaxConnectionsError) fails Redis calls under load instead of queueing them.
    exhausted = {p.name: p.log().count("MaxConnectionsError") for p in procs if "MaxConnectionsError" in p.log()}
    assert not exhausted, f"Redis connection pool exhausted (log lines per process): {exhausted}"


async def _run_scenario(
    emu: EmulatorServer, bus: KafkaBus, admin: Any, topics: Topics, procs: list[StageProcess], bootstrap: str
) -> None:
    executors = [p for p in procs if p.stage == "executor"]
    routers = [p for p in procs if p.stage == "router"]
    victim, survivor = executors
    execute_group, router_group = f"{topics.prefix}executor", f"{topics.prefix}router"
    execute_partitions = frozenset((topics.stage_execute, n) for n in range(PARTITIONS))
    route_partitions = frozenset((topics.stage_route, n) for n in range(PARTITIONS))

    t0 = time.monotonic()
    # 1. Every process is up (the CLI's line once its stages joined), and each replicated group is
    #    split: the latest assignments of its replicas are disjoint, non-empty, and cover every partition.
    await _wait_for(
        lambda: all("aipipe running on" in p.log() for p in procs), "every stage process to start", procs, timeout_s=90
    )

    def split(replicas: list[StageProcess], group: str, everything: frozenset[tuple[str, int]]) -> Any:
        latest = [p.assignments(group)[-1] if p.assignments(group) else frozenset() for p in replicas]
        disjoint = sum(len(a) for a in latest) == len(frozenset().union(*latest))
        if all(latest) and disjoint and frozenset().union(*latest) == everything:
            return latest
        return None

    before_kill = await _wait_for(
        lambda: split(executors, execute_group, execute_partitions), "the executors to split", procs, timeout_s=30
    )
    await _wait_for(lambda: split(routers, router_group, route_partitions), "the routers to split", procs, timeout_s=30)
    t_split = time.monotonic()
    victim_partitions = {n for _, n in before_kill[0]}
    assert before_kill[0] and before_kill[1], "both executor replicas hold partitions before the kill"
    survivor_lines_before_kill = len(survivor.assignments(execute_group))

    # 2. Watch the topics (responses, costs, and every stage input, for the drain check).
    watch = TopicWatch(topics)
    watched = [topics.responses, topics.costs, *(getattr(topics, t) for t in PIPELINE_GROUPS.values())]
    reader = await bus.consumer(watched, group=None, from_beginning=True)

    def failures() -> str | None:
        """Requests answered with an error, with what the emulator saw of their calls; ``None`` while all are ok."""
        failed = [(rid, r.error, r.attempts) for rid, r in watch.responses.items() if r.status != "ok"]
        if not failed:
            return None
        sample = {rid for rid, _, _ in failed[:3]}
        seen = [
            (c.last_user_text[:7], c.provider, c.outcome, c.status, c.held, c.arrived_at, c.finished_at)
            for c in emu.calls()
            if c.last_user_text[:7] in sample
        ]
        return f"{len(failed)} requests answered with an error, e.g. {failed[:3]}; their calls at the emulator: {seen}"

    def partition_of(request_id: str) -> int:
        return (int(murmur2(request_id.encode())) & 0x7FFFFFFF) % PARTITIONS

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})

    def publish(ids: range) -> None:
        for i in ids:
            rid = f"so-{i:04d}"
            body = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"{rid}: name a river in Europe.", "max_tokens": 32}
            producer.produce(topics.requests, key=rid.encode(), value=json.dumps(body).encode())
        assert producer.flush(30) == 0

    async def pump() -> None:
        """Read what arrived on the watched topics (waits up to 20 ms for the first record)."""
        for record in await reader.getmany(20, max_records=5000):
            watch.add(record)

    try:
        # 3. The first half; once a fifth of its provider calls have arrived, a hold at the emulator:
        #    calls arriving from then on wait there, so the victim surely has calls in flight when
        #    it dies. A fifth, not a half: with a half, a victim that started first could have made
        #    all of its share before the hold (seen once on a loaded machine), and hold nothing.
        #    (Counting calls, not answers: the executors run ahead of the recorder.)
        await anyio.to_thread.run_sync(publish, range(HALF))
        await _wait_for(
            lambda: len(emu.calls()) >= HALF // 5,
            "a fifth of the first calls",
            procs,
            timeout_s=60,
            abort=failures,
            tick=pump,
        )
        emu.hold(10**6)

        def victims_calls_in_flight() -> set[str]:
            ids = set()
            for call in emu.calls():
                found = _REQUEST_ID.search(call.last_user_text)
                if call.held and call.outcome == "pending" and found:
                    if partition_of(found.group(1)) in victim_partitions:
                        ids.add(found.group(1))
            return ids

        held = await _wait_for(
            victims_calls_in_flight, "a held call of the victim", procs, timeout_s=90, abort=failures, tick=pump
        )
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        killed_at = time.monotonic()
        answered_at_kill = len(watch.responses)
        in_flight_at_kill = {rid for rid in held if rid not in watch.responses}
        emu.release()

        # 4. The second half, then every id answered.
        await anyio.to_thread.run_sync(publish, range(HALF, REQUESTS))
        await _wait_for(
            lambda: len(watch.responses) >= REQUESTS, "1,000 answers", procs, timeout_s=90, abort=failures, tick=pump
        )
        t_answered = time.monotonic()

        # 5. Drained: every stage group has committed the end of its input topic (as read after the
        #    offsets were fetched), in two rounds with no new record on any watched topic between them;
        #    only then are cost events counted.
        groups = {f"{topics.prefix}{stage}": getattr(topics, short) for stage, short in PIPELINE_GROUPS.items()}
        previous: dict[tuple[str, int], int] | None = None
        deadline = time.monotonic() + 30
        while True:
            committed: dict[tuple[str, int], int] = {}
            for group, topic in groups.items():
                committed.update(await _committed(admin, group, [(topic, n) for n in range(PARTITIONS)]))
            for _ in range(10):
                await pump()
            ends = {tp: end for tp, end in watch.ends.items() if tp[0] in groups.values()}
            caught_up = all(committed.get(tp, -1) == end for tp, end in ends.items())
            if caught_up and previous == watch.ends:  # and nothing new anywhere, costs and responses included
                t_drained = time.monotonic()
                break
            previous = dict(watch.ends) if caught_up else None
            assert time.monotonic() < deadline, f"stages did not drain: committed {committed}, ends {ends}"
    finally:
        await reader.stop()
        producer.flush(5)

    # Every request answered, all ok, and repeated responses for an id are the same answer.
    ids = {f"so-{i:04d}" for i in range(REQUESTS)}
    assert set(watch.responses) == ids
    failed = failures()
    assert failed is None, failed
    assert watch.different_answers == []

    # Exactly one cost event per answered id.
    per_id = Counter(event.id for event in watch.costs)
    duplicated = {rid: n for rid, n in per_id.items() if n > 1}
    assert not duplicated, f"duplicate cost events: {duplicated}"
    assert set(per_id) == ids
    costs_by_id = {event.id: event for event in watch.costs}
    for rid, response in watch.responses.items():
        assert costs_by_id[rid].cost_usd == response.cost_usd
        assert costs_by_id[rid].provider == response.provider

    # The victim died holding calls; those requests were answered afterwards, by the survivor.
    assert in_flight_at_kill, "the victim had unanswered provider calls in flight when it was killed"
    assert all(watch.answered_at[rid] > killed_at for rid in in_flight_at_kill)
    takeover = survivor.assignments(execute_group)[survivor_lines_before_kill:]
    assert takeover and takeover[-1] == execute_partitions, f"survivor's assignments after the kill: {takeover}"
    second_half_on_victim = [i for i in range(HALF, REQUESTS) if partition_of(f"so-{i:04d}") in victim_partitions]
    assert second_half_on_victim, "some requests of the second half landed on the victim's old partitions"

    calls = emu.calls()
    calls_per_id = Counter(m.group(1) for c in calls if (m := _REQUEST_ID.search(c.last_user_text)))
    repeated = {rid: n - 1 for rid, n in calls_per_id.items() if n > 1}
    on_victim = sum(n for rid, n in repeated.items() if partition_of(rid) in victim_partitions)
    print(
        f"scale-out timings: start+split {t_split - t0:.1f} s, kill at {killed_at - t0:.1f} s, "
        f"1,000 answers at {t_answered - t0:.1f} s, drained at {t_drained - t0:.1f} s; repeated provider calls: "
        f"{on_victim} on the victim's partitions, {sum(repeated.values()) - on_victim} on the survivor's own"
    )
    print(
        f"scale-out: executors held {sorted(n for _, n in before_kill[0])} / {sorted(n for _, n in before_kill[1])} "
        f"of {PARTITIONS} partitions; killed executor-0 with {len(in_flight_at_kill)} held calls in flight after "
        f"{answered_at_kill} answers; {len(second_half_on_victim)} later requests on its partitions; "
        f"{len(calls)} provider calls for {REQUESTS} requests ({len(calls) - REQUESTS} repeated after the kill); "
        f"{sum(watch.response_records.values())} response records for {len(watch.responses)} ids; "
        f"{len(watch.costs)} cost events"
    )
