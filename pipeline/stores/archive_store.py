"""The archive on disk (DESIGN A11): JSON Lines per topic per UTC day, summaries of closed days, readers.

Layout under the archive directory (``$AIPIPE_ARCHIVE_DIR``, default
``$AIPIPE_HOME/archive``)::

    <topic>/<YYYY-MM-DD>.jsonl           the open day, one ``schemas.archive.ArchiveLine`` per line
    <topic>/<YYYY-MM-DD>.jsonl.gz        a closed day (gzip; late records add a gzip member)
    <topic>/<YYYY-MM-DD>.meta.json       a closed day's record count
    <topic>/<YYYY-MM-DD>.summary.json    a closed day of costs (roll-up) or control (folded commands)

Writing goes through the ``ArchiveWriter`` protocol (``write`` returns once
the line is on disk), so object storage can follow; ``FileArchive`` is the
one implementation: a group commit that writes and fsyncs every pending line
at most ``flush_ms`` after the first of them arrived (sooner once
``batch_records`` are pending), in a worker thread. A file left with a
half-written last line (a kill -9) gets a newline before the next append, so
only that line is lost; readers skip it with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Protocol, TypeVar

import anyio
import msgspec

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.runtime.config import ARCHIVE_RETENTION_DAYS
from schemas.archive import ArchiveLine, ControlSummary, CostSummary
from schemas.events import ControlEvent, CostEvent
from stages.rules.archive_state import ControlFold, CostRollup

log = logging.getLogger("aipipe.archive")
_T = TypeVar("_T")

#: How long after a UTC midnight the archive keeps the day before open for late records (s).
CLOSE_GRACE_S = 600.0
#: Records whose timestamps are this far out of order are still found by a time-bounded read (ms).
ORDER_SLACK_MS = 120_000

_LINE_ENCODER = msgspec.json.Encoder()
_LINE_DECODER = msgspec.json.Decoder(ArchiveLine)
_CONTROL_DECODER = msgspec.json.Decoder(ControlEvent)
_COST_DECODER = msgspec.json.Decoder(CostEvent)


class _TimeOnly(msgspec.Struct):
    timestamp_ms: int = 0


_TIME_DECODER = msgspec.json.Decoder(_TimeOnly)
#: The file names of a day: open, being closed (after a crash), closed.
_DAY_SUFFIXES = (".jsonl", ".closing", ".jsonl.gz")


def _is_day(name: str) -> bool:
    """Whether ``name`` is a real ``YYYY-MM-DD`` date."""
    if len(name) != 10:
        return False
    try:
        date.fromisoformat(name)
    except ValueError:
        return False
    return True


def _day_bounds(day: str) -> tuple[int, int]:
    """A UTC day's [start, end) in Unix epoch ms."""
    start = int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)
    return start, start + 86_400_000


#: The control events that are state (what a restore folds); the rest, mostly ``health``, is skipped unread.
_STATE_RE = re.compile(rb'"(?:set_budget|set_strategy|circuit_snapshot|circuit_transition)"')


class _ValueOnly(msgspec.Struct):
    value: msgspec.Raw = msgspec.Raw()


_VALUE_DECODER = msgspec.json.Decoder(_ValueOnly)


def _value_of(raw: bytes) -> bytes:
    """The JSON value of one archive line (its other fields are skipped), or ``b""`` when there is none."""
    found = _decode_or_none(_VALUE_DECODER, raw)
    return bytes(found.value) if found is not None else b""


def _complete_lines(path: Path, start: int, wanted: re.Pattern[bytes] | None = None) -> Iterator[tuple[bytes, int]]:
    """``(line, offset after it)`` for each whole line of ``path`` from byte ``start`` (a half-written last one waits).

    ``wanted``: only lines it matches are yielded (offsets still advance).
    """
    try:
        handle = path.open("rb")
    except OSError:
        return
    with handle:
        handle.seek(start)
        offset = start
        rest = b""
        while chunk := handle.read(1 << 23):
            data = rest + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            rest = data[cut + 1 :]
            base = offset
            for raw in data[:cut].split(b"\n"):
                base += len(raw) + 1
                if raw and (wanted is None or wanted.search(raw) is not None):
                    yield raw, base
            offset = base
        if offset > start:
            yield b"", offset  # the final position, for the caller's cache


