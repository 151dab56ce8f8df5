"""Broadcast feeds: every replica reads all of ``ai.control`` (and ``ai.costs``) (DESIGN A3).

One feed per topic per process decodes each event once and hands it to every
listener registered in that process (router, executor, cache, budget gate,
clients). A listener that raises is logged and does not stop the feed. A
value that cannot be decoded is logged and skipped here: broadcast readers
are many, so dead-lettering belongs to the topic's single group owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from pipeline.bus.protocol import Bus, BusError
from pipeline.runtime.logs import OUTAGE

log = logging.getLogger("aipipe.feed")

Listener = Callable[[Any], None]


class BroadcastFeed:
    """Reads ``topic`` as a broadcast from the beginning and calls ``listeners`` with each decoded value.

    Args:
        bus: the bus.
        topic: topic to read (every partition).
        decoder: msgspec decoder of the topic's value type.
        background: the feed informs decisions but is not on a request's path
            (the control and cost feeds): its reader may fetch less often (``Bus.consumer``).
    """

    def __init__(self, bus: Bus, topic: str, decoder: msgspec.json.Decoder[Any], *, background: bool = False) -> None:
        self.bus = bus
        self.background = background
        self.topic = topic
        self.decoder = decoder
        self.listeners: list[Listener] = []
        self.events_seen = 0
        #: Set once a fetch comes back empty: the history present at start has been replayed.
        self.caught_up = anyio.Event()
        self._stop = anyio.Event()
        self._consumer: Any = None

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(value)`` for every event from now on (and the replayed history)."""
        self.listeners.append(listener)

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()

    async def restart_from_zero(self) -> None:
        """The broker was replaced by an empty one: read every partition from offset 0 again."""
        restart = getattr(self._consumer, "restart_from_zero", None)
        if restart is not None:
            await restart()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read until ``stop()``; reports started once the reader is open."""
        consumer = await self.bus.consumer([self.topic], group=None, from_beginning=True, background=self.background)
        self._consumer = consumer
        task_status.started()
        try:
            while not self._stop.is_set():
                try:
                    records = await consumer.getmany(200, max_records=1000)
                except BusError as exc:
                    log.warning("feed %s: fetch failed (%s); retrying", self.topic, exc, extra=OUTAGE)
                    with anyio.move_on_after(1.0):
                        await self._stop.wait()
                    continue
                if not records:
                    self.caught_up.set()
                for record in records:
                    try:
                        value = self.decoder.decode(record.value)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        log.warning(
                            "feed %s: skipping undecodable value at offset %s: %s", self.topic, record.offset, exc
                        )
                        continue
                    self.events_seen += 1
                    for listener in self.listeners:
                        try:
                            listener(value)
                        except Exception:
                            log.exception("feed %s: listener failed", self.topic)
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()
