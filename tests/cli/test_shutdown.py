"""SIGTERM: stop fetching, finish in-flight work, commit, leave the group (DESIGN B3)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import anyio
import msgspec
import pytest

from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.topics import Topics
from pipeline.client.pipeline_client import PipelineClient
from pipeline.emulator import EmulatorServer
from schemas import AIRequest, AIResponse

pytestmark = pytest.mark.kafka


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPIPE_", "OPENAI_", "ANTHROPIC_", "CLOUDFLARE_"))}
    env.update({"AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000", "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO"})
    env.update(extra)
    return env


async def test_sigterm_finishes_in_flight_requests_before_exiting(kafka_bootstrap: str, unique_prefix: str,
                                                                  tmp_path: Any) -> None:
    topics = Topics(unique_prefix)
    async with EmulatorServer() as emu:
        emu.faults.set("cloudflare", {"latency": {"dist": "fixed", "ms": 2500}})
        env = _env(AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap, AIPIPE_TOPIC_PREFIX=unique_prefix, AIPIPE_EMULATE="1",
                   AIPIPE_EMULATOR_URL=emu.url, AIPIPE_HOME=str(tmp_path))
        log_path = anyio.Path(tmp_path / "run.log")
        with open(tmp_path / "run.log", "wb") as log:  # noqa: ASYNC230 - opened once, before the loop is busy
            proc = await anyio.open_process([sys.executable, "-m", "pipeline.cli", "run"], env=env, stdout=log,
                                            stderr=log)
        bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
        await bus.start()
        try:
            await bus.ensure_topics(topics.all())
            client = PipelineClient(bus, topics)
            responses: dict[str, AIResponse] = {}
            async with anyio.create_task_group() as tg:
                await tg.start(client.run)

                async def ask(i: int) -> None:
                    req = msgspec.convert({"id": f"term-{i}", "model": "gpt-3.5-turbo", "prompt": f"q{i}"},
                                          AIRequest)
                    responses[req.id] = await client.request(req, timeout_s=60)

                async with anyio.create_task_group() as batch:
                    for i in range(10):
                        batch.start_soon(ask, i)
                    await emu.wait_for_calls(10, "cloudflare", timeout_s=45)
                    proc.send_signal(signal.SIGTERM)  # every call is in flight now
                    with anyio.fail_after(30):
                        code = await proc.wait()
                client.stop()
        finally:
            await bus.stop()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = await log_path.read_text()
        assert code == 0, text
        assert "received SIGTERM" in text
        assert sorted(responses) == sorted(f"term-{i}" for i in range(10))
        assert all(r.status == "ok" and r.provider == "cloudflare" for r in responses.values())
        assert emu.counts()["cloudflare"] == 10


async def _start_run(env: dict[str, str], log_file: Any) -> Any:
    return await anyio.open_process([sys.executable, "-m", "pipeline.cli", "run"], env=env, stdout=log_file,
                                    stderr=log_file)


async def _publish_requests(bus: KafkaBus, topics: Topics, ids: list[str]) -> None:
    from pipeline.bus.protocol import Outgoing

    for rid in ids:
        value = msgspec.json.encode({"id": rid, "model": "gpt-3.5-turbo", "prompt": f"q {rid}", "max_tokens": 8})
        await bus.publish(Outgoing(topic=topics.requests, value=value, key=rid.encode()))


async def test_the_drain_window_names_what_it_abandons_and_leaves_it_uncommitted(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Any
) -> None:
    topics = Topics(unique_prefix)
    ids = [f"aband-{i}" for i in range(3)]
    async with EmulatorServer() as emu:
        emu.hold(1000, provider="cloudflare")  # the calls never come back while held
        env = _env(AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap, AIPIPE_TOPIC_PREFIX=unique_prefix, AIPIPE_EMULATE="1",
                   AIPIPE_EMULATOR_URL=emu.url, AIPIPE_HOME=str(tmp_path), AIPIPE_DRAIN_GRACE_S="4")
        bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
        await bus.start()
        try:
            await bus.ensure_topics(topics.all())
            with open(tmp_path / "first.log", "wb") as log:  # noqa: ASYNC230
                proc = await _start_run(env, log)
            await _publish_requests(bus, topics, ids)
            await emu.wait_for_calls(3, "cloudflare", timeout_s=45)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with anyio.fail_after(30):
                code = await proc.wait()
            took_s = time.monotonic() - signalled
            text = (tmp_path / "first.log").read_text()
            assert code == 0, text
            [line] = [ln for ln in text.splitlines() if "abandoned" in ln]
            assert "stage executor" in line and "3 message(s)" in line and all(i in line for i in ids)
            assert "drain window of 4 s" in line
            # the whole process keeps the one window (before: the stages' wait, then the executor's own again)
            assert 4 <= took_s < 4 + 3, took_s
            assert "Traceback" not in text

            # uncommitted: a new process takes the three requests again and answers them
            emu.release()
            emu.reset()
            with open(tmp_path / "second.log", "wb") as log:  # noqa: ASYNC230
                second = await _start_run(env, log)
            try:
                answers: dict[str, AIResponse] = {}
                consumer = await bus.consumer([topics.responses], group=None, from_beginning=True)
                try:
                    with anyio.fail_after(60):
                        while set(answers) != set(ids):
                            for record in await consumer.getmany(200, max_records=100):
                                response = msgspec.json.decode(record.value, type=AIResponse)
                                answers.setdefault(response.id, response)
                finally:
                    await consumer.stop()
                assert all(a.status == "ok" for a in answers.values())
            finally:
                second.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await second.wait()
        finally:
            await bus.stop()


async def test_a_second_signal_stops_at_once_without_a_traceback(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Any
) -> None:
    topics = Topics(unique_prefix)
    async with EmulatorServer() as emu:
        emu.hold(1000, provider="cloudflare")
        env = _env(AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap, AIPIPE_TOPIC_PREFIX=unique_prefix, AIPIPE_EMULATE="1",
                   AIPIPE_EMULATOR_URL=emu.url, AIPIPE_HOME=str(tmp_path))
        bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
        await bus.start()
        try:
            await bus.ensure_topics(topics.all())
            with open(tmp_path / "run.log", "wb") as log:  # noqa: ASYNC230
                proc = await _start_run(env, log)
            await _publish_requests(bus, topics, ["twice-0", "twice-1"])
            await emu.wait_for_calls(2, "cloudflare", timeout_s=45)
            proc.send_signal(signal.SIGINT)  # draining: the held calls would keep it for the whole window
            with anyio.move_on_after(1.0):
                await proc.wait()
            assert proc.returncode is None
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(5):
                code = await proc.wait()
        finally:
            await bus.stop()
            emu.release()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = (tmp_path / "run.log").read_text()
        assert code == 130, text
        assert "received SIGINT again: stopping at once" in text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text


async def test_a_second_signal_also_removes_the_runtime_file_of_the_broker_it_started(tmp_path: Any) -> None:
    async with EmulatorServer() as emu:
        emu.hold(1000, provider="cloudflare")
        env = _env(AIPIPE_EMULATE="1", AIPIPE_EMULATOR_URL=emu.url, AIPIPE_HOME=str(tmp_path))
        with open(tmp_path / "run.log", "wb") as log:  # noqa: ASYNC230
            proc = await _start_run(env, log)
        runtime_file = tmp_path / "broker"
        bus = None
        try:
            with anyio.fail_after(30):
                while not runtime_file.exists() or "aipipe running" not in (tmp_path / "run.log").read_text():
                    await anyio.sleep(0.1)
            bus = KafkaBus(runtime_file.read_text().strip(), KafkaSettings())
            await bus.start()
            await _publish_requests(bus, Topics(), ["file-0"])
            await emu.wait_for_calls(1, "cloudflare", timeout_s=45)
            proc.send_signal(signal.SIGINT)
            with anyio.move_on_after(1.0):
                await proc.wait()
            assert proc.returncode is None  # draining, held by the call
            proc.send_signal(signal.SIGINT)
            with anyio.fail_after(5):
                code = await proc.wait()
        finally:
            if bus is not None:
                await bus.stop()
            emu.release()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert code == 130, (tmp_path / "run.log").read_text()
        assert not runtime_file.exists()  # later commands do not find a broker that is gone


async def test_a_client_that_lost_its_broker_logs_one_line_of_each_kind(tmp_path: Any) -> None:
    """``aipipe serve`` (a client of the broker) with its broker gone for 10 s: a few lines, not hundreds."""
    from pipeline.bus.embedded import EmbeddedBroker

    broker = EmbeddedBroker()
    await broker.start()
    env = _env(AIPIPE_KAFKA_BOOTSTRAP=broker.address, AIPIPE_EMULATE="1", AIPIPE_HOME=str(tmp_path),
               AIPIPE_TOPIC_PREFIX="lost.")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:  # noqa: ASYNC230
        proc = await anyio.open_process([sys.executable, "-m", "pipeline.cli", "serve", "--port", "0"], env=env,
                                        stdout=log, stderr=log)
    try:
        with anyio.fail_after(30):
            while "aipipe serve:" not in log_path.read_text():
                await anyio.sleep(0.1)
        await broker.stop()
        await anyio.sleep(10)
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await broker.stop()
    lines = log_path.read_text().split("aipipe serve:", 1)[1].splitlines()[1:]
    outage = [msgspec.json.decode(ln) for ln in lines if ln.startswith("{") and '"level": "info"' not in ln]
    kinds = [(e["logger"], e["message"].split(":")[0]) for e in outage]
    assert 0 < len(outage) <= 8 and len(kinds) == len(set(kinds)), "\n".join(lines)
