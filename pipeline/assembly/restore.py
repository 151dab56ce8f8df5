"""Restore (DESIGN A11): put the compact state of the archive into a fresh embedded broker.

The embedded broker keeps everything in memory, so a new one starts empty.
Before any stage starts on it (and before the runtime file names it),
``restore`` publishes, each once and marked with the ``aipipe-restored``
header (the archive does not store them again):

* on ``control``: one ``set_budget`` per scope (every window ever set,
  merged), the latest ``set_strategy``, the circuits as the latest snapshots
  and transitions left them;
* on ``costs``: the spend of every budget window still open, rolled up
  (``stages.rules.archive_state.restored_cost_events``: a few events per
  user, provider, model and day), and, as they were, the cost events of the
  requests restored below;
* on ``requests``: every request of the last hour of archived traffic (the
  longest deadline a request may have) that has no response, with its
  original timestamp and key; its deadline still counts from when it was
  first received (header ``aipipe-received-at-ms``). A request whose deadline
  has passed is answered ``timeout`` through the cost-recorder instead, and
  no provider is called for it again.

History stays in the archive: what is read is a few summary files, the open
day of ``control`` and ``costs``, and the last hour of ``requests`` and
``responses`` (entered by a binary search on time), so a restart takes about
the same time whatever the archive holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import msgspec

from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.protocol import Bus, Outgoing, Record
from pipeline.bus.topics import Topics
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.messages import error_envelope
from pipeline.runtime.runner import SCHEMA_HEADER, encode, publish_with_retry
from pipeline.runtime.settings import Settings
from pipeline.stores.archive_store import FileArchive, as_record
from schemas import SCHEMA_VERSION
from schemas.archive import RECEIVED_AT_HEADER, RESTORED_HEADER, ControlSummary
from schemas.events import ControlEvent, CostEvent
from schemas.request import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS
from schemas.response import ErrorInfo
from stages.rules.archive_state import ControlFold, CostRollup, open_windows_start, restored_cost_events
from stages.rules.ledger import zone

log = logging.getLogger("aipipe.restore")

_CONTROL_DECODER = msgspec.json.Decoder(ControlEvent)
_COST_DECODER = msgspec.json.Decoder(CostEvent)
#: Records published at once while restoring.
_PUBLISH_CONCURRENCY = 64


class _RequestHead(msgspec.Struct):
    id: object = None
    timeout_ms: object = None


_HEAD_DECODER = msgspec.json.Decoder(_RequestHead)


@dataclass
class RestorePlan:
    """What a restore publishes, and what it read (counts) to decide it."""

    messages: list[Outgoing] = field(default_factory=list)
    control_events: int = 0
    cost_events: int = 0
    rolled_up_costs: int = 0
    pending_requests: int = 0
    expired_requests: int = 0
    skipped_lines: int = 0

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.control_events} control command(s), {self.cost_events} cost event(s) "
            f"(standing for {self.rolled_up_costs} archived), {self.pending_requests} unanswered request(s) "
            f"re-published, {self.expired_requests} answered timeout"
            + (f", {self.skipped_lines} unreadable line(s) skipped" if self.skipped_lines else "")
        )


def _restored_headers(extra: tuple[tuple[str, bytes], ...] = ()) -> tuple[tuple[str, bytes], ...]:
    return ((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()), (RESTORED_HEADER, b"1"), *extra)


def plan_restore(
    archive: FileArchive, topics: Topics, config: PipelineConfig, now: datetime, *, close_days: bool = False
) -> RestorePlan:
    """Read the archive and decide what to publish (blocking: run it in a worker thread).

    Args:
        archive: the archive to read.
        topics: the pipeline's topic names.
        config: the configuration (``budget.timezone`` for the open windows).
        now: the time of the restore (aware).
        close_days: close the days that ended first. Off by default: the archive stage closes them in
            the background, and a day left open is entered by a binary search instead of decompressed whole.
    """
    plan = RestorePlan()
    skipped_before = archive.skipped_lines
    archive.recover()  # a day close a crash interrupted: finished first, so nothing is counted twice
    if close_days:
        archive.close_days(now)
    today = now.astimezone(UTC).date().isoformat()
    _plan_control(plan, archive, topics, today)
    pending = _plan_requests(plan, archive, topics, now)
    _plan_costs(plan, archive, topics, config, now, pending)
    plan.skipped_lines = archive.skipped_lines - skipped_before
    return plan


def _plan_control(plan: RestorePlan, archive: FileArchive, topics: Topics, today: str) -> None:
    summary: ControlSummary | None = archive.control_summary_before(topics.control, today, include=True)
    fold = ControlFold(summary)
    for day in archive.days(topics.control):
        path = archive.root / topics.control / f"{day}.jsonl"
        if not path.is_file() or (summary is not None and day < summary.day):
            continue
        fold = fold.merged(archive.fold_open_control(path))  # cached: a rotation reads only the new lines
    for event in fold.events():
        plan.messages.append(Outgoing(topic=topics.control, value=encode(event), key=b"*", headers=_restored_headers()))
        plan.control_events += 1


def _plan_requests(plan: RestorePlan, archive: FileArchive, topics: Topics, now: datetime) -> set[str]:
    """Unanswered requests of the last ``MAX_TIMEOUT_MS`` of archived traffic: re-published, or answered timeout."""
    newest = archive.latest_time_ms([topics.requests, topics.responses, topics.control, topics.costs])
    if newest is None:
        return set()
    since = newest - MAX_TIMEOUT_MS
    answered = {_id_of(line.raw_value()) for line in archive.read(topics.responses, since_ms=since)}
    pending: dict[str, Record] = {}
    for line in archive.read(topics.requests, since_ms=since):
        record = as_record(topics.requests, line)
        request_id = _id_of(record.value) or (record.key.decode("utf-8", "replace") if record.key else None)
        if request_id is None or request_id in answered or request_id in pending:
            continue
        pending[request_id] = record
    now_ms = int(now.timestamp() * 1000)
    for request_id, record in pending.items():
        timeout_ms = _timeout_of(record.value)
        if record.timestamp_ms + timeout_ms <= now_ms:
            error = ErrorInfo(
                type="timeout",
                message=f"the request's deadline ({timeout_ms} ms from {_iso(record.timestamp_ms)}) passed while "
                "the pipeline was stopped; it was not sent to a provider again",
            )
            envelope = error_envelope(request_id, error)
            envelope.received_at_ms = record.timestamp_ms
            envelope.deadline_at_ms = record.timestamp_ms + timeout_ms
            envelope.finished_at_ms = now_ms
            plan.messages.append(
                Outgoing(
                    topic=topics.stage_record,
                    value=encode(envelope),
                    key=record.key if record.key is not None else request_id.encode(),
                    headers=_restored_headers(),
                )
            )
            plan.expired_requests += 1
            continue
        kept = tuple((n, v) for n, v in record.headers if n not in (RESTORED_HEADER, RECEIVED_AT_HEADER))
        plan.messages.append(
            Outgoing(
                topic=topics.requests,
                value=record.value,
                key=record.key,
                headers=(*kept, (RESTORED_HEADER, b"1"), (RECEIVED_AT_HEADER, str(record.timestamp_ms).encode())),
                timestamp_ms=record.timestamp_ms,
            )
        )
        plan.pending_requests += 1
    return set(pending)


def _plan_costs(
    plan: RestorePlan, archive: FileArchive, topics: Topics, config: PipelineConfig, now: datetime, pending: set[str]
) -> None:
    tz = zone(config.budget.timezone)
    oldest = open_windows_start(now, tz)
    since_day = (oldest.astimezone(UTC) - timedelta(days=1)).date().isoformat()
    raw: list[tuple[CostEvent, Record]] = []
    buckets = [b for s in archive.cost_summaries(topics.costs, since_day) for b in s.buckets]
    for day in archive.days(topics.costs):
        path = archive.root / topics.costs / f"{day}.jsonl"
        if day < since_day or not path.is_file():
            continue
        buckets += archive.fold_open_costs(path).to_buckets()  # cached: a rotation reads only the new lines
        if pending:  # a restored request's cost event goes back as it was (the recorder must find its id)...
            recent = int((now - timedelta(milliseconds=2 * MAX_TIMEOUT_MS)).timestamp() * 1000)
            back_out = CostRollup()
            for line in archive.read(topics.costs, since_ms=recent):
                event = _decode_cost(line.raw_value())
                if event is not None and event.id in pending and event.id not in {e.id for e, _ in raw}:
                    raw.append((event, as_record(topics.costs, line)))
                    back_out.add(event, sign=-1)  # ... and out of the roll-up
            buckets += back_out.to_buckets()
    plan.rolled_up_costs = sum(b.requests for b in buckets)
    events = restored_cost_events(buckets, now, tz)
    for event in events:
        plan.messages.append(
            Outgoing(
                topic=topics.costs,
                value=encode(event),
                key=event.id.encode(),
                headers=_restored_headers(),
                timestamp_ms=int(event.at.timestamp() * 1000),
            )
        )
    for _event, record in raw:
        plan.messages.append(
            Outgoing(
                topic=topics.costs,
                value=record.value,
                key=record.key,
                headers=_restored_headers(),
                timestamp_ms=record.timestamp_ms,
            )
        )
    plan.cost_events = len(events) + len(raw)


def _decode_cost(raw: bytes) -> CostEvent | None:
    try:
        return _COST_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _id_of(raw: bytes) -> str | None:
    try:
        found = _HEAD_DECODER.decode(raw).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return found if isinstance(found, str) and found else None


def _timeout_of(raw: bytes) -> int:
    try:
        found = _HEAD_DECODER.decode(raw).timeout_ms
    except (msgspec.DecodeError, msgspec.ValidationError):
        return DEFAULT_TIMEOUT_MS
    if isinstance(found, int) and not isinstance(found, bool) and 0 < found <= MAX_TIMEOUT_MS:
        return found
    return DEFAULT_TIMEOUT_MS


def _iso(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat().replace("+00:00", "Z")


async def restore(bus: Bus, archive: FileArchive, topics: Topics, config: PipelineConfig) -> RestorePlan:
    """Publish the archive's compact state into ``bus`` (a fresh broker); returns what was done.

    Control commands first, then costs, then requests (so the budget gate has
    its limits and spend before the first restored request reaches it).

    Raises:
        BusError: when the broker refuses a record permanently.
    """
    started = time.monotonic()
    await bus.ensure_topics(topics.all())
    plan = await anyio.to_thread.run_sync(plan_restore, archive, topics, config, datetime.now(UTC))
    order = {topics.control: 0, topics.costs: 1, topics.stage_record: 2, topics.requests: 3}
    plan.messages.sort(key=lambda m: order.get(m.topic, 4))
    for topic in sorted({m.topic for m in plan.messages}, key=lambda t: order.get(t, 4)):
        batch = [m for m in plan.messages if m.topic == topic]
        for i in range(0, len(batch), _PUBLISH_CONCURRENCY):
            async with anyio.create_task_group() as tg:
                for message in batch[i : i + _PUBLISH_CONCURRENCY]:
                    tg.start_soon(publish_with_retry, bus, message)
    log.info("restored from the archive in %.2f s: %s", time.monotonic() - started, plan.summary())
    return plan


async def restore_into(
    address: str, env: Mapping[str, str], settings: Settings, config: PipelineConfig, archive: FileArchive | None = None
) -> RestorePlan | None:
    """Restore the archive (``settings.archive_path``, or ``archive``) into the fresh broker at ``address``.

    Returns ``None`` (and publishes nothing) when the archive is empty. Give
    the process's own ``archive`` so that what this restore folds is cached
    for the rotations that follow.

    Raises:
        BusError: when the broker cannot be reached or refuses a record.
    """
    if archive is None:
        archive = FileArchive(settings.archive_path, settings.topics, retention_days=config.archive.retention())
    if not archive.topic_dirs():
        return None
    bus = KafkaBus(address, KafkaSettings.from_env(env).for_embedded(env))
    await bus.start()
    try:
        return await restore(bus, archive, settings.topics, config)
    finally:
        await bus.stop()
