"""Client side of health: fold ``ai.control`` into ``HealthStatus`` per provider, in any process.

A ``HealthReader`` reads ``ai.control`` as a broadcast from the beginning (the
manager, ``aipipe status``, a dashboard) and folds it into a
``pipeline.client.health_board.HealthBoard``. ``sync()`` waits until the reader has
read everything written before the call: the reader is current when two
polls in a row that started after that moment come back empty or bring only
records written after it (no end offsets needed; the embedded broker's are
unreliable, EMBEDDED-BROKER.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import msgspec

from pipeline.bus.protocol import Bus, BusError
from pipeline.bus.topics import Topics
from pipeline.client.health_board import HealthBoard, HealthStatus
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.logs import OUTAGE
from pipeline.runtime.messages import CONTROL_DECODER
from schemas.events import (
    ControlEvent,
)

log = logging.getLogger("aipipe.health_reader")

#: How long one poll waits for records (ms).
POLL_MS = 50
_MAX_RECORDS = 1000


class HealthReader:
    """Folds ``ai.control`` into a ``HealthBoard`` as events arrive.

    Args:
        bus: a started bus.
        topics: topic names.
        config: provider thresholds and ``health.status_window_s``.
    """

    def __init__(self, bus: Bus, topics: Topics, config: PipelineConfig) -> None:
        self.bus = bus
        self.topics = topics
        self.config = config
        self.board = HealthBoard(config, window_s=config.health.status_window_s)
        #: Extra folds of every decoded event (e.g. the load-balancing strategy for ``aipipe status``).
        self.listeners: list[Callable[[ControlEvent], None]] = []
        self._current_since_ms = 0
        self._streak = 0
        self._changed = anyio.Event()
        self._stop = anyio.Event()

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read until ``stop()``; reports started once the reader is open.

        Raises:
            BusError: when the reader cannot be opened.
        """
        consumer = await self.bus.consumer([self.topics.control], group=None, from_beginning=True)
        task_status.started()
        try:
            while not self._stop.is_set():
                started_ms = int(time.time() * 1000)
                try:
                    records = await consumer.getmany(POLL_MS, max_records=_MAX_RECORDS)
                except BusError as exc:
                    log.warning("health reader: fetch failed (%s); retrying", exc, extra=OUTAGE)
                    self._streak = 0
                    with anyio.move_on_after(1.0):
                        await self._stop.wait()
                    continue
                for record in records:
                    try:
                        event = CONTROL_DECODER.decode(record.value)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue  # the topic's group owners dead-letter it; a reader skips it
                    self.board.apply(event)
                    for listener in self.listeners:
                        listener(event)
                fresh = not records or (
                    len(records) < _MAX_RECORDS and min(r.timestamp_ms for r in records) >= started_ms
                )
                self._streak = self._streak + 1 if fresh else 0
                if self._streak >= 2:
                    self._current_since_ms = max(self._current_since_ms, started_ms)
                changed, self._changed = self._changed, anyio.Event()
                changed.set()
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    async def sync(self, timeout_s: float = 10.0) -> bool:
        """Wait until the topic is read up to now; ``False`` if that took longer than ``timeout_s`` (s)."""
        asked_ms = int(time.time() * 1000)
        with anyio.move_on_after(timeout_s):
            while self._current_since_ms < asked_ms:
                await self._changed.wait()
            return True
        log.warning("health reader: not caught up after %.1fs; answering with what was read", timeout_s)
        return False

    def status(self) -> list[HealthStatus]:
        """``HealthStatus`` of every enabled provider of the configuration, then of any other provider seen."""
        return self.board.status(list(self.config.enabled_providers()))
