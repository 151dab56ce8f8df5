"""The client's view of a stream: repeats dropped, a new generation after text is an interruption,
a response that overtakes its last chunks waits for them (DESIGN A9)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
import pytest

from pipeline.client.stream_handle import StreamHandle
from pipeline.errors import AllProvidersFailedError, StreamInterruptedError
from schemas.response import AIResponse, ErrorInfo
from schemas.stream import StreamChunk

AT = datetime(2026, 12, 6, tzinfo=UTC)


def chunk(seq: int, delta: str, gen: str = "g1") -> StreamChunk:
    return StreamChunk(id="r", seq=seq, generation=gen, delta=delta, at=AT)


def handle(closed: list[bool] | None = None) -> StreamHandle:
    return StreamHandle("r", time.monotonic() + 10, lambda early: (closed if closed is not None else []).append(early))


async def drain(h: StreamHandle) -> list[str]:
    with anyio.fail_after(5):
        return [c.delta async for c in h]


async def test_repeats_are_dropped_and_the_response_ends_the_stream() -> None:
    h = handle()
    for c in (chunk(0, "Hello "), chunk(0, "Hello "), chunk(1, "world")):
        h.feed(c)
    h.resolve(AIResponse(id="r", status="ok", content="Hello world", generation="g1", stream_chunks=2))
    assert await drain(h) == ["Hello ", "world"]
    assert h.text == "Hello world"


async def test_a_response_that_overtakes_its_last_chunk_waits_for_it() -> None:
    h = handle()
    h.feed(chunk(0, "Hello "))
    h.resolve(AIResponse(id="r", status="ok", content="Hello world", generation="g1", stream_chunks=2))

    async def late() -> None:
        await anyio.sleep(0.05)
        h.feed(chunk(1, "world"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(late)
        assert await drain(h) == ["Hello ", "world"]


async def test_a_new_generation_after_text_is_an_interruption() -> None:
    closed: list[bool] = []
    h = handle(closed)
    h.feed(chunk(0, "Hel", gen="first"))
    h.feed(chunk(0, "Hello", gen="second"))  # the request was run again (redelivered)
    seen: list[str] = []
    with pytest.raises(StreamInterruptedError) as caught:
        async for c in h:
            seen.append(c.delta)
    assert seen == ["Hel"] and caught.value.partial == "Hel"
    assert closed == [False]  # ended, but not a cancel: the request goes on and its response is the record


async def test_a_new_generation_before_any_text_is_simply_followed() -> None:
    h = handle()
    h.feed(chunk(0, "Hello", gen="second"))
    h.resolve(AIResponse(id="r", status="ok", content="Hello", generation="second", stream_chunks=1))
    assert await drain(h) == ["Hello"]


async def test_a_failure_before_text_raises_the_requests_own_error_and_after_text_an_interruption() -> None:
    failed = AIResponse(id="r", status="error", error=ErrorInfo(type="all_providers_failed", message="all down"))
    h = handle()
    h.resolve(failed)
    with pytest.raises(AllProvidersFailedError):
        await drain(h)
    h = handle()
    h.feed(chunk(0, "Hel"))
    cut = AIResponse(
        id="r", status="error", content="Hel", generation="g1", stream_chunks=1,
        error=ErrorInfo(type="stream_interrupted", message="cut", reason="provider_error"),
    )
    h.resolve(cut)
    with pytest.raises(StreamInterruptedError) as caught:
        await drain(h)
    assert caught.value.partial == "Hel" and caught.value.response is cut


async def test_closing_before_the_response_asks_for_a_cancel() -> None:
    closed: list[bool] = []
    h = handle(closed)
    h.feed(chunk(0, "Hel"))
    assert (await h.__anext__()).delta == "Hel"
    await h.aclose()
    assert closed == [True]
    with pytest.raises(StopAsyncIteration):
        await h.__anext__()
