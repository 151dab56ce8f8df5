"""The executor's stream reader: a broker that never acknowledges a chunk cannot hold a stopping executor."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest

from schemas.stream import StreamChunk
from stages.executor import streaming
from stages.executor.streaming import StreamRun, read_stream
from stages.providers.base import StreamDelta, StreamEnd, StreamEvent


def _run() -> StreamRun:
    return StreamRun(
        request_id="r",
        topic="ai.stream",
        generation="g",
        flush_s=0.02,
        idle_timeout_s=5.0,
        resume=False,
        ends_at=time.monotonic() + 30,
        ends_by="deadline",
    )


async def _events() -> AsyncIterator[StreamEvent]:
    yield StreamDelta(text="Hello ")
    await anyio.sleep(10)
    yield StreamEnd(model="m")


async def test_a_publish_that_never_returns_is_abandoned_when_the_stream_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streaming, "CHUNK_PUBLISH_SHIELD_S", 0.3)
    published: list[StreamChunk] = []

    async def publish(chunk: StreamChunk) -> None:
        published.append(chunk)
        await anyio.sleep(3600)  # a broker that is gone: the runner would retry for ever

    started = time.monotonic()
    with anyio.move_on_after(0.2):  # the drain window of a stopping executor ends
        await read_stream(
            _run(),
            _events(),
            provider="p",
            model="m",
            attempt=0,
            first_chunk_timeout_s=5.0,
            publish=publish,
            now=lambda: datetime.now(UTC),
        )
    assert time.monotonic() - started < 2.0
    assert [c.delta for c in published] == ["Hello "]
