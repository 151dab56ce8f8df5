"""A streamed request seen from the client: its chunks in order, then its final response (DESIGN A9).

Chunks come from the stream topic and the response from ``ai.responses``;
the two topics are read separately, so the response may arrive before the
last chunks. The handle ends the stream once it has every chunk the
response counts (``stream_chunks`` of its ``generation``), or, after
``TAIL_WAIT_S``, yields the rest of the response's content as one chunk.
Repeated chunks (at-least-once delivery) are dropped by ``seq``; a chunk of
another generation after text was shown means the request was run again
(a redelivery): the stream is interrupted and the final response is the record.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import anyio

from pipeline.errors import ProviderTimeoutError, StreamInterruptedError, error_from_response
from schemas.response import AIResponse
from schemas.stream import StreamChunk

#: How long (s) to wait for chunks the final response counts but that have not arrived yet.
TAIL_WAIT_S = 2.0


class StreamHandle:
    """Async iterator over one request's ``StreamChunk``s; ``response`` once it has ended.

    Args:
        request_id: the request's id.
        deadline: ``time.monotonic()`` instant after which the stream fails with ``ProviderTimeoutError``.
        on_close: called once when the handle ends (finished, failed or closed early),
            with ``True`` when it was closed before its response arrived.

    Raises (while iterating):
        AIProviderError: the typed error of a response that failed before any chunk.
        StreamInterruptedError: after chunks were shown, when the answer did not
            complete (or another generation started).
        StreamCancelledError: when the request ended ``cancelled``.
        ProviderTimeoutError: when no response came before ``deadline``.
    """

    def __init__(self, request_id: str, deadline: float, on_close: Callable[[bool], None]) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.response: AIResponse | None = None
        self.text = ""
        self.chunks = 0
        self._generation: str | None = None
        self._next_seq = 0
        self._queue: deque[StreamChunk] = deque()
        self._changed = anyio.Event()
        self._tail_since: float | None = None
        self._closed = False
        self._on_close = on_close

    # --- fed by the client's readers ---------------------------------------------------------

    def feed(self, chunk: StreamChunk) -> None:
        """Take one chunk from the stream topic (any order of arrival; repeats are dropped later)."""
        self._queue.append(chunk)
        self._changed.set()

    def resolve(self, response: AIResponse) -> None:
        """Take the final response."""
        if self.response is None:
            self.response = response
            self._tail_since = time.monotonic()
            self._changed.set()

    # --- iteration --------------------------------------------------------------------------

    def __aiter__(self) -> StreamHandle:
        return self

    async def __anext__(self) -> StreamChunk:
        while True:
            if self._closed:
                raise StopAsyncIteration
            while self._queue:
                chunk = self._take(self._queue.popleft())
                if chunk is not None:
                    return chunk
            if self.response is not None:
                done = self._finish(self.response)
                if done is not None:
                    return done
            self._changed = anyio.Event()
            left = self.deadline - time.monotonic()
            if self.response is not None and self._tail_since is not None:
                left = min(left, self._tail_since + TAIL_WAIT_S - time.monotonic())
            elif left <= 0:
                self._end(early=True)
                raise ProviderTimeoutError(f"no response for request {self.request_id}", request_id=self.request_id)
            with anyio.move_on_after(max(0.0, left)):
                await self._changed.wait()
            if self.response is not None and self._tail_since is not None:
                if time.monotonic() >= self._tail_since + TAIL_WAIT_S:
                    self._tail_since = None  # stop waiting for missing chunks

    def _take(self, chunk: StreamChunk) -> StreamChunk | None:
        """The chunk to yield, or ``None`` for a repeat or a chunk of a generation left behind."""
        if self._generation is None:
            self._generation = chunk.generation
        if chunk.generation != self._generation:
            if self.chunks == 0:
                self._generation, self._next_seq = chunk.generation, 0
            else:
                self._end(early=False)
                raise StreamInterruptedError(
                    f"request {self.request_id} was run again (a new generation) after text was shown",
                    partial=self.text,
                    request_id=self.request_id,
                )
        if chunk.seq < self._next_seq:  # a repeat (at-least-once delivery)
            return None
        self._next_seq = chunk.seq + 1
        self.text += chunk.delta
        self.chunks += 1
        return chunk

    def _finish(self, response: AIResponse) -> StreamChunk | None:
        """End the stream on ``response``: a last chunk for text not yet shown, else raise or stop."""
        waiting = (response.generation == self._generation or self._generation is None) and self.chunks < (
            response.stream_chunks or 0
        )
        if waiting and self._tail_since is not None:
            return None  # chunks still on their way
        if response.status == "ok":
            content = response.content or ""
            if content.startswith(self.text) and len(content) > len(self.text):
                rest = content[len(self.text) :]
                self.text = content
                self.chunks += 1
                return StreamChunk(
                    id=response.id,
                    seq=self._next_seq,
                    generation=response.generation or self._generation or "",
                    delta=rest,
                    provider=response.provider,
                    model=response.model,
                    cached=response.cached,
                    at=datetime.now(UTC),
                )
            self._end(early=False)
            raise StopAsyncIteration
        self._end(early=False)
        error = error_from_response(response)
        if self.chunks and not isinstance(error, StreamInterruptedError) and response.error is not None:
            if response.error.type not in ("cancelled", "invalid_response"):  # their own types, text or not
                raise StreamInterruptedError(
                    response.error.message, partial=self.text, response=response, request_id=response.id
                )
        raise error

    def _end(self, *, early: bool) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(early)

    async def aclose(self) -> None:
        """Stop reading; before the response came, the request is cancelled (``cancel_request``)."""
        self._end(early=self.response is None)

    async def __aenter__(self) -> StreamHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
