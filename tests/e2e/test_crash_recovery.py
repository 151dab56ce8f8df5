"""kill -9 of the executor while 500 requests are in flight, then a restart: nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from confluent_kafka import Producer

from pipeline.assembly.build import PIPELINE_STAGES
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.topics import Topics
from pipeline.emulator import EmulatorServer, parse_profile
from tests.e2e.test_scale_out import CONFIG_TOML, TopicWatch, _clean_env, _start, _stop_all, _wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(170)]

REQUESTS = 500
LATENCY_MS = 200


async def test_executor_killed_with_500_in_flight_then_restarted_answers_every_id(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path
) -> None:
    topics = Topics(unique_prefix)
    config_path = tmp_path / "aipipe.toml"
    config_path.write_text(CONFIG_TOML, encoding="utf-8")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    latency = {"latency": {"dist": "fixed", "ms": LATENCY_MS}}
    profile = parse_profile({"providers": {p: dict(latency) for p in ("openai", "anthropic", "cloudflare")}})
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with EmulatorServer(profile=profile) as emu:
        env = _clean_env(
            AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap, AIPIPE_TOPIC_PREFIX=unique_prefix,
            AIPIPE_HOME=str(tmp_path / "home"), AIPIPE_ENV="production", AIPIPE_CONFIG=str(config_path),
            AIPIPE_EMULATE="1", AIPIPE_EMULATOR_URL=emu.url, AIPIPE_KAFKA_SESSION_TIMEOUT_MS="2000",
            LOG_LEVEL="INFO", PYTHONUNBUFFERED="1",
        )
        procs = [_start(stage, 0, env, log_dir) for stage in PIPELINE_STAGES]
        executor = next(p for p in procs if p.stage == "executor")
        bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
        await bus.start()
        watch = TopicWatch(topics)
        reader = None
        try:
            await _wait_for(lambda: all("aipipe running on" in p.log() for p in procs), "the stages", procs,
                            timeout_s=90)
            reader = await bus.consumer([topics.responses, topics.costs], group=None, from_beginning=True)

            async def pump() -> None:
                for record in await reader.getmany(20, max_records=5000):
                    watch.add(record)

            producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
            for i in range(REQUESTS):
                rid = f"cr-{i:04d}"
                body = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"{rid}: a question", "max_tokens": 16}
                producer.produce(topics.requests, key=rid.encode(), value=json.dumps(body).encode())
            assert producer.flush(30) == 0

            def in_flight() -> int:
                return sum(1 for c in emu.calls() if c.outcome == "pending")

            # hold the calls so the executor surely dies with hundreds in flight
            emu.hold(10**6)
            await _wait_for(lambda: in_flight() >= 300, "300 provider calls in flight", procs, timeout_s=60,
                            tick=pump)
            os.kill(executor.proc.pid, signal.SIGKILL)
            executor.proc.wait(timeout=10)
            dead_with = in_flight()
            emu.release()
            restarted = _start("executor", 1, env, log_dir)
            procs.append(restarted)
            await _wait_for(lambda: len(watch.responses) >= REQUESTS, "500 answers", procs, timeout_s=120,
                            tick=pump)
            # let late duplicates (if any) arrive before counting cost events
            with anyio.move_on_after(2):
                while True:
                    await pump()
        finally:
            if reader is not None:
                await reader.stop()
            await bus.stop()
            codes = _stop_all(procs)
    assert dead_with >= 300
    ids = {f"cr-{i:04d}" for i in range(REQUESTS)}
    assert set(watch.responses) == ids
    assert all(r.status == "ok" for r in watch.responses.values())
    assert watch.different_answers == []
    per_id = Counter(e.id for e in watch.costs)
    assert set(per_id) == ids and max(per_id.values()) == 1
    assert codes["executor-0"] == -signal.SIGKILL and codes["executor-1"] == 0

    audit_env = {"AIPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap, "AIPIPE_TOPIC_PREFIX": unique_prefix,
                 "AIPIPE_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")}
    started = time.monotonic()
    result = await anyio.run_process(
        [sys.executable, "-m", "pipeline.cli", "audit", "--since", since.isoformat(), "--idle-s", "1", "--json"],
        env=audit_env, check=False,
    )
    report = json.loads(result.stdout)
    assert report["missing_responses"] == [] and report["missing_costs"] == [] and report["extra_costs"] == []
    assert report["conflicting"] == [] and report["requests"] == REQUESTS and report["ok"] == REQUESTS
    assert result.returncode == 0, (report, time.monotonic() - started)
