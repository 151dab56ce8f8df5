"""Opening what a process needs: the bus (memory or Kafka, embedded broker if asked) and the emulator.

Shared by the CLI (``run``, ``demo``, ``send``...) and ``AIProviderManager``
so broker discovery (DESIGN A6) and the emulator rule (DESIGN A7) behave the
same everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from pipeline.bus.discovery import BrokerHandle, resolve_broker
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.memory import MemoryBus
from pipeline.bus.protocol import Bus
from pipeline.emulator import EmulatorServer
from pipeline.runtime.config import PipelineConfig, load_config_file, preset
from pipeline.runtime.endpoints import Resolved, resolve_endpoints
from pipeline.runtime.settings import Settings
from pipeline.runtime.signals import at_hard_exit

log = logging.getLogger("aipipe.runtime")

BusKind = Literal["memory", "kafka"]


@dataclass(frozen=True, slots=True)
class OpenBus:
    """A started bus, the broker address (Kafka) and whether this process started that broker."""

    bus: Bus
    kind: BusKind
    bootstrap: str | None
    owns_broker: bool
    handle: BrokerHandle | None = None

    @property
    def broker_id(self) -> str:
        """The identity of the broker's current run (``memory`` for the in-process bus), see ``BrokerHandle``."""
        return self.handle.broker_id if self.handle is not None else "memory"


@asynccontextmanager
async def open_bus(
    kind: BusKind,
    env: Mapping[str, str],
    *,
    start_broker: bool,
    force_new_broker: bool = False,
    on_new_broker: Callable[[EmbeddedBroker], Awaitable[None]] | None = None,
) -> AsyncIterator[OpenBus]:
    """Open a bus of ``kind``; Kafka finds its broker as DESIGN A6 says.

    Args:
        kind: ``memory`` or ``kafka``.
        env: environment (``AIPIPE_KAFKA_BOOTSTRAP``, ``AIPIPE_HOME``, Kafka settings).
        start_broker: start the embedded broker when no broker is found.
        force_new_broker: always start a private embedded broker (``demo``).
        on_new_broker: awaited with a new shared embedded broker before the
            runtime file names it (``aipipe run``'s restore).

    Raises:
        NoBrokerError: Kafka, nothing found and ``start_broker`` false.
        BusError: the broker does not answer within the start timeout.
    """
    if kind == "memory":
        bus = MemoryBus()
        await bus.start()
        try:
            yield OpenBus(bus, "memory", None, False)
        finally:
            await bus.stop()
        return
    async with AsyncExitStack() as stack:
        lookup_env = dict(env)
        if force_new_broker:
            lookup_env.pop("AIPIPE_KAFKA_BOOTSTRAP", None)
        handle = await resolve_broker(
            lookup_env, start_if_missing=start_broker, force_new=force_new_broker, on_new_broker=on_new_broker
        )
        stack.push_async_callback(handle.close)
        stack.callback(at_hard_exit(handle.forget_now))
        settings = KafkaSettings.from_env(env)
        if handle.owned is not None or handle.from_runtime_file:
            settings = settings.for_embedded(env)
        kafka = KafkaBus(handle.bootstrap, settings)
        await kafka.start()
        stack.push_async_callback(kafka.stop)
        yield OpenBus(kafka, "kafka", handle.bootstrap, handle.owned is not None, handle)


def load_config(settings: Settings, env_name: str | None = None) -> PipelineConfig:
    """The preset of ``env_name`` (default ``settings.env_name``), with ``AIPIPE_CONFIG`` on top.

    Raises:
        ValueError: for an unknown environment or an invalid configuration file.
    """
    base = preset(env_name or settings.env_name)
    if settings.config_path is not None:
        return load_config_file(settings.config_path, base=base)
    return base


@asynccontextmanager
async def open_providers(settings: Settings, config: PipelineConfig) -> AsyncIterator[Resolved]:
    """Apply the emulator rule, starting an in-process emulator when a provider needs one.

    Yields the resolved configuration and endpoints; the emulator (if started
    here) stops on exit.
    """
    resolved = resolve_endpoints(settings, config, None, quiet=True)
    if not resolved.needs_emulator or settings.emulator_url:
        yield resolve_endpoints(settings, config, settings.emulator_url)  # the same, with its log lines once
        return
    async with EmulatorServer() as emulator:
        log.info("provider emulator listening on %s", emulator.url)
        yield resolve_endpoints(settings, config, emulator.url)
