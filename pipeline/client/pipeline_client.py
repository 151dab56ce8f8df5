"""Client side of the pipeline: publish requests, await their responses by id.

One ``PipelineClient`` per process reads ``ai.responses`` as a broadcast (one
shared reader, not one per call) and resolves waiting calls by request id.
Duplicate responses (at-least-once delivery) are ignored: the first one wins.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from cachetools import LRUCache, TTLCache

from pipeline.bus.protocol import Bus, BusError, Outgoing
from pipeline.bus.topics import Topics
from pipeline.client.stream_handle import StreamHandle
from pipeline.errors import InvalidRequestError, ProviderTimeoutError, ServiceUnavailableError
from pipeline.runtime import telemetry
from pipeline.runtime.logs import OUTAGE
from pipeline.runtime.runner import SCHEMA_HEADER, TRACE_HEADER, encode, publish_with_retry
from pipeline.stores.blob_store import BlobStore, offload_images
from schemas import SCHEMA_VERSION
from schemas.archive import RECEIVED_AT_HEADER
from schemas.events import CancelRequest
from schemas.request import AIRequest
from schemas.response import AIResponse
from schemas.stream import StreamChunk
from stages.rules.images import DEFAULT_MAX_IMAGE_BYTES, ImageError

log = logging.getLogger("aipipe.client")

_RESPONSE_DECODER = msgspec.json.Decoder(AIResponse)
_CHUNK_DECODER = msgspec.json.Decoder(StreamChunk)
#: How long (s) a delivered response id is remembered, so a redelivered copy is dropped.
SEEN_TTL_S = 600.0
#: Longest wait (s) for the broker to acknowledge a request before the call fails as ``service_unavailable``.
PUBLISH_TIMEOUT_S = 10.0
#: A request still unanswered this long (s) after its response reader saw the broker restart empty (a
#: rotation of the embedded broker, DESIGN A11) is published once more: it may have reached the old broker
#: after the archive's last read. Longer than a restore takes to answer what it carried over.
RESEND_AFTER_S = 5.0
#: How often (s) a waiting request checks for that.
RESEND_CHECK_S = 1.0


def new_request_id() -> str:
    """A fresh request id (``req-`` + 24 hex characters)."""
    return f"req-{uuid.uuid4().hex[:24]}"


def as_request(request: AIRequest | Mapping[str, Any], *, stream: bool = False) -> AIRequest:
    """An ``AIRequest`` from a struct or a dict of its JSON fields (an ``id`` is generated when absent).

    ``stream`` makes a dict without a ``stream`` field a streamed request (``stream_content``).

    Raises:
        msgspec.ValidationError: when the dict is not a valid request.
    """
    if isinstance(request, AIRequest):
        return request
    data = dict(request)
    data.setdefault("id", new_request_id())
    if stream:
        data.setdefault("stream", True)
    return msgspec.convert(data, AIRequest)


class _Waiter:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.response: AIResponse | None = None


class PipelineClient:
    """Publishes requests and awaits their responses.

    Streamed requests (DESIGN A9): ``stream()`` publishes a request with
    ``stream: true`` and returns a ``StreamHandle``; one reader per client
    follows ``stream_topic`` (default ``ai.stream``; a private topic under it,
    such as each ``aipipe serve`` replica's, is created and named in the
    requests, so the client reads only its own chunks), started on the first
    streamed request.

    Args:
        bus: a started bus.
        topics: topic names.
        slack_ms: extra wait beyond a request's ``timeout_ms`` before giving up (ms).
        stream_topic: the topic this client's streamed requests use (under ``topics.stream``).
        blobs: the image blob store (DESIGN A4): a request's ``data:`` images are stored there
            and replaced by references before it is published (``None``: they travel inline).
        max_image_bytes: the largest image accepted (decoded bytes), the ``[images] max_bytes`` setting.

    Raises:
        ValueError: when ``stream_topic`` is not ``topics.stream`` or a topic under it.
    """

    def __init__(
        self,
        bus: Bus,
        topics: Topics,
        *,
        slack_ms: int = 5_000,
        stream_topic: str | None = None,
        blobs: BlobStore | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        self.bus = bus
        self.blobs = blobs
        self.max_image_bytes = max_image_bytes
        self.topics = topics
        self.slack_ms = slack_ms
        self.stream_topic = stream_topic or topics.stream
        if not topics.is_stream_topic(self.stream_topic):
            raise ValueError(f"stream topic {self.stream_topic!r} is not {topics.stream!r} or under it")
        self._streams: dict[str, StreamHandle] = {}
        self._stream_reader: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._early: TTLCache[str, AIResponse] = TTLCache(maxsize=10_000, ttl=120)
        # id -> until when (monotonic clock, s) a repeat of its response is a duplicate. Floats in an LRU
        # map, not a TTLCache: its linked entries are objects the garbage collector walks on every full
        # pass, and 100,000 of them slowed the whole process down (``aipipe bench``).
        self._seen: LRUCache[str, float] = LRUCache(maxsize=100_000)
        self._stop = anyio.Event()
        self.duplicates = 0
        #: Broker restarts the response reader noticed (a new embedded broker: a rotation, DESIGN A11), and when.
        self.broker_restarts = 0
        self._restarted_at = 0.0
        self.resent = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read responses (and, once asked for, stream chunks) until ``stop()``; reports started when positioned."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._read_responses)
            task_status.started()
            await self._stop.wait()
            tg.cancel_scope.cancel()
        self._tg = None

    async def _read_responses(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._follow(
            self.topics.responses, _RESPONSE_DECODER, self._deliver, "response reader", task_status, watch=True
        )

    async def _read_chunks(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.stream_topic != self.topics.stream:
            await self.bus.ensure_topics([self.stream_topic])
        await self._follow(self.stream_topic, _CHUNK_DECODER, self._feed, "stream reader", task_status)

    def _feed(self, chunk: StreamChunk) -> None:
        handle = self._streams.get(chunk.id)
        if handle is not None:
            handle.feed(chunk)

    async def _follow(
        self,
        topic: str,
        decoder: msgspec.json.Decoder[Any],
        deliver: Callable[[Any], None],
        what: str,
        task_status: anyio.abc.TaskStatus[None],
        *,
        watch: bool = False,
    ) -> None:
        """Read ``topic`` from its end as a broadcast until ``stop()``, handing each decodable value to ``deliver``.

        Values that do not decode are skipped; a failed fetch is retried every
        second. ``watch``: count the broker restarts the reader notices.
        """
        consumer = await self.bus.consumer([topic], group=None, from_beginning=False)
        task_status.started()
        try:
            while not self._stop.is_set():
                try:
                    records = await consumer.getmany(100, max_records=1000)
                    restarts = getattr(consumer, "restarts", 0)
                    if watch and restarts != self.broker_restarts:
                        self.broker_restarts, self._restarted_at = restarts, time.monotonic()
                except BusError as exc:
                    log.warning("%s: fetch failed (%s); retrying", what, exc, extra=OUTAGE)
                    with anyio.move_on_after(1.0):
                        await self._stop.wait()
                    continue
                for record in records:
                    try:
                        value = decoder.decode(record.value)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        continue
                    deliver(value)
        finally:
            with anyio.CancelScope(shield=True):
                await consumer.stop()

    async def _ensure_stream_reader(self) -> None:
        """Start the chunk reader once (positioned at the topic's end before the first streamed request)."""
        if self._stream_reader is None:
            self._stream_reader = anyio.Event()
            if self._tg is None:
                raise RuntimeError("the client is not running (start it with run())")
            await self._tg.start(self._read_chunks)
            self._stream_reader.set()
        await self._stream_reader.wait()

    def stop(self) -> None:
        """Stop the response reader."""
        self._stop.set()

    def _deliver(self, response: AIResponse) -> None:
        handle = self._streams.get(response.id)
        if handle is not None:
            handle.resolve(response)
        now = time.monotonic()
        seen_until = self._seen.get(response.id)
        if seen_until is not None and seen_until > now:
            self.duplicates += 1
            return
        waiter = self._waiters.get(response.id)
        if waiter is None:
            self._early[response.id] = response
            return
        self._seen[response.id] = now + SEEN_TTL_S
        waiter.response = response
        waiter.event.set()

    async def publish(self, request: AIRequest, *, headers: tuple[tuple[str, bytes], ...] = ()) -> None:
        """Publish ``request`` to ``ai.requests`` keyed by its id, its ``data:`` images by claim check first.

        Raises:
            InvalidRequestError: an image that is not a valid base64 ``data:`` URI of a PNG, JPEG,
                GIF or WebP image, or is over ``max_image_bytes``.
            ServiceUnavailableError: the blob store cannot be written.
        """
        if self.blobs is not None:
            try:
                request = await offload_images(request, self.blobs, max_bytes=self.max_image_bytes)
            except ImageError as exc:
                raise InvalidRequestError(str(exc), request_id=request.id) from exc
            except Exception as exc:  # a full disk, Redis down
                raise ServiceUnavailableError(
                    f"the image blob store could not be written: {type(exc).__name__}", request_id=request.id
                ) from exc
        await publish_with_retry(
            self.bus,
            Outgoing(
                topic=self.topics.requests,
                value=encode(request),
                key=request.id.encode(),
                headers=((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()), *headers),
            ),
        )

    async def request(self, request: AIRequest, *, timeout_s: float | None = None) -> AIResponse:
        """Publish ``request`` and return its response.

        With tracing on, the call is the trace's root span (``generate_content
        <model>``); the request is published with its ``traceparent`` (or the
        caller's own OpenTelemetry span context, when it has one).

        Raises:
            ProviderTimeoutError: when no response arrives within the request's
                ``timeout_ms`` plus ``slack_ms`` (or ``timeout_s``).
            ServiceUnavailableError: when the broker does not acknowledge the
                request within ``PUBLISH_TIMEOUT_S`` (10 s) or its ``timeout_ms``.
        """
        waiter = self._waiters[request.id] = _Waiter()
        tel = telemetry.current()
        span, traceparent = tel.start_request(request, self.topics.requests)  # the trace's root, when tracing
        try:
            headers = ((TRACE_HEADER, traceparent),) if traceparent is not None else ()
            with anyio.move_on_after(min(PUBLISH_TIMEOUT_S, request.timeout_ms / 1000)) as publishing:
                await self.publish(request, headers=headers)
            if publishing.cancelled_caught:
                raise ServiceUnavailableError(
                    f"the Kafka broker did not take request {request.id} within "
                    f"{min(PUBLISH_TIMEOUT_S, request.timeout_ms / 1000):.1f}s (is it running?)",
                    request_id=request.id,
                )
            published_ms, restarts = int(time.time() * 1000), self.broker_restarts
            early = self._early.pop(request.id, None)
            if early is not None:
                self._deliver(early)
            limit = timeout_s if timeout_s is not None else (request.timeout_ms + self.slack_ms) / 1000
            with anyio.move_on_after(limit):
                while not waiter.event.is_set():
                    with anyio.move_on_after(RESEND_CHECK_S):
                        await waiter.event.wait()
                    if self._lost_in_restart(waiter, restarts):
                        # The broker restarted empty (a rotation) after this request was published and no
                        # answer came: the restore carries over what the archive had; this one may have
                        # reached the old broker too late for it. Once more, its deadline unchanged.
                        restarts = self.broker_restarts
                        self.resent += 1
                        received = (RECEIVED_AT_HEADER, str(published_ms).encode())
                        await self.publish(request, headers=(*headers, received))
            if waiter.response is None:
                raise ProviderTimeoutError(
                    f"no response for request {request.id} within {limit:.1f}s", request_id=request.id
                )
            return waiter.response
        finally:
            self._waiters.pop(request.id, None)
            if span is not None:
                tel.finish_request(span, waiter.response, None if waiter.response is not None else "timeout")

    def _lost_in_restart(self, waiter: _Waiter, restarts_at_publish: int) -> bool:
        """Whether a request still unanswered ``RESEND_AFTER_S`` after a broker restart should be published again."""
        return (
            not waiter.event.is_set()
            and self.broker_restarts != restarts_at_publish
            and time.monotonic() - self._restarted_at >= RESEND_AFTER_S
        )

    async def stream(self, request: AIRequest) -> StreamHandle:
        """Publish ``request`` as a streamed request and return the handle that yields its chunks.

        The request gets ``stream: true`` and, when this client has a
        private topic, that ``stream_topic``. Closing the handle before its
        response came publishes ``cancel_request`` (the executor stops the call).

        Raises:
            ServiceUnavailableError: when the broker does not acknowledge the request in time.
        """
        if not request.stream or (self.stream_topic != self.topics.stream and request.stream_topic is None):
            topic = request.stream_topic or (None if self.stream_topic == self.topics.stream else self.stream_topic)
            request = msgspec.structs.replace(request, stream=True, stream_topic=topic)
        await self._ensure_stream_reader()
        deadline = time.monotonic() + (request.timeout_ms + self.slack_ms) / 1000

        def closed(early: bool) -> None:
            self._streams.pop(request.id, None)
            if early and self._tg is not None:
                self._tg.start_soon(self.cancel, request.id)

        handle = self._streams[request.id] = StreamHandle(request.id, deadline, closed)
        limit = min(PUBLISH_TIMEOUT_S, request.timeout_ms / 1000)
        with anyio.move_on_after(limit) as publishing:
            await self.publish(request)
        if publishing.cancelled_caught:
            self._streams.pop(request.id, None)
            raise ServiceUnavailableError(
                f"the Kafka broker did not take request {request.id} within {limit:.1f}s (is it running?)",
                request_id=request.id,
            )
        early = self._early.pop(request.id, None)
        if early is not None:
            handle.resolve(early)
        return handle

    async def cancel(self, request_id: str) -> None:
        """Publish ``cancel_request`` for ``request_id`` on ``ai.control`` (the executor stops its stream)."""
        event = CancelRequest(request_id=request_id, at=datetime.now(UTC))
        try:
            await publish_with_retry(
                self.bus,
                Outgoing(
                    topic=self.topics.control,
                    value=encode(event),
                    key=b"*",
                    headers=((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()),),
                ),
            )
        except BusError as exc:
            log.warning("cancel of %s not published (%s)", request_id, exc)
