"""The bus protocol every stage talks to: publish, consume (group or broadcast), commit.

Two implementations share it: ``pipeline.bus.kafka.KafkaBus`` (aiokafka, any
Kafka-compatible broker) and ``pipeline.bus.memory.MemoryBus`` (in-process,
anyio). The same stage code and end-to-end tests run on both (DESIGN B1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import msgspec

Headers = tuple[tuple[str, bytes], ...]
TopicPartition = tuple[str, int]


class Record(msgspec.Struct, frozen=True, gc=False):
    """One consumed message: its position, key, value, headers and timestamp (Unix epoch ms).

    A msgspec struct without garbage-collector tracking (it holds only str,
    bytes, ints and tuples of them): the in-process bus keeps up to 50,000 per
    topic, and as tracked objects they made each full collection pause the
    pipeline for 100+ ms (``aipipe bench``); building one is also ~3x cheaper
    than a frozen dataclass.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = ()
    timestamp_ms: int = 0

    def header(self, name: str) -> bytes | None:
        """The first header called ``name``, or ``None``."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Outgoing(msgspec.Struct, frozen=True, gc=False):
    """One message to publish: topic, value bytes, optional key and headers.

    ``timestamp_ms``: the record's timestamp (Unix epoch ms); ``None``: now.
    A restore sets it to the original record's, so reads by time still find it.
    """

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int | None = None


class Consumer(Protocol):
    """A subscription to one or more topics.

    In a consumer group, partitions are split among the group's members and
    offsets are committed; as a broadcast (no group) it reads every partition
    and never commits.
    """

    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` (ms) for the first one."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read.

        Raises:
            BusError: when the commit is refused (for example after a rebalance
                took the partition away); the caller may drop it.
        """
        ...

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this consumer currently reads."""
        ...

    async def stop(self) -> None:
        """Leave the group (if any) and release the connection."""
        ...


class Bus(Protocol):
    """Publish and consume raw bytes; encoding is the caller's (msgspec JSON)."""

    async def start(self) -> None:
        """Connect (Kafka: start the producer; retries until the broker answers).

        Raises:
            BusError: when the broker cannot be reached within the start timeout.
        """
        ...

    async def stop(self) -> None:
        """Flush pending messages and disconnect."""
        ...

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet (idempotent)."""
        ...

    async def publish(self, message: Outgoing) -> None:
        """Publish one message and wait for the broker's acknowledgement.

        Raises:
            BusError: when the message cannot be delivered.
        """
        ...

    async def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        from_beginning: bool = True,
        background: bool = False,
    ) -> Consumer:
        """Open a consumer.

        Args:
            topics: topic names to read.
            group: consumer group id; ``None`` makes a broadcast reader of every partition.
            from_beginning: where to start without a committed offset: the
                earliest record, or the current end of each partition.
            background: the reader is off a request's path (circuit breaker, health
                monitor, archive, the control and cost feeds): a bus may fetch for
                it less often, trading latency it does not need for idle CPU.
        """
        ...


class BusError(Exception):
    """The bus could not publish, consume or commit (wraps the client library's error); retrying may help."""


class PermanentBusError(BusError):
    """A publish that can never succeed as it is: too large, an invalid topic, not authorized.

    Retrying the same message is useless: the caller shrinks it (a dead
    letter), dead-letters it, or gives up, and commits past the input.
    """


class MessageTooLargeError(PermanentBusError):
    """The message is larger than the bus takes (``max_message_bytes``)."""
