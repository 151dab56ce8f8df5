"""The stage runner: owns consuming, decoding, producing, committing and dead-lettering.

A stage holds only its decision (``Stage.handle``); the runner does the rest
(DESIGN B1, B3):

* consumes the stage's input topic in the stage's consumer group;
* handles up to ``max_in_flight`` messages at once (a slow provider call does
  not hold up the next message);
* publishes a message's outputs and waits for their acknowledgement before
  the message counts as done; publishing is retried until it succeeds or the
  runner stops, so a broker outage delays work but loses none;
* commits, per partition, only offsets below the oldest unfinished message;
* sends an undecodable or invalid value to the dead-letter topic with its
  origin and raw bytes, and lets the stage answer it (``Stage.reject``) so a
  request id always gets a response; a stage that raises on one message has
  that message answered as a ``server_error`` and never stops;
* on stop: stops fetching, finishes in-flight work within ``grace_s``,
  commits, and leaves the group.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import msgspec

from pipeline.bus.protocol import Bus, BusError, Consumer, Headers, Outgoing, PermanentBusError, Record, TopicPartition
from pipeline.runtime import telemetry
from pipeline.runtime.logs import OUTAGE
from schemas import SCHEMA_VERSION, DeadLetter
from schemas.response import ErrorInfo

log = logging.getLogger("aipipe.runner")

_ENCODER = msgspec.json.Encoder(decimal_format="number")
SCHEMA_HEADER = "aipipe-schema"
#: Longest wait (s) for the last commit, and for leaving the group, when a runner stops.
FINAL_COMMIT_TIMEOUT_S = 3.0
#: Longest wait (s) for messages of partitions a rebalance takes away, before committing them.
REVOKE_GRACE_S = 10.0
TRACE_HEADER = "traceparent"
#: The headers every message the pipeline writes carries (built once, not per message).
_HEADERS: tuple[tuple[str, bytes], ...] = ((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()),)


def encode(value: Any) -> bytes:
    """JSON bytes of a msgspec struct (or builtins), the wire format of every topic."""
    return _ENCODER.encode(value)


def now_utc() -> datetime:
    """The current time, timezone-aware UTC (encoded as RFC 3339 by msgspec)."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Emit:
    """One output of a stage: a struct to publish on ``topic`` under ``key``."""

    topic: str
    key: str | None
    value: Any


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What the runner knows of the message being handled."""

    record: Record
    stage: str
    publish: Callable[[Emit], Awaitable[None]] | None = None
    publish_soon: Callable[[Emit], None] | None = None

    async def emit_now(self, output: Emit) -> None:
        """Publish ``output`` and wait for its acknowledgement before going on (e.g. stream chunks, in order)."""
        if self.publish is not None:
            await self.publish(output)

    def emit_soon(self, output: Emit) -> None:
        """Start publishing ``output`` now without waiting for it (e.g. a health event per attempt).

        The message still counts as done only once ``output`` is acknowledged,
        with the stage's own outputs; the stage goes on meanwhile, so the
        acknowledgement is not on the request's path. Without a runner
        (``publish_soon`` unset) it falls back to nothing, like ``emit_now``.
        """
        if self.publish_soon is not None:
            self.publish_soon(output)

    @property
    def traceparent(self) -> bytes | None:
        """The W3C ``traceparent`` header of the input, if any."""
        return self.record.header(TRACE_HEADER)


#: How many abandoned request ids the shutdown line names.
ABANDONED_IDS_SHOWN = 50

#: The context given to ``Stage.reject`` for an answer the runner sends on its own (no input record at hand).
_NO_CONTEXT = MessageContext(record=Record(topic="", partition=-1, offset=-1, key=None, value=b""), stage="")


class InvalidInput(Exception):
    """Raised by ``Stage.decode`` (or ``handle``) for a value that cannot be accepted.

    ``request_id`` is the id the value carries, when it could be read.
    """

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


class Stage(Protocol):
    """A stage: one decision over one input topic.

    A stage may also name several topics in ``input_topics`` (the archive);
    ``input_topic`` is then the first of them.
    """

    name: str
    input_topic: str

    def decode(self, raw: bytes) -> Any:
        """Decode and validate the input value.

        Raises:
            InvalidInput: when the value cannot be decoded or validated.
        """
        ...

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Decide what to publish for one decoded input."""
        ...

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """Outputs that answer ``request_id`` with ``error`` (for invalid input or a stage failure)."""
        ...


