"""The archive stage (DESIGN A11): a consumer group off the request path that keeps every record on disk.

It reads the archived topics (``requests``, ``responses``, ``control``,
``costs``, ``deadletter`` by default) in the consumer group ``ai.archive``
and hands each record to an ``ArchiveWriter``; ``handle`` returns only once
the record is on disk, so the runner commits an offset only after its record
was written (at most ``archive.flush_ms`` later, as a group commit). Nothing
is decoded or validated: an unreadable value is archived as it came (in
base64). A record a restore re-published (header ``aipipe-restored``) is
already in the archive and is skipped. A write that fails (disk full) is
retried with backoff; its record stays uncommitted meanwhile, and the
request path does not wait for the archive.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from pipeline.bus.topics import Topics
from pipeline.runtime.runner import Emit, MessageContext, now_utc
from pipeline.stores.archive_store import ArchiveError, ArchiveWriter, archive_line
from schemas.archive import RESTORED_HEADER
from schemas.response import ErrorInfo

log = logging.getLogger("aipipe.archive")

#: How often the stage closes ended days and applies retention (s).
MAINTAIN_EVERY_S = 60.0
#: Longest pause between two attempts at a failing write (s).
MAX_RETRY_DELAY_S = 30.0


class ArchiveStage:
    """Archives the records of ``short_topics`` through ``writer``.

    Args:
        topics: the pipeline's topic names.
        writer: where records go (``pipeline.stores.archive_store.FileArchive``).
        short_topics: short names of the topics to archive (``requests``...).
        broker_id: returns the id of the broker the records come from (it
            changes when the embedded broker is rotated), part of each record's
            identity in the archive.
    """

    name = "archive"

    def __init__(
        self,
        topics: Topics,
        writer: ArchiveWriter,
        short_topics: Sequence[str],
        broker_id: Callable[[], str],
    ) -> None:
        self.topics = topics
        self.writer = writer
        self.input_topics = [topics.short(t) for t in short_topics]
        self.input_topic = self.input_topics[0]
        self.broker_id = broker_id
        self.archived = 0
        self.skipped_restored = 0
        self._failing = False

    def decode(self, raw: bytes) -> bytes:
        """Any bytes are archived as they are (never ``InvalidInput``)."""
        return raw

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Write the record; return once it is on disk (retrying a failing write until it succeeds)."""
        record = ctx.record
        if record.header(RESTORED_HEADER) is not None:
            self.skipped_restored += 1
            return []
        line = archive_line(record, self.broker_id())
        delay = 0.5
        while True:
            try:
                await self.writer.write(record.topic, line)
            except ArchiveError as exc:
                if not self._failing:
                    log.warning("archive: cannot write (%s); retrying, offsets stay uncommitted", exc)
                self._failing = True
                await anyio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                continue
            if self._failing:
                log.info("archive: writing again")
                self._failing = False
            self.archived += 1
            return []

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """The archive answers no request."""
        return []

    async def background(self, publish: Callable[[Emit], Awaitable[None]]) -> None:
        """Every ``MAINTAIN_EVERY_S``: close the days that ended and apply retention; returns when cancelled."""
        while True:
            try:
                await self.writer.maintain(now_utc())
            except OSError as exc:
                log.warning("archive: maintenance failed (%s); trying again in %.0f s", exc, MAINTAIN_EVERY_S)
            await anyio.sleep(MAINTAIN_EVERY_S)
