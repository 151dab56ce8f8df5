"""SIGTERM: stop fetching, finish in-flight work, commit, leave the group (DESIGN B3)."""

from __future__ import annotations

import os
import signal
import sys
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
