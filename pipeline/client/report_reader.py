"""Client side of costs and budgets: fold ``ai.costs`` and ``ai.control`` into reports; publish ``set_budget``.

A ``ReportReader`` reads both topics as a broadcast from the beginning (any
process can do it: the manager, the CLI, a dashboard) and folds them into a
``pipeline.client.cost_book.CostBook``. ``sync()`` waits until the reader has read
everything written before the call, so a report reflects every cost event
acknowledged before it was asked for.

"Caught up" is decided without end offsets (the embedded broker's are
unreliable, EMBEDDED-BROKER.md): a reader has read everything written before
a moment T when two polls in a row that started after T came back empty, or
brought fewer records than asked for and only records written at or after T
(record timestamps). The second poll covers a fetch that was already in
flight at T; judging freshness against T (not against each poll's start)
lets a reader of a busy topic catch up too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import msgspec
from msgspec import UNSET, UnsetType

from pipeline.bus.protocol import Bus, BusError, Outgoing
from pipeline.bus.topics import Topics
from pipeline.client.cost_book import CostBook
from pipeline.runtime.config import PROVIDER_NAMES
from pipeline.runtime.logs import OUTAGE
from pipeline.runtime.messages import CONTROL_DECODER, COST_DECODER
from pipeline.runtime.runner import SCHEMA_HEADER, encode, now_utc, publish_with_retry
from schemas import SCHEMA_VERSION
from schemas.events import SetBudget
from stages.rules.ledger import validate_scope

log = logging.getLogger("aipipe.reports")

#: How long one poll waits for records (ms); two empty polls in a row mean "caught up".
POLL_MS = 50
_MAX_RECORDS = 1000


class _Poll:
    """One poll of a topic reader: when it started (epoch ms), how many records, the oldest one's timestamp."""

    __slots__ = ("count", "oldest_ms", "started_ms")

    def __init__(self, started_ms: int, count: int, oldest_ms: int) -> None:
        self.started_ms = started_ms
        self.count = count
        self.oldest_ms = oldest_ms

    def current_at(self, moment_ms: int) -> bool:
        """Whether this poll shows the reader had nothing older than ``moment_ms`` left to read."""
        if self.started_ms < moment_ms:
            return False
        return self.count == 0 or (self.count < _MAX_RECORDS and self.oldest_ms >= moment_ms)


class _Cursor:
    """The recent polls of one topic reader, newest last (cleared when a fetch fails)."""

    def __init__(self) -> None:
        self.polls: deque[_Poll] = deque(maxlen=64)

    def caught_up(self, moment_ms: int) -> bool:
        """Whether two polls in a row started after ``moment_ms`` found the reader current."""
        return any(a.current_at(moment_ms) and b.current_at(moment_ms) for a, b in pairwise(self.polls))