def _fsync_path(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


class ArchiveError(RuntimeError):
    """The archive could not be written (disk full, permissions); the records stay uncommitted and are retried."""


def day_of(timestamp_ms: int) -> str:
    """The UTC day (``YYYY-MM-DD``) of a record timestamp (Unix epoch ms)."""
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).date().isoformat()


def archive_line(record: Record, broker_id: str) -> ArchiveLine:
    """The archive's line for one consumed record: JSON values kept as they are, anything else in base64."""
    value: msgspec.Raw | None = None
    try:
        value = msgspec.json.decode(record.value, type=msgspec.Raw)
        if b"\n" in bytes(value) or b"\r" in bytes(value):  # whitespace between tokens: re-encode on one line
            value = msgspec.Raw(msgspec.json.encode(msgspec.json.decode(record.value)))
    except msgspec.DecodeError:
        value = None
    key: str | None = None
    key_b64: bytes | None = None
    if record.key is not None:
        try:
            key = record.key.decode("utf-8")
        except UnicodeDecodeError:
            key_b64 = record.key
    headers: dict[str, str] = {}
    headers_b64: dict[str, bytes] = {}
    for name, raw in record.headers:
        try:
            headers[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            headers_b64[name] = raw
    line = ArchiveLine(
        broker_id=broker_id,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp_ms,
        key=key,
        key_b64=key_b64,
        value_b64=None if value is not None else record.value,
        headers=headers,
        headers_b64=headers_b64,
    )
    if value is not None:  # else the field keeps its default, which is left out of the line
        line.value = value
    return line


def as_record(topic: str, line: ArchiveLine) -> Record:
    """The ``Record`` an archived line stands for (as a reader of the topic would have got it)."""
    headers = tuple((n, v.encode("utf-8")) for n, v in line.headers.items()) + tuple(line.headers_b64.items())
    return Record(
        topic=topic,
        partition=line.partition,
        offset=line.offset,
        key=line.raw_key(),
        value=line.raw_value(),
        headers=headers,
        timestamp_ms=line.timestamp_ms,
    )


class ArchiveWriter(Protocol):
    """Where the archive stage writes: ``write`` returns once the line is durable (on disk, or in the store)."""

    async def write(self, topic: str, line: ArchiveLine) -> None:
        """Append ``line`` to ``topic``'s archive of the line's UTC day.

        Raises:
            ArchiveError: when it cannot be written (the caller retries; nothing is committed meanwhile).
        """
        ...

    async def maintain(self, now: datetime) -> None:
        """Close the days that ended (summaries, compression) and drop what is past its retention."""
        ...

    async def aclose(self) -> None:
        """Write what is pending and release the files."""
        ...


@dataclass(frozen=True, slots=True)
class DayStats:
    """One topic's archive of one UTC day: records, bytes on disk, and whether it is closed (compressed)."""

    topic: str
    day: str
    records: int
    bytes: int
    closed: bool


class _Batch:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, bytes]] = []
        self.done = asyncio.Event()
        self.error: BaseException | None = None


