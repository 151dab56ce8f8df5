"""In-process bus: one append-only log per topic, for a single process (DESIGN B1).

It mirrors the Kafka semantics the stages rely on (keys, headers, offsets,
consumer groups sharing one cursor, broadcast readers, commits) and nothing
more. Each topic has one partition. Records every reader has passed are
dropped once a log holds more than ``trim_above`` records, so a long-lived
in-process manager does not grow without bound; a broadcast reader created
later then starts at the oldest record still kept.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from pipeline.bus.protocol import BusError, Outgoing, Record, TopicPartition


@dataclass
class _Log:
    base: int = 0
    records: list[Record] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    waiters: int = 0  # readers waiting on ``changed``; a publish swaps the event only when there are some

    @property
    def end(self) -> int:
        return self.base + len(self.records)


@dataclass
class _Cursor:
    positions: dict[str, int]
    committed: dict[str, int] = field(default_factory=dict)


class MemoryConsumer:
    """A reader of topics on a ``MemoryBus``; group members share one cursor."""

    def __init__(self, bus: MemoryBus, topics: Sequence[str], cursor: _Cursor, group: str | None) -> None:
        self._bus = bus
        self._topics = list(topics)
        self._cursor = cursor
        self._group = group
        self._closed = False

    def _available(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for topic in self._topics:
            log = self._bus._log(topic)
            pos = max(self._cursor.positions.get(topic, 0), log.base)
            take = log.records[pos - log.base : pos - log.base + (max_records - len(out))]
            if take:
                out.extend(take)
                self._cursor.positions[topic] = pos + len(take)
            if len(out) >= max_records:
                break
        return out

    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` (ms) for one.

        Raises:
            BusError: when the consumer was stopped.
        """
        if self._closed:
            raise BusError("consumer is stopped")
        records = self._available(max_records)
        if records:
            return records
        logs = [self._bus._log(t) for t in self._topics]
        for log in logs:
            log.waiters += 1
        try:
            with anyio.move_on_after(timeout_ms / 1000):
                if len(logs) == 1:  # the common case: no task group, no task per wait
                    await logs[0].changed.wait()
                else:
                    events = [log.changed for log in logs]
                    async with anyio.create_task_group() as tg:

                        async def wait(ev: anyio.Event) -> None:
                            await ev.wait()
                            tg.cancel_scope.cancel()

                        for ev in events:
                            tg.start_soon(wait, ev)
        finally:
            for log in logs:
                log.waiters -= 1
        return self._available(max_records)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Record committed offsets (the next offset to read) for the group."""
        if self._group is None:
            return
        for (topic, _partition), offset in offsets.items():
            self._cursor.committed[topic] = max(offset, self._cursor.committed.get(topic, 0))
        self._bus._trim(self._topics)

    def assignment(self) -> frozenset[TopicPartition]:
        """Every topic's single partition."""
        return frozenset((t, 0) for t in self._topics)

    async def stop(self) -> None:
        """Stop reading; a group member's uncommitted records are read again by the next member."""
        if self._closed:
            return
        self._closed = True
        self._bus._readers.discard(self)
        if self._group is not None:
            for topic in self._topics:
                self._cursor.positions[topic] = self._cursor.committed.get(topic, 0)

    def highwater(self, tp: TopicPartition) -> int | None:
        """The end offset of ``tp``'s topic (the offset the next record gets), for consumer-lag metrics."""
        log = self._bus._logs.get(tp[0])
        return log.end if log is not None and not self._closed else None

    def position(self, topic: str) -> int:
        """The next offset this reader will take from ``topic`` (group: the committed one)."""
        if self._group is not None:
            return self._cursor.committed.get(topic, 0)
        return self._cursor.positions.get(topic, 0)


class MemoryBus:
    """The in-process implementation of ``pipeline.bus.protocol.Bus`` (anyio events, no I/O)."""

    #: ``messaging.system`` on the spans of stages running over this bus (it is not Kafka).
    messaging_system = "aipipe_memory"

    def __init__(self, *, trim_above: int = 50_000) -> None:
        self._logs: dict[str, _Log] = {}
        self._groups: dict[tuple[str, tuple[str, ...]], _Cursor] = {}
        self._readers: set[MemoryConsumer] = set()
        self._trim_above = trim_above
        self._running = False

    def _log(self, topic: str) -> _Log:
        log = self._logs.get(topic)
        if log is None:
            log = self._logs[topic] = _Log()
        return log

    def _trim(self, topics: Sequence[str]) -> None:
        for topic in topics:
            log = self._log(topic)
            if len(log.records) <= self._trim_above:
                continue
            readers = [r for r in self._readers if topic in r._topics]
            if not readers:
                continue
            floor = min(r.position(topic) for r in readers)
            drop = floor - log.base
            if drop > 0:
                del log.records[:drop]
                log.base = floor

    async def start(self) -> None:
        """Nothing to connect; marks the bus running."""
        self._running = True

    async def stop(self) -> None:
        """Marks the bus stopped; readers still drain what is logged."""
        self._running = False

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create empty logs for ``topics``."""
        for topic in topics:
            self._log(topic)

    async def publish(self, message: Outgoing) -> None:
        """Append ``message`` to its topic's log and wake its readers."""
        log = self._log(message.topic)
        log.records.append(
            Record(
                topic=message.topic,
                partition=0,
                offset=log.end,
                key=message.key,
                value=message.value,
                headers=tuple(message.headers),
                timestamp_ms=message.timestamp_ms if message.timestamp_ms is not None else int(time.time() * 1000),
            )
        )
        if log.waiters:  # wake the waiting readers; with none waiting, the next one finds the record itself
            changed, log.changed = log.changed, anyio.Event()
            changed.set()

    async def partition_for(self, topic: str, key: bytes) -> int:
        """The partition a message keyed ``key`` goes to: always 0 (one partition per topic)."""
        return 0

    async def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        from_beginning: bool = True,
        background: bool = False,
    ) -> MemoryConsumer:
        """A group member (sharing the group's cursor) or a broadcast reader; ``background`` changes nothing here."""
        for topic in topics:
            self._log(topic)
        if group is not None:
            gkey = (group, tuple(sorted(topics)))
            cursor = self._groups.get(gkey)
            if cursor is None:
                start = {t: (self._log(t).base if from_beginning else self._log(t).end) for t in topics}
                cursor = self._groups[gkey] = _Cursor(positions=dict(start), committed=dict(start))
        else:
            start = {t: (self._log(t).base if from_beginning else self._log(t).end) for t in topics}
            cursor = _Cursor(positions=start)
        reader = MemoryConsumer(self, topics, cursor, group)
        self._readers.add(reader)
        return reader

    def records(self, topic: str) -> list[Record]:
        """Every record still kept on ``topic`` (for tests and audits)."""
        return list(self._log(topic).records)