class ReportReader:
    """Folds ``ai.costs`` and ``ai.control`` into a ``CostBook`` as they arrive.

    Args:
        bus: a started bus.
        topics: topic names.
        tz: time zone of the book's calendar windows (``budget.timezone``).
    """

    def __init__(self, bus: Bus, topics: Topics, tz: ZoneInfo | None = None) -> None:
        self.bus = bus
        self.topics = topics
        self.book = CostBook(tz)
        self._cursors = {topics.costs: _Cursor(), topics.control: _Cursor()}
        self._changed = anyio.Event()
        self._stop = anyio.Event()

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read both topics until ``stop()``; reports started once both readers are open.

        Raises:
            BusError: when a reader cannot be opened.
        """
        costs = await self.bus.consumer([self.topics.costs], group=None, from_beginning=True)
        try:
            control = await self.bus.consumer([self.topics.control], group=None, from_beginning=True)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await costs.stop()
            raise
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read, costs, self.topics.costs, self._fold_cost)
                tg.start_soon(self._read, control, self.topics.control, self._fold_control)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await costs.stop()
                await control.stop()

    def _fold_cost(self, raw: bytes) -> None:
        self.book.add_cost(COST_DECODER.decode(raw))

    def _fold_control(self, raw: bytes) -> None:
        self.book.add_control(CONTROL_DECODER.decode(raw))

    async def _read(self, consumer: Any, topic: str, fold: Callable[[bytes], None]) -> None:
        cursor = self._cursors[topic]
        while True:
            started_ms = int(time.time() * 1000)
            try:
                records = await consumer.getmany(POLL_MS, max_records=_MAX_RECORDS)
            except BusError as exc:
                log.warning("report reader %s: fetch failed (%s); retrying", topic, exc, extra=OUTAGE)
                cursor.polls.clear()
                await anyio.sleep(1.0)
                continue
            for record in records:
                try:
                    fold(record.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # the topic's owner dead-letters it; a reader skips it
            oldest = min((r.timestamp_ms for r in records), default=0)
            cursor.polls.append(_Poll(started_ms, len(records), oldest))
            changed, self._changed = self._changed, anyio.Event()
            changed.set()

    async def sync(self, timeout_s: float = 10.0) -> bool:
        """Wait until both topics are read up to now; ``False`` if that took longer than ``timeout_s`` (s)."""
        asked_ms = int(time.time() * 1000)
        with anyio.move_on_after(timeout_s):
            while not all(c.caught_up(asked_ms) for c in self._cursors.values()):
                await self._changed.wait()
            return True
        log.warning("report reader: not caught up after %.1fs; answering with what was read", timeout_s)
        return False

    async def wait_for(self, predicate: Callable[[CostBook], bool], timeout_s: float) -> bool:
        """Wait until ``predicate(book)`` holds; ``False`` after ``timeout_s`` (s)."""
        with anyio.move_on_after(timeout_s):
            while not predicate(self.book):
                await self._changed.wait()
            return True
        return False


def set_budget_event(
    scope: str,
    daily: float | UnsetType | None = UNSET,
    weekly: float | UnsetType | None = UNSET,
    monthly: float | UnsetType | None = UNSET,
    *,
    at: datetime | None = None,
    deployments: Iterable[str] = PROVIDER_NAMES,
) -> SetBudget:
    """A validated ``set_budget`` command (USD per window): only the windows it names change (DESIGN A6).

    A window left ``UNSET`` keeps its limit; ``None`` removes it; a number sets
    it. ``deployments`` are the deployment names a provider scope may name
    (the configuration's).

    Raises:
        ValueError: for an unknown scope form, a negative or non-finite amount,
            or a command that names no window.
    """
    validate_scope(scope, tuple(deployments))
    named = {
        name: value
        for name, value in (("daily", daily), ("weekly", weekly), ("monthly", monthly))
        if value is not UNSET
    }
    if not named:
        raise ValueError("name at least one window to change (daily, weekly, monthly), or clear the scope's limits")
    for name, value in named.items():
        if value is not None and not (isinstance(value, int | float) and 0 <= value < float("inf")):
            raise ValueError(f"{name} budget must be a finite number >= 0 (USD), got {value!r}")
    return SetBudget(scope=scope, daily_usd=daily, weekly_usd=weekly, monthly_usd=monthly, at=at or now_utc())


async def publish_control(bus: Bus, topics: Topics, event: Any, key: str = "*") -> None:
    """Publish one command or event on ``ai.control`` (retried until acknowledged)."""
    await publish_with_retry(
        bus,
        Outgoing(
            topic=topics.control,
            value=encode(event),
            key=key.encode(),
            headers=((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()),),
        ),
    )


def limits_applied(command: SetBudget) -> Callable[[CostBook], bool]:
    """A ``wait_for`` predicate: some gate published a ``budget_status`` with ``command``'s limits since it."""
    named = {"daily": command.daily_usd, "weekly": command.weekly_usd, "monthly": command.monthly_usd}
    wanted = {w: v for w, v in named.items() if v is not UNSET}

    def applied(book: CostBook) -> bool:
        status = book.statuses.get(command.scope)
        if status is None or (command.at is not None and status.at < command.at):
            return False
        return all(status.windows[w].limit_usd == v for w, v in wanted.items() if w in status.windows)

    return applied


__all__ = ["ReportReader", "limits_applied", "publish_control", "set_budget_event"]