class FileArchive:
    """The archive as files under ``root`` (see the module docstring).

    Args:
        root: the archive directory (created on first write).
        topics: the pipeline's topic names (which topic is ``costs``, which ``control``).
        flush_ms: longest time a written line waits before it is written and fsynced (ms).
        batch_records: pending lines that trigger a flush at once.
        retention_days: days kept per short topic name (``requests``...); missing: kept for ever.
    """

    def __init__(
        self,
        root: Path,
        topics: Topics,
        *,
        flush_ms: int = 200,
        batch_records: int = 256,
        retention_days: Mapping[str, int] | None = None,
        fsync: bool = True,
    ) -> None:
        self.root = root
        self.topics = topics
        self.flush_ms = flush_ms
        self.batch_records = batch_records
        self.retention_days = dict(ARCHIVE_RETENTION_DAYS if retention_days is None else retention_days)
        self.fsync = fsync
        self._files: dict[tuple[str, str], IO[bytes]] = {}
        self._batch = _Batch()
        self._flusher: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        self._lock = anyio.Lock()
        self.lines_written = 0
        self.skipped_lines = 0
        self._warned: set[Path] = set()
        #: Open days already folded by a restore: (bytes read, fold), so the next (a rotation) reads only the rest.
        self._cost_folds: dict[Path, tuple[int, CostRollup]] = {}
        self._control_folds: dict[Path, tuple[int, ControlFold]] = {}

    # --------------------------------------------------------------------------- writing

    async def write(self, topic: str, line: ArchiveLine) -> None:
        """Append ``line``; returns once it is written and fsynced (at most about ``flush_ms`` later).

        Raises:
            ArchiveError: when the batch holding it could not be written.
        """
        batch = self._batch
        batch.lines.append((topic, day_of(line.timestamp_ms), _LINE_ENCODER.encode(line) + b"\n"))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
        if len(batch.lines) >= self.batch_records:
            self._full.set()
        await batch.done.wait()
        if batch.error is not None:
            raise ArchiveError(str(batch.error)) from batch.error

    async def _flush_soon(self) -> None:
        with anyio.move_on_after(self.flush_ms / 1000):
            await self._full.wait()
        await self.flush()

    async def flush(self) -> None:
        """Write and fsync every pending line now (serialized with other flushes)."""
        async with self._lock:
            batch, self._batch = self._batch, _Batch()
            self._full = asyncio.Event()
            if not batch.lines:
                batch.done.set()
                return
            try:
                await anyio.to_thread.run_sync(self._write_lines, batch.lines)
            except Exception as exc:  # every waiter gets the failure
                batch.error = exc
                log.warning("archive: could not write %d line(s): %s", len(batch.lines), exc)
            else:
                self.lines_written += len(batch.lines)
            batch.done.set()
            if self._batch.lines and (self._flusher is None or self._flusher.done()):
                self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def _write_lines(self, lines: Sequence[tuple[str, str, bytes]]) -> None:
        grouped: dict[tuple[str, str], list[bytes]] = {}
        for topic, day, data in lines:
            grouped.setdefault((topic, day), []).append(data)
        touched = []
        for where, chunks in grouped.items():
            handle = self._open(*where)
            handle.write(b"".join(chunks))
            handle.flush()
            touched.append(handle)
        if self.fsync:
            for handle in touched:
                os.fsync(handle.fileno())

    def _open(self, topic: str, day: str) -> IO[bytes]:
        handle = self._files.get((topic, day))
        if handle is not None and not handle.closed:
            return handle
        folder = self.root / topic
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{day}.jsonl"
        handle = path.open("ab")
        if handle.tell() > 0:  # a half-written last line (kill -9): end it, so only it is lost
            with path.open("rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    handle.write(b"\n")
        self._files[(topic, day)] = handle
        return handle

    async def aclose(self) -> None:
        """Write what is pending and close the files."""
        await self.flush()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    # --------------------------------------------------------------------------- days

    def _short(self, topic: str) -> str:
        return topic.removeprefix(self.topics.prefix)

    def topic_dirs(self) -> list[str]:
        """The topics the archive holds (full names), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def days(self, topic: str) -> list[str]:
        """The UTC days (``YYYY-MM-DD``) ``topic``'s archive holds, oldest first.

        Only regular files named after a real date count; anything else in the
        folder (a directory, ``notaday.jsonl``) is skipped with a warning.
        """
        folder = self.root / topic
        if not folder.is_dir():
            return []
        found = set()
        for path in folder.iterdir():
            if not path.name.endswith(_DAY_SUFFIXES):
                continue
            day = path.name.split(".", 1)[0]
            if not path.is_file() or not _is_day(day):
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("archive: skipping %s (not a day file of the archive)", path)
                continue
            found.add(day)
        return sorted(found)

    async def maintain(self, now: datetime) -> None:
        """Close every day that ended more than ``CLOSE_GRACE_S`` ago, then apply retention (in a worker thread)."""
        async with self._lock:
            await anyio.to_thread.run_sync(self.close_days, now - timedelta(seconds=CLOSE_GRACE_S))
            await anyio.to_thread.run_sync(self.apply_retention, now)

    def close_days(self, now: datetime) -> list[tuple[str, str]]:
        """Close every open day before ``now``'s UTC day: summary (costs, control), gzip, record count.

        Blocking. Finishes a close a crash interrupted first. Returns the (topic, day) pairs closed.
        """
        self.recover()
        today = now.astimezone(UTC).date().isoformat()
        closed = []
        for topic in self.topic_dirs():
            for day in self.days(topic):
                if day < today and (self.root / topic / f"{day}.jsonl").is_file():
                    self._close_day(topic, day)
                    closed.append((topic, day))
        return closed

    def recover(self) -> None:
        """Finish every day close a crash (kill -9) interrupted, so no day is counted twice or lost. Blocking."""
        for topic in self.topic_dirs():
            folder = self.root / topic
            pending = {p.name.split(".", 1)[0] for p in folder.glob("*.closing")}
            pending |= {p.name.split(".", 1)[0] for p in folder.glob("*.close.new")}
            for day in sorted(d for d in pending if _is_day(d)):
                log.warning("archive: finishing the close of %s %s that was interrupted", topic, day)
                self._finish_closing(topic, day)

    def _close_day(self, topic: str, day: str) -> None:
        """Close one day: its file is renamed ``.closing`` (atomically), then folded in (``_finish_closing``)."""
        folder = self.root / topic
        handle = self._files.pop((topic, day), None)
        if handle is not None:
            handle.close()
        if (folder / f"{day}.closing").exists() or (folder / f"{day}.close.new").exists():
            self._finish_closing(topic, day)
        os.replace(folder / f"{day}.jsonl", folder / f"{day}.closing")
        self._finish_closing(topic, day)

    def _finish_closing(self, topic: str, day: str) -> None:
        """Fold ``<day>.closing`` into the day's summary, count and compressed file; safe to run again after a crash.

        The new summary and count are staged in ``<day>.close.new`` first; the
        ``.closing`` file is removed only once its lines are in the ``.gz``; the
        staged values then replace the day's. A crash before the removal redoes
        the whole fold from the day's previous summary (the ``.gz`` may hold
        some lines twice: readers count a record once); a crash after it only
        puts the staged values in place.
        """
        folder = self.root / topic
        closing, staged = folder / f"{day}.closing", folder / f"{day}.close.new"
        if closing.exists():
            staged.unlink(missing_ok=True)  # folded from a state that may be stale: fold again
            prior = self._meta_value(topic, day, "records")
            records = 0
            summary: bytes | None = None
            if topic == self.topics.costs:
                rollup = CostRollup()
                known = self._summary(topic, day, CostSummary)
                for bucket in known.buckets if known is not None else []:
                    rollup.add_bucket(bucket)
                for line in self._lines_of(closing):
                    records += 1
                    event = _decode_or_none(_COST_DECODER, line.raw_value())
                    if event is not None:
                        rollup.add(event)
                summary = msgspec.json.encode(
                    CostSummary(day=day, records=prior + records, buckets=rollup.to_buckets())
                )
            elif topic == self.topics.control:
                fold = ControlFold(self.control_summary_before(topic, day, include=True))
                for line in self._lines_of(closing):
                    records += 1
                    command = _decode_or_none(_CONTROL_DECODER, line.raw_value())
                    if command is not None:
                        fold.add(command)
                summary = msgspec.json.encode(fold.summary(day, prior + records))
            else:
                records = sum(1 for _ in self._lines_of(closing))
            last_ms = max(self._meta_value(topic, day, "last_ms"), self._last_time(closing))
            meta = {"records": prior + records, "last_ms": last_ms}
            staging = {"meta": meta, "summary": msgspec.Raw(summary) if summary is not None else None}
            _write_atomic(staged, msgspec.json.encode(staging))
            with closing.open("rb") as source, gzip.open(folder / f"{day}.jsonl.gz", "ab") as target:
                shutil.copyfileobj(source, target)
            _fsync_path(folder / f"{day}.jsonl.gz")
            closing.unlink()
            log.info("archive: closed %s %s (%d records)", topic, day, records)
        if staged.exists():
            try:
                done = msgspec.json.decode(staged.read_bytes())
            except (OSError, msgspec.DecodeError) as exc:
                log.warning("archive: unreadable %s (%s); left for an operator", staged, exc)
                return
            if isinstance(done, dict) and done.get("summary") is not None:
                _write_atomic(folder / f"{day}.summary.json", msgspec.json.encode(done["summary"]))
            if isinstance(done, dict):
                _write_atomic(folder / f"{day}.meta.json", msgspec.json.encode(done.get("meta", {})))
            staged.unlink()

    def _meta_records(self, topic: str, day: str) -> int:
        return self._meta_value(topic, day, "records")

    def _meta_value(self, topic: str, day: str, name: str) -> int:
        """An integer of a closed day's ``meta.json`` (``records``, ``last_ms``); 0 when unknown."""
        try:
            data = msgspec.json.decode((self.root / topic / f"{day}.meta.json").read_bytes())
        except (OSError, msgspec.DecodeError):
            return 0
        value = data.get(name, 0) if isinstance(data, dict) else 0
        return value if isinstance(value, int) else 0

    def _last_time(self, path: Path) -> int:
        """The newest timestamp (ms) among the last lines of a plain day file; 0 for none."""
        return max((line.timestamp_ms for line in self._tail_lines(path.parent, path.name.split(".", 1)[0])), default=0)

    def _summary(self, topic: str, day: str, type_: type[_T]) -> _T | None:
        path = self.root / topic / f"{day}.summary.json"
        try:
            return msgspec.json.decode(path.read_bytes(), type=type_)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("archive: unreadable summary %s (%s)", path, exc)
            return None

    def _rebuilt_cost_summary(self, topic: str, day: str) -> CostSummary:
        """A closed day's cost summary made again from its compressed records (its own was missing or corrupt)."""
        log.warning("archive: rebuilding the cost summary of %s from its records", day)
        rollup = CostRollup()
        records = 0
        for line in self.read(topic, *_day_bounds(day)):
            records += 1
            event = _decode_or_none(_COST_DECODER, line.raw_value())
            if event is not None:
                rollup.add(event)
        summary = CostSummary(day=day, records=records, buckets=rollup.to_buckets())
        with contextlib.suppress(OSError):
            _write_atomic(self.root / topic / f"{day}.summary.json", msgspec.json.encode(summary))
        return summary

    def control_summary_before(self, topic: str, day: str, *, include: bool = False) -> ControlSummary | None:
        """The latest control summary of a day before ``day`` (or ``day`` itself when ``include``)."""
        folder = self.root / topic
        if not folder.is_dir():
            return None
        names = sorted(p.name for p in folder.glob("*.summary.json"))
        for name in reversed(names):
            found = name.split(".", 1)[0]
            if found < day or (include and found == day):
                return self._summary(topic, found, ControlSummary)
        return None

    def cost_summaries(self, topic: str, since_day: str) -> list[CostSummary]:
        """The cost summaries of the closed days from ``since_day`` on."""
        out = []
        for day in self.days(topic):
            if day >= since_day and (self.root / topic / f"{day}.jsonl.gz").exists():
                found = self._summary(topic, day, CostSummary)
                out.append(found if found is not None else self._rebuilt_cost_summary(topic, day))
        return out

    def apply_retention(self, now: datetime) -> int:
        """Delete closed days past each topic's retention (the latest control summary stays); returns files removed."""
        removed = 0
        for topic in self.topic_dirs():
            keep = self.retention_days.get(self._short(topic))
            if keep is None:
                continue
            cutoff = (now.astimezone(UTC).date() - timedelta(days=keep)).isoformat()
            latest_summary = self.control_summary_before(topic, "9999-12-31") if topic == self.topics.control else None
            for path in (self.root / topic).iterdir():
                day = path.name.split(".", 1)[0]
                if day >= cutoff or path.name.endswith(".jsonl"):
                    continue
                if latest_summary is not None and day == latest_summary.day and path.name.endswith(".summary.json"):
                    continue
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --------------------------------------------------------------------------- reading

    def fold_open_costs(self, path: Path) -> CostRollup:
        """The cost events of an open day's file, rolled up; cached, so a later call reads only the new lines.

        The rollup returned is the cache's own: do not change it. Blocking.
        """
        start, rollup = self._cost_folds.get(path, (0, CostRollup()))
        reached = start
        for raw, reached in _complete_lines(path, start):  # noqa: B007 - the last offset is kept
            event = _decode_or_none(_COST_DECODER, _value_of(raw))
            if event is not None:
                rollup.add(event)
        self._cost_folds[path] = (reached, rollup)
        return rollup

    def fold_open_control(self, path: Path) -> ControlFold:
        """The state commands of an open day's control file, folded from nothing; cached like ``fold_open_costs``."""
        start, fold = self._control_folds.get(path, (0, ControlFold()))
        reached = start
        for raw, reached in _complete_lines(path, start, _STATE_RE):  # noqa: B007 - the last offset is kept
            event = _decode_or_none(_CONTROL_DECODER, _value_of(raw))
            if event is not None:
                fold.add(event)
        self._control_folds[path] = (reached, fold)
        return fold

    def _lines_of(self, path: Path, start: int = 0) -> Iterator[ArchiveLine]:
        """The lines of one day file (plain or gzip), skipping (and counting) those that cannot be read."""
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            handle = opener(path, "rb")
        except FileNotFoundError:
            return
        except OSError as exc:  # a directory, no permission
            log.warning("archive: cannot read %s (%s); skipped", path, exc)
            return
        with handle:
            if start:
                handle.seek(start)
            try:
                for number, raw in enumerate(handle, 1):
                    if not raw.strip():
                        continue
                    try:
                        yield _LINE_DECODER.decode(raw)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        self.skipped_lines += 1
                        log.warning("archive: skipping unreadable line %d of %s (%s)", number, path, exc)
            except (OSError, EOFError) as exc:  # a truncated gzip member (kill -9 while closing)
                self.skipped_lines += 1
                log.warning("archive: %s ends early (%s); read what came before", path, exc)

    def read(self, topic: str, since_ms: int | None = None, until_ms: int | None = None) -> Iterator[ArchiveLine]:
        """``topic``'s archived lines with ``since_ms <= timestamp_ms < until_ms``, once each.

        A record archived twice (redelivered to the archive stage after a
        crash) is returned once, by (``broker_id``, partition, offset). The
        open day's file is entered near ``since_ms`` by a binary search on
        the timestamps, so a read of the last minutes does not scan the day.
        """
        first_day = day_of(since_ms - ORDER_SLACK_MS) if since_ms is not None else None
        last_day = day_of(until_ms + ORDER_SLACK_MS) if until_ms is not None else None
        seen: set[tuple[str, int, int]] = set()
        folder = self.root / topic
        for day in self.days(topic):
            if (first_day is not None and day < first_day) or (last_day is not None and day > last_day):
                continue
            for path in (folder / f"{day}.jsonl.gz", folder / f"{day}.closing", folder / f"{day}.jsonl"):
                if not path.is_file():
                    continue
                start = 0
                if since_ms is not None and path.suffix == ".jsonl":
                    start = _seek_time(path, since_ms - ORDER_SLACK_MS)
                for line in self._lines_of(path, start):
                    if since_ms is not None and line.timestamp_ms < since_ms:
                        continue
                    if until_ms is not None and line.timestamp_ms >= until_ms:
                        continue
                    ident = (line.broker_id, line.partition, line.offset)
                    if ident in seen:
                        continue
                    seen.add(ident)
                    yield line

    def latest_time_ms(self, topics: Sequence[str]) -> int | None:
        """The newest record timestamp among ``topics``' last open days (ms), or ``None`` for an empty archive."""
        newest: int | None = None
        for topic in topics:
            days = self.days(topic)
            if not days:
                continue
            found = max(
                self._last_time(self.root / topic / f"{days[-1]}.jsonl"), self._meta_value(topic, days[-1], "last_ms")
            )
            if found:
                newest = found if newest is None else max(newest, found)
        return newest

    def _tail_lines(self, folder: Path, day: str, block: int = 1 << 16) -> list[ArchiveLine]:
        """The readable lines in the last ``block`` bytes of a day's plain file (none for a closed day)."""
        raw = folder / f"{day}.jsonl"
        if not raw.exists():
            return []
        with raw.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - block))
            data = handle.read()
        out = []
        for chunk in data.split(b"\n")[1 if size > block else 0 :]:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                if chunk.strip():
                    out.append(_LINE_DECODER.decode(chunk))
        return out

    def stats(self) -> list[DayStats]:
        """Size and records of every topic and day the archive holds."""
        out = []
        for topic in self.topic_dirs():
            folder = self.root / topic
            for day in self.days(topic):
                plain, packed = folder / f"{day}.jsonl", folder / f"{day}.jsonl.gz"
                size = sum(p.stat().st_size for p in (plain, packed) if p.exists())
                records = self._meta_records(topic, day) if packed.exists() else 0
                if plain.exists():
                    records += _count_lines(plain)
                out.append(DayStats(topic=topic, day=day, records=records, bytes=size, closed=not plain.exists()))
        return out


def _decode_or_none(decoder: msgspec.json.Decoder[_T], raw: bytes) -> _T | None:
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _line_time(handle: IO[bytes], position: int) -> tuple[int, int] | None:
    """(timestamp, start) of the first whole line at or after ``position``, or ``None`` past the end."""
    handle.seek(position)
    if position:
        handle.readline()  # the rest of the line we landed in
    while True:
        start = handle.tell()
        raw = handle.readline()
        if not raw:
            return None
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            return _TIME_DECODER.decode(raw).timestamp_ms, start


def _seek_time(path: Path, since_ms: int) -> int:
    """A byte offset in an open day's file at or before the first line with ``timestamp_ms >= since_ms``.

    Binary search on the (nearly ordered) timestamps; callers still filter
    each line, and ``ORDER_SLACK_MS`` covers records out of order.
    """
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        low, high = 0, handle.tell()
        while high - low > 1 << 16:
            middle = (low + high) // 2
            found = _line_time(handle, middle)
            if found is None or found[0] >= since_ms:
                high = middle
            else:
                low = middle
        return _line_start(handle, low)


def _line_start(handle: IO[bytes], position: int) -> int:
    if position == 0:
        return 0
    handle.seek(position)
    handle.readline()
    return handle.tell()