# A stage may also define ``async def background(self, publish) -> None``: the
# pipeline runs it beside the stage's runner (timers, probes), with ``publish``
# sending one ``Emit``. It must return when cancelled.


def decode_or_invalid(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """Decode ``raw`` with ``decoder``; any failure becomes ``InvalidInput`` with the id if readable.

    Raises:
        InvalidInput: with msgspec's message (which names the bad field's path).
    """
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidInput(str(exc), request_id=_sniff_id(raw)) from exc


class _IdOnly(msgspec.Struct):
    id: Any = None


_ID_DECODER = msgspec.json.Decoder(_IdOnly)


def sniff_request_id(raw: bytes) -> str | None:
    """The string ``id`` field of a JSON object, if one can be read from ``raw`` (else ``None``)."""
    return _sniff_id(raw)


def _sniff_id(raw: bytes) -> str | None:
    try:
        found = _ID_DECODER.decode(raw).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return found if isinstance(found, str) and found else None


@dataclass
class _PartitionTracker:
    """Offsets in flight for one partition; the committable offset is below the oldest one."""

    in_flight: set[int] = field(default_factory=set)
    highest_done: int = -1
    committed: int = -1

    def committable(self) -> int | None:
        target = min(self.in_flight) if self.in_flight else self.highest_done + 1
        if target > self.committed and target > 0:
            return target
        return None


class StageRunner:
    """Runs one ``Stage`` over the bus.

    Args:
        bus: the bus to consume from and publish to.
        stage: the stage's decision.
        group: consumer group id (one per stage, e.g. ``aipipe.executor``).
        deadletter_topic: where undecodable values go.
        keyed_by_request_id: whether the input's key is a request id.
        carries_request_key: which output topics take the input record's key bytes
            verbatim (so a response is keyed exactly as its request was, whatever
            the bytes); ``None``: none. Applies only when ``keyed_by_request_id``
            and the input has a key; other outputs keep the stage's own key.
        beside_path: output topics beside the request's path (stream chunks): one
            that cannot be published is dead-lettered, but does not answer the
            request, whose own outcome still follows; ``None``: none.
        max_in_flight: messages handled at once.
        commit_interval_s: how often offsets are committed (s).
        grace_s: time given to in-flight work on stop (s).
        fetch_timeout_ms: longest wait of one fetch call for records (ms).
        background: the stage is off a request's path (circuit breaker, health
            monitor, archive): its consumer may fetch less often (``Bus.consumer``).
    """

    def __init__(
        self,
        bus: Bus,
        stage: Stage,
        *,
        group: str,
        deadletter_topic: str,
        keyed_by_request_id: bool = True,
        carries_request_key: Callable[[str], bool] | None = None,
        beside_path: Callable[[str], bool] | None = None,
        max_in_flight: int = 256,
        commit_interval_s: float = 0.2,
        grace_s: float = 10.0,
        fetch_timeout_ms: int = 200,
        background: bool = False,
    ) -> None:
        self.bus = bus
        self.stage = stage
        self.group = group
        self.deadletter_topic = deadletter_topic
        self.keyed_by_request_id = keyed_by_request_id
        self.carries_request_key = carries_request_key
        self.beside_path = beside_path
        self.max_in_flight = max_in_flight
        self.commit_interval_s = commit_interval_s
        self.grace_s = grace_s
        self._window_s: float | None = None  # the drain window named by the abandon line
        self._grace_scope: anyio.CancelScope | None = None
        self.fetch_timeout_ms = fetch_timeout_ms
        self.background = background
        self._trackers: dict[TopicPartition, _PartitionTracker] = {}
        self._keys: dict[tuple[str, int, int], str | None] = {}  # in-flight messages -> their keys
        self._stopping = anyio.Event()
        self._paused = False
        self._parked = False
        self._resumed = anyio.Event()
        self._idle = anyio.Event()
        self._in_flight = 0
        self.processed = 0
        self.dead_lettered = 0
        self._consumer: Consumer | None = None
        self.finished = anyio.Event()
        self.last_record_at = time.monotonic()
        #: When a fetch last came back empty (monotonic s): the runner had read its topics to the end then.
        self.last_empty_fetch_at = 0.0
        #: ``messaging.system`` of this runner's spans: ``kafka``, or the in-process bus's own name.
        self.messaging_system: str = getattr(bus, "messaging_system", "kafka")

    def stop(self) -> None:
        """Ask the runner to stop fetching and wind down (in-flight work gets up to ``grace_s``)."""
        self._stopping.set()

    def pause(self) -> None:
        """Stop fetching new records until ``resume`` (work in flight goes on); used by a broker rotation."""
        if not self._paused:
            self._paused = True
            self._resumed = anyio.Event()

    def resume(self) -> None:
        """Fetch again after ``pause``."""
        self._paused = False
        self._resumed.set()

    async def restart_positions(self) -> None:
        """The broker was replaced by an empty one: forget this runner's offsets and read every partition from 0."""
        reached = {tp: t.highest_done + 1 for tp, t in self._trackers.items() if t.highest_done >= 0}
        self._trackers.clear()
        consumer = self._consumer
        restart = getattr(consumer, "restart_from_zero", None)
        if restart is not None:
            await restart(reached)

    def abandon(self, window_s: float | None = None) -> None:
        """Stop at once: stop fetching and give up the messages in flight now, their offsets uncommitted.

        The abandoned ids are logged in one line (``window_s``: the drain window
        that ended, for that line; default ``grace_s``). Idempotent.
        """
        if window_s is not None:
            self._window_s = window_s
        self._stopping.set()
        self.grace_s = 0.0
        if self._grace_scope is not None:
            self._grace_scope.cancel()

    def assignment(self) -> frozenset[TopicPartition]:
        """The input partitions this runner's group member holds now (empty before ``run`` and after stop)."""
        consumer = self._consumer
        return consumer.assignment() if consumer is not None else frozenset()

    @property
    def paused(self) -> bool:
        """Whether ``pause()`` holds the fetching."""
        return self._paused

    @property
    def parked(self) -> bool:
        """Paused and out of any fetch, with nothing in flight: the broker can be replaced under it."""
        return self._paused and self._parked and self._in_flight == 0

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stopping.is_set()

    def quiet_for_s(self) -> float:
        """Seconds since the last record was fetched, or 0 while messages are in flight."""
        if self._in_flight:
            return 0.0
        return time.monotonic() - self.last_record_at

    @property
    def in_flight(self) -> int:
        """Messages being handled now (metric ``aipipe.stage.in_flight``)."""
        return self._in_flight

    def lag(self) -> dict[TopicPartition, int]:
        """Per input partition this runner has read from: records not yet handled (metric ``aipipe.consumer.lag``).

        The partition's end offset as of the latest fetch (the consumer's
        ``highwater``) minus the oldest unfinished offset (or the next one
        after the highest finished). Partitions not read from since start, or
        whose end offset is unknown, are left out. Safe to call from another
        thread (the metrics endpoint); may raise ``RuntimeError`` when the
        event loop changed a tracker meanwhile.
        """
        consumer = self._consumer
        highwater = getattr(consumer, "highwater", None)
        if consumer is None or highwater is None:
            return {}
        out: dict[TopicPartition, int] = {}
        for tp in consumer.assignment():
            tracker = self._trackers.get(tp)
            end = highwater(tp) if tracker is not None else None
            if tracker is None or end is None:
                continue
            pending = tuple(tracker.in_flight)
            position = min(pending) if pending else tracker.highest_done + 1
            out[tp] = max(int(end) - position, 0)
        return out

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume until ``stop()``; reports started once the consumer is open.

        Raises:
            BusError: when the consumer cannot be opened.
        """
        topics = list(getattr(self.stage, "input_topics", None) or [self.stage.input_topic])
        consumer = await self.bus.consumer(topics, group=self.group, background=self.background)
        self._consumer = consumer
        if hasattr(consumer, "on_revoke"):  # Kafka: hand over finished work before a rebalance moves it

            async def on_revoke(partitions: frozenset[TopicPartition]) -> None:
                await self._hand_over(consumer, partitions)

            consumer.on_revoke = on_revoke
        limiter = anyio.Semaphore(self.max_in_flight)
        # One asyncio task per message, tracked here rather than in an anyio task group: anyio's
        # start_soon costs about 13 us more per task (a TaskHandle, a cancel scope, an Event), which
        # was 5-7 spawns per request on the hot path. Stop and cancellation still end every task.
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        task_done = self._task_done(tasks)
        task_status.started()
        log.debug("stage %s consuming %s in group %s", self.stage.name, self.stage.input_topic, self.group)
        try:
            async with anyio.create_task_group() as work:
                work.start_soon(self._commit_loop, consumer)
                while not self._stopping.is_set():
                    if self._paused:
                        self._parked = True  # not inside a fetch: nothing more comes from the broker
                        with anyio.move_on_after(0.1):
                            await self._resumed.wait()
                        self._parked = False
                        continue
                    try:
                        records = await consumer.getmany(self.fetch_timeout_ms, max_records=500)
                    except BusError as exc:
                        log.warning("stage %s: fetch failed (%s); retrying", self.stage.name, exc, extra=OUTAGE)
                        await self._sleep_or_stop(1.0)
                        continue
                    if records:
                        self.last_record_at = time.monotonic()
                    else:
                        self.last_empty_fetch_at = time.monotonic()
                    for record in records:
                        try:  # no checkpoint (a loop iteration) per record while there is room
                            limiter.acquire_nowait()
                        except anyio.WouldBlock:
                            await limiter.acquire()
                        self._begin(record)
                        task = loop.create_task(self._process(record, limiter))
                        tasks.add(task)
                        task.add_done_callback(task_done)
                with anyio.move_on_after(self.grace_s) as self._grace_scope:
                    while self._in_flight:
                        await self._idle.wait()
                self._grace_scope = None
                if self._in_flight:
                    self._log_abandoned()
                work.cancel_scope.cancel()
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            # Bounded: after a broker restart the group may be gone and a commit would retry for long.
            with anyio.move_on_after(FINAL_COMMIT_TIMEOUT_S, shield=True):
                await self._commit(consumer)
            with anyio.move_on_after(FINAL_COMMIT_TIMEOUT_S, shield=True):
                await consumer.stop()
            self.finished.set()

    def _task_done(self, tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("stage %s: message task failed", self.stage.name, exc_info=task.exception())

        return done

    async def _sleep_or_stop(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    def _log_abandoned(self) -> None:
        """One line: the messages the drain window did not finish (left uncommitted for the next owner)."""
        keys = [k or "-" for k in self._keys.values()]
        shown = ", ".join(keys[:ABANDONED_IDS_SHOWN]) + (
            f" (and {len(keys) - ABANDONED_IDS_SHOWN} more)" if len(keys) > ABANDONED_IDS_SHOWN else ""
        )
        log.warning(
            "stage %s: drain window of %.0f s ended with %d message(s) in flight; abandoned and left uncommitted "
            "(the next owner of their partitions takes them): %s",
            self.stage.name,
            self._window_s if self._window_s is not None else self.grace_s,
            len(keys),
            shown,
        )

    def _begin(self, record: Record) -> None:
        tracker = self._trackers.setdefault((record.topic, record.partition), _PartitionTracker())
        tracker.in_flight.add(record.offset)
        self._keys[(record.topic, record.partition, record.offset)] = (
            record.key.decode("utf-8", "replace") if record.key is not None else None
        )
        self._in_flight += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _finish(self, record: Record, *, done: bool = True) -> None:
        """A message is no longer being handled: ``done`` (committable), or abandoned (its offset stays held)."""
        self._keys.pop((record.topic, record.partition, record.offset), None)
        tracker = self._trackers.get((record.topic, record.partition))
        if tracker is not None and done:  # None: the partition was revoked while this message ran
            tracker.in_flight.discard(record.offset)
            tracker.highest_done = max(tracker.highest_done, record.offset)
        self._in_flight -= 1
        self.processed += 1
        if self._in_flight == 0:
            self._idle.set()

    async def _hand_over(self, consumer: Consumer, partitions: frozenset[TopicPartition]) -> None:
        """Hand ``partitions`` over to another member without redoing finished work.

        Lets their messages finish (up to ``REVOKE_GRACE_S``), commits what is
        done and forgets them, so the new owner does not call a provider a
        second time (and pay twice) for work already answered.
        """
        with anyio.move_on_after(REVOKE_GRACE_S):
            while any((t := self._trackers.get(tp)) is not None and t.in_flight for tp in partitions):
                await anyio.sleep(0.02)
        offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            tracker = self._trackers.get(tp)
            target = tracker.committable() if tracker is not None else None
            if target is not None:
                offsets[tp] = target
        if offsets:
            # Bounded: after a broker restart the topics may be gone and a commit would retry for ever,
            # holding up the rebalance.
            with anyio.move_on_after(FINAL_COMMIT_TIMEOUT_S) as timer:
                try:
                    await consumer.commit(offsets)
                    log.info(
                        "stage %s: committed %s before handing partitions over",
                        self.stage.name,
                        ", ".join(f"{t}:{p}@{o}" for (t, p), o in sorted(offsets.items())),
                    )
                except BusError as exc:
                    log.warning("stage %s: commit before hand-over failed (%s)", self.stage.name, exc)
            if timer.cancelled_caught:
                log.warning(
                    "stage %s: commit before hand-over timed out; the next owner may redo some work", self.stage.name
                )
        for tp in partitions:
            self._trackers.pop(tp, None)

    async def _commit_loop(self, consumer: Consumer) -> None:
        while True:
            await anyio.sleep(self.commit_interval_s)
            await self._commit(consumer)

    async def _commit(self, consumer: Consumer) -> None:
        offsets: dict[TopicPartition, int] = {}
        for tp, tracker in self._trackers.items():
            target = tracker.committable()
            if target is not None:
                offsets[tp] = target
        if not offsets:
            return
        assigned = consumer.assignment()
        offsets = {tp: off for tp, off in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except BusError as exc:
            log.info("stage %s: commit dropped (%s)", self.stage.name, exc, extra=OUTAGE)
            return
        for tp, off in offsets.items():
            kept = self._trackers.get(tp)
            if kept is not None:  # revoked during the commit (a rebalance): its new owner goes on from there
                kept.committed = off

    async def _process(self, record: Record, limiter: anyio.Semaphore) -> None:
        tel = telemetry.current()
        span: Any = None
        if tel.tracing:  # a span per message, continuing the input's trace; outputs carry the span's context
            span, token, trace = tel.start_stage_span(record, self.stage.name, self.group, self.messaging_system)
        else:  # no spans: pass the input's traceparent on, or start a trace for a message that has none
            trace = record.header(TRACE_HEADER) or telemetry.new_traceparent()

        source_key = record.key if self.keyed_by_request_id and self.carries_request_key is not None else None

        async def publish_now(output: Emit) -> None:
            await self._publish_all([output], trace, source_key)

        soon: list[asyncio.Task[None]] = []

        def publish_soon(output: Emit) -> None:
            soon.append(asyncio.get_running_loop().create_task(self._publish_all([output], trace, source_key)))

        ctx = MessageContext(record=record, stage=self.stage.name, publish=publish_now, publish_soon=publish_soon)
        done = False
        try:
            outputs = await self._decide(record, ctx)
            await self._publish_all(outputs, trace, source_key)
            if soon:  # done only once everything the message made is acknowledged
                await asyncio.gather(*soon)
            done = True
        except asyncio.CancelledError:
            raise  # abandoned (shutdown): not done, so its offset is never committed
        except BaseException:
            done = True  # a bug: logged by the task's callback; never retried for ever
            raise
        finally:
            for task in soon:
                task.cancel()  # a no-op for those already finished
            if span is not None:
                tel.end_stage_span(span, token)
            self._finish(record, done=done)
            limiter.release()

    async def _decide(self, record: Record, ctx: MessageContext) -> list[Emit]:
        key = record.key.decode("utf-8", "replace") if record.key else None
        try:
            value = self.stage.decode(record.value)
        except InvalidInput as exc:
            return await self._invalid(record, ctx, key, exc)
        try:
            return await self.stage.handle(value, ctx)
        except InvalidInput as exc:
            return await self._invalid(record, ctx, key, exc)
        except Exception as exc:
            log.exception("stage %s failed on %s@%s/%s", self.stage.name, record.topic, record.partition, record.offset)
            telemetry.Telemetry.mark_error(type(exc).__name__)
            value_id = getattr(value, "id", None)
            request_id = (value_id if isinstance(value_id, str) else key) if self.keyed_by_request_id else None
            if request_id is None:
                return []
            error = ErrorInfo(type="server_error", message=f"stage {self.stage.name} failed: {type(exc).__name__}")
            return self.stage.reject(request_id, error, ctx)

    async def _invalid(self, record: Record, ctx: MessageContext, key: str | None, exc: InvalidInput) -> list[Emit]:
        self.dead_lettered += 1
        log.warning(
            "dead letter: %s partition %s offset %s key %s: %s",
            record.topic,
            record.partition,
            record.offset,
            key,
            exc.reason,
        )
        telemetry.Telemetry.mark_error("dead_letter")
        letter = dead_letter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            exc.reason,
            self.stage.name,
            record.value,
            max_message_bytes(self.bus),
        )
        outputs = [Emit(self.deadletter_topic, key, letter)]
        # The value's own id when it can be read, else the record's key (DESIGN A4); the answer is keyed
        # with the record's key bytes either way (``carries_request_key``).
        request_id = (exc.request_id or key) if self.keyed_by_request_id else None
        if request_id:
            error = ErrorInfo(type="invalid_request", message=f"invalid request: {exc.reason}")
            outputs.extend(self.stage.reject(request_id, error, ctx))
        return outputs

    async def publish(self, output: Emit) -> None:
        """Publish one output outside a message's handling (a stage's background work, e.g. timers).

        It carries a fresh, unsampled ``traceparent``: timers belong to no request's trace.
        """
        await self._publish_all([output], telemetry.new_traceparent(sampled=False))

    async def _publish_all(
        self, outputs: Sequence[Emit], traceparent: bytes | None, source_key: bytes | None = None
    ) -> None:
        if not outputs:
            return
        headers = _HEADERS if traceparent is None else (*_HEADERS, (TRACE_HEADER, traceparent))
        messages = [
            Outgoing(
                topic=o.topic,
                value=_ENCODER.encode(o.value),
                key=self._output_key(o, source_key),
                headers=headers,
            )
            for o in outputs
        ]
        if len(messages) == 1:
            results: list[BaseException | None] = [await _attempt_publish(self.bus, messages[0])]
        else:  # concurrently, so a Kafka producer batches them; plain asyncio tasks (see ``run``)
            results = list(await asyncio.gather(*(_attempt_publish(self.bus, m) for m in messages)))
        for message, failure in zip(messages, results, strict=True):
            if failure is not None:
                await self._unpublishable(message, failure, headers)

    def _output_key(self, output: Emit, source_key: bytes | None) -> bytes | None:
        """The key bytes of ``output``: the input's own bytes on topics about the request, else the stage's key."""
        if source_key is not None and self.carries_request_key is not None and self.carries_request_key(output.topic):
            return source_key
        return output.key.encode("utf-8") if output.key is not None else None

    async def _unpublishable(self, message: Outgoing, failure: BaseException, headers: Headers) -> None:
        """An output that can never be published: dead-letter it (payload truncated) and answer its request.

        The input is then committed past like any other. Nothing here is
        retried forever: when the dead letter or the answer fails too, that is
        only logged. (An output on the dead-letter topic itself was already
        truncated to fit when it was built.)
        """
        key = message.key.decode("utf-8", "replace") if message.key is not None else None
        log.error("stage %s: %s; dead-lettering it", self.stage.name, failure)
        telemetry.Telemetry.mark_error("unpublishable")
        if message.topic == self.deadletter_topic:
            return
        letter = dead_letter(
            message.topic,
            -1,
            -1,
            message.key,
            f"output not publishable: {failure}",
            self.stage.name,
            message.value,
            max_message_bytes(self.bus),
        )
        outs = [Outgoing(topic=self.deadletter_topic, value=_ENCODER.encode(letter), key=message.key, headers=headers)]
        answers = self.beside_path is None or not self.beside_path(message.topic)
        if self.keyed_by_request_id and key is not None and answers:
            error = ErrorInfo(
                type="invalid_request",
                message=f"the request grew past the largest message the bus takes ({len(message.value)} bytes "
                f"to {message.topic}); send a smaller request",
            )
            outs += [
                Outgoing(topic=o.topic, value=_ENCODER.encode(o.value), key=message.key, headers=headers)
                for o in self.stage.reject(key, error, _NO_CONTEXT)
                if o.topic != message.topic
            ]
        for out in outs:
            failed = await _attempt_publish(self.bus, out)
            if failed is not None:
                log.error("stage %s: could not publish to %s either: %s", self.stage.name, out.topic, failed)


async def _attempt_publish(bus: Bus, message: Outgoing) -> PermanentBusError | None:
    """``publish_with_retry``, returning a permanent failure instead of raising it."""
    try:
        await publish_with_retry(bus, message)
    except PermanentBusError as exc:
        return exc
    return None


#: Room kept for a dead letter's other fields when its raw payload is truncated to fit (bytes).
DEAD_LETTER_OVERHEAD_BYTES = 4096


def max_message_bytes(bus: Bus) -> int | None:
    """The largest message ``bus`` publishes (bytes), ``None`` when it has no limit (the in-process bus)."""
    limit = getattr(bus, "max_message_bytes", None)
    return limit if isinstance(limit, int) else None


def dead_letter(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | str | None,
    reason: str,
    stage: str,
    raw: bytes,
    limit_bytes: int | None,
) -> DeadLetter:
    """A ``DeadLetter`` for ``raw``, its payload truncated when the whole would not fit ``limit_bytes``.

    ``key``: the record's key (bytes that are not UTF-8 are kept exactly in ``raw_key``).

    ``raw`` is base64 in JSON (4 bytes per 3), so a payload over about three
    quarters of the limit is cut; ``raw_size`` and ``raw_sha256`` always
    describe the whole original value, so it can still be identified.
    """
    raw_key: bytes | None = None
    if isinstance(key, bytes):
        key_bytes = key
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raw_key, key = key_bytes, key_bytes.decode("utf-8", "replace")
    size = len(raw)
    kept = raw
    if limit_bytes is not None:
        room = max(0, (limit_bytes - DEAD_LETTER_OVERHEAD_BYTES - 4 * len(reason)) * 3 // 4)
        if size > room:
            kept = raw[:room]
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        reason=reason,
        stage=stage,
        raw=kept,
        raw_size=size,
        raw_sha256=hashlib.sha256(raw).hexdigest(),
        truncated=len(kept) < size,
        at=now_utc(),
        raw_key=raw_key,
    )


async def publish_with_retry(bus: Bus, message: Outgoing, *, max_delay_s: float = 5.0) -> None:
    """Publish ``message``, retrying with capped exponential backoff until it is acknowledged.

    A broker outage thus delays the message instead of losing it; cancel the
    calling scope to give up. A permanent failure (too large, invalid topic,
    not authorized) is not retried.

    Raises:
        PermanentBusError: when the message can never be published as it is.
    """
    delay = 0.1
    started = time.monotonic()
    while True:
        try:
            await bus.publish(message)
            return
        except PermanentBusError:
            raise
        except BusError as exc:
            log.warning(
                "publish to %s failed (%s); retrying in %.1fs (%.0fs so far)",
                message.topic,
                exc,
                delay,
                time.monotonic() - started,
                extra=OUTAGE,
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
