"""No value can wedge a partition: values just under and over every size limit, on every topic (Kafka).

Limits: 1 MiB per request (``schemas.request.MAX_REQUEST_BYTES``, checked by the
cache stage) and the producer's ``max_request_size`` (4 MiB by default), which a
dead letter of a large value (base64: 4 bytes per 3) would pass. A separate
producer with a 12 MB limit plays the application that publishes too much.
After each value, a normal request on the same topic is still answered: the
partition's offsets moved on.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.protocol import Outgoing
from schemas import AIRequest, AIResponse, DeadLetter
from schemas.request import MAX_REQUEST_BYTES
from tests.conftest import _RUN_ID, in_own_task
from tests.harness import Harness, fast_config, harness

pytestmark = pytest.mark.kafka

MIB = 1_048_576
PRODUCER_LIMIT = KafkaSettings().max_request_size_bytes


@pytest_asyncio.fixture(scope="module")
async def kpipe(kafka_bootstrap: str) -> AsyncIterator[Harness]:
    async with in_own_task(lambda: harness("kafka", f"size-{_RUN_ID}.", bootstrap=kafka_bootstrap)) as h:
        yield h


@pytest_asyncio.fixture(scope="module")
async def big_producer(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    bus = KafkaBus(kafka_bootstrap, KafkaSettings(max_request_size_bytes=12_000_000))
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


def request_of(size: int, rid: str) -> bytes:
    """An ``AIRequest`` JSON value of exactly ``size`` bytes: two user turns of filler words (each under 800k chars)."""

    def encode(first: str, second: str) -> bytes:
        messages = [{"role": "user", "content": first}, {"role": "user", "content": second}]
        return msgspec.json.encode({"id": rid, "model": "gpt-3.5-turbo", "messages": messages, "max_tokens": 8})

    room = size - len(encode("", ""))
    filler = "word " * (room // 5 + 1)
    value = encode(filler[: room // 2], filler[: room - room // 2])
    assert len(value) == size
    return value


async def answered(h: Harness, rid: str) -> AIResponse:
    records = await h.read_all(
        h.topics.responses, until=lambda rs: any(r.key == rid.encode() for r in rs), timeout_s=60
    )
    found = [r for r in h.decode(records, AIResponse) if r.id == rid]
    assert found, f"no response for {rid}"
    return found[0]


async def dead_letters(h: Harness, key: str) -> list[DeadLetter]:
    records = await h.read_all(
        h.topics.deadletter, until=lambda rs: any(r.key == key.encode() for r in rs), timeout_s=60
    )
    return [d for d in h.decode(records, DeadLetter) if d.key == key]


async def still_answers(h: Harness) -> None:
    rid = f"after-{uuid.uuid4().hex[:8]}"
    response = await h.client.request(
        msgspec.convert({"id": rid, "model": "gpt-3.5-turbo", "prompt": "still there?", "max_tokens": 8}, AIRequest)
    )
    assert response.status == "ok", response.error


@pytest.mark.parametrize(
    ("size", "outcome"),
    [
        (MAX_REQUEST_BYTES, "answered"),  # exactly at the request limit: taken
        (MAX_REQUEST_BYTES + 1, "too large"),  # one byte over: invalid_request, dead letter whole
        (PRODUCER_LIMIT - 1000, "too large"),  # its dead letter (base64) would pass the producer's limit
        (5 * MIB, "too large"),  # over the producer's limit itself
    ],
)
async def test_requests_around_each_limit_are_answered_and_never_wedge(
    kpipe: Harness, big_producer: KafkaBus, size: int, outcome: str
) -> None:
    rid = f"sz-{size}-{uuid.uuid4().hex[:6]}"
    value = request_of(size, rid)
    await big_producer.publish(Outgoing(topic=kpipe.topics.requests, value=value, key=rid.encode()))
    response = await answered(kpipe, rid)
    if outcome == "answered":
        assert response.error is None or response.error.type != "invalid_request"
    else:
        assert response.error is not None and response.error.type == "invalid_request"
        assert f"{size} bytes" in response.error.message
        [letter] = await dead_letters(kpipe, rid)
        assert letter.raw_size == size and letter.raw_sha256 == hashlib.sha256(value).hexdigest()
        assert letter.truncated == (size * 4 // 3 > PRODUCER_LIMIT - 8192)
        assert value.startswith(letter.raw)
    await still_answers(kpipe)


@pytest.mark.parametrize("topic", ["stage_budget", "stage_route", "stage_execute", "stage_record", "control"])
async def test_an_oversized_garbage_value_on_every_stage_topic_is_dead_lettered(
    kpipe: Harness, big_producer: KafkaBus, topic: str
) -> None:
    key = f"junk-{topic}-{uuid.uuid4().hex[:6]}"
    value = b"\x00not json" * (5 * MIB // 9)
    name: str = getattr(kpipe.topics, topic)
    await big_producer.publish(Outgoing(topic=name, value=value, key=key.encode()))
    if topic != "control":  # read in a group: dead-lettered, and the key (a request id) gets its answer
        letters = await dead_letters(kpipe, key)
        assert letters and all(d.truncated and d.raw_size == len(value) and d.source_topic == name for d in letters)
        response = await answered(kpipe, key)
        assert response.error is not None and response.error.type == "invalid_request"
    # ai.control is read as a broadcast by every stage here: an unreadable value is skipped
    await still_answers(kpipe)


async def test_an_output_larger_than_the_bus_takes_is_dead_lettered_and_answered(kafka_bootstrap: str) -> None:
    """A pipeline whose producer takes at most 64 KiB: a 100 KB request (under 1 MiB) cannot travel on."""
    small = KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300, max_request_size_bytes=65_536)
    prefix = f"size-out-{_RUN_ID}."
    async with harness("kafka", prefix, bootstrap=kafka_bootstrap, config=fast_config(), kafka_settings=small) as h:
        rid = f"big-{uuid.uuid4().hex[:6]}"
        request: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": "word " * 20_000, "max_tokens": 8}
        big = KafkaBus(kafka_bootstrap, KafkaSettings(max_request_size_bytes=1_000_000))
        await big.start()
        try:
            await big.publish(Outgoing(topic=h.topics.requests, value=msgspec.json.encode(request), key=rid.encode()))
        finally:
            await big.stop()
        response = await answered(h, rid)
        assert response.error is not None and response.error.type == "invalid_request"
        assert "larger" in response.error.message or "grew past" in response.error.message
        letters = await dead_letters(h, rid)
        assert letters and letters[0].reason.startswith("output not publishable") and letters[0].truncated
        await still_answers(h)
