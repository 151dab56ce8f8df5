"""A whole pipeline for tests: emulator, bus (memory or Kafka), every stage, a client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from pipeline.assembly.build import PIPELINE_STAGES, Pipeline
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.memory import MemoryBus
from pipeline.bus.protocol import Bus, Record
from pipeline.bus.topics import Topics
from pipeline.client.pipeline_client import PipelineClient
from pipeline.emulator import EmulatorServer
from pipeline.runtime.config import PipelineConfig, config_from_mapping, preset
from pipeline.runtime.endpoints import resolve_endpoints
from pipeline.runtime.settings import Settings

FAST_RETRY = {"retry": {"base_delay_ms": 5, "max_delay_ms": 3000}}


#: No RPM/TPM limits: the session-wide ``pipe`` serves every test module within a minute or two.
NO_RATE_LIMIT = {"rate_limit": {"requests_per_minute": None, "tokens_per_minute": None}}


def fast_config(**overrides: Any) -> PipelineConfig:
    """The production preset with millisecond backoff (retry tests stay fast) and no rate limits."""
    data: dict[str, Any] = {
        "providers": {p: {**FAST_RETRY, **NO_RATE_LIMIT} for p in ("openai", "anthropic", "cloudflare")}
    }
    data.update(overrides)
    return config_from_mapping(data, base=preset("production"))


@dataclass
class Harness:
    """What a test drives: the bus, topics, client, emulator and the running pipeline."""

    kind: str
    bus: Bus
    topics: Topics
    client: PipelineClient
    emulator: EmulatorServer
    pipeline: Pipeline
    bootstrap: str | None

    async def read_all(self, topic: str, *, until: Any = None, timeout_s: float = 10.0) -> list[Record]:
        """Records of ``topic`` from the beginning, waiting until ``until(records)`` holds (or timeout)."""
        consumer = await self.bus.consumer([topic], group=None, from_beginning=True)
        records: list[Record] = []
        try:
            with anyio.move_on_after(timeout_s):
                while True:
                    records.extend(await consumer.getmany(100, max_records=1000))
                    if until is None or until(records):
                        if until is None:
                            more = await consumer.getmany(200, max_records=1000)
                            records.extend(more)
                            if not more:
                                break
                        else:
                            break
        finally:
            await consumer.stop()
        return records

    def decode(self, records: list[Record], type_: Any) -> list[Any]:
        """Decode each record's value as ``type_``, skipping values that are not one.

        Other tests on the shared session pipeline publish garbage on purpose
        (the fuzz test), so a topic may hold undecodable values.
        """
        decoder = msgspec.json.Decoder(type_)
        out: list[Any] = []
        for record in records:
            try:
                out.append(decoder.decode(record.value))
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
        return out


@asynccontextmanager
async def harness(
    kind: str,
    prefix: str,
    *,
    bootstrap: str | None = None,
    config: PipelineConfig | None = None,
    kafka_settings: KafkaSettings | None = None,
    extra_env: dict[str, str] | None = None,
    stages: Sequence[str] = PIPELINE_STAGES,
) -> AsyncIterator[Harness]:
    """Run the five stages on a ``memory`` or ``kafka`` bus with the emulator behind every provider.

    ``extra_env`` adds settings, e.g. ``{"AIPIPE_REDIS_URL": ...}``; ``stages`` picks
    the stages (e.g. ``ALL_STAGES`` adds the breaker and the health monitor).
    """
    env = {"AIPIPE_TOPIC_PREFIX": prefix, "AIPIPE_EMULATE": "1", **(extra_env or {})}
    settings = Settings.from_env(env, env_name="production")
    bus: Bus
    if kind == "memory":
        bus = MemoryBus()
    else:
        assert bootstrap is not None
        bus = KafkaBus(bootstrap, kafka_settings or KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
    await bus.start()
    try:
        async with EmulatorServer() as emulator:
            resolved = resolve_endpoints(settings, config or fast_config(), emulator.url)
            async with Pipeline(settings, resolved, bus, stages=stages) as pipeline:
                async with anyio.create_task_group() as tg:
                    client = PipelineClient(bus, settings.topics)
                    await tg.start(client.run)
                    yield Harness(kind, bus, settings.topics, client, emulator, pipeline, bootstrap)
                    client.stop()
    finally:
        await bus.stop()
