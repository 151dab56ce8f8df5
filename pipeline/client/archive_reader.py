"""Reading a topic from the archive, the broker, or both (``replay``/``audit --source``, DESIGN A11).

``archive`` reads the files only (no broker needed: a period the broker no
longer holds, or after ``aipipe run --no-restore``); ``broker`` reads the
topic from the broker only; ``auto`` (the default) reads the archive and adds
what the broker holds that the archive does not yet: records it has already
archived (same broker id, partition and offset) and records a restore
re-published (header ``aipipe-restored``, already in the archive as they
first were) are skipped there.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Literal

import anyio

from pipeline.bus.protocol import Bus, Record
from pipeline.client.replay import read_range
from pipeline.stores.archive_store import FileArchive, as_record
from schemas.archive import RESTORED_HEADER

Source = Literal["archive", "broker", "auto"]
SOURCES: tuple[str, ...] = ("auto", "archive", "broker")


class TopicReader:
    """Reads topics by time range from ``source``.

    Args:
        source: ``archive``, ``broker`` or ``auto``.
        archive: the archive (``None``: none to read).
        bus: a started bus (``None``: no broker to read, e.g. none is running).
        broker_id: the identity of the bus's broker run (``OpenBus.broker_id``).
        idle_s: how long a broker read waits for a new record before it ends (s).
    """

    def __init__(
        self, source: Source, archive: FileArchive | None, bus: Bus | None, broker_id: str | None, idle_s: float
    ) -> None:
        self.source = source
        self.archive = archive
        self.bus = bus
        self.broker_id = broker_id
        self.idle_s = idle_s

    async def read(
        self,
        topic: str,
        since: datetime,
        until: datetime | None = None,
        *,
        on_record: Callable[[Record], None] | None = None,
    ) -> list[Record]:
        """The records of ``topic`` with timestamps in ``[since, until)``: archived ones first, then the broker's.

        ``on_record`` is called once per record returned (for a progress count).
        """
        out: list[Record] = []
        archived: set[tuple[str, int, int]] = set()
        if self.source in ("archive", "auto") and self.archive is not None:
            archive = self.archive
            since_ms = int(since.timestamp() * 1000)
            until_ms = int(until.timestamp() * 1000) if until is not None else None
            lines = await anyio.to_thread.run_sync(lambda: list(archive.read(topic, since_ms, until_ms)))
            for line in lines:
                archived.add((line.broker_id, line.partition, line.offset))
                record = as_record(topic, line)
                if on_record is not None:
                    on_record(record)
                out.append(record)
        if self.source in ("broker", "auto") and self.bus is not None:
            for record in await read_range(self.bus, topic, since, until, idle_s=self.idle_s):
                if self.source == "auto" and (
                    record.header(RESTORED_HEADER) is not None
                    or (self.broker_id or "", record.partition, record.offset) in archived
                ):
                    continue
                if on_record is not None:
                    on_record(record)
                out.append(record)
        return out
