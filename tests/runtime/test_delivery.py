"""Delivery guarantees under bad input and slow calls (issue: delivery, fault tolerance, bad input)."""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.bus.protocol import Outgoing
from schemas import AIRequest, AIResponse, DeadLetter
from tests.harness import Harness, harness

pytestmark = pytest.mark.kafka


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"question {rid}", "max_tokens": 32}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


def _malformed(rng: random.Random, i: int) -> bytes:
    kinds = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
        lambda: b"{",
        lambda: b"null",
        lambda: b"[]",
        lambda: json.dumps({"id": f"fz-{i}"}).encode(),
        lambda: json.dumps({"id": f"fz-{i}", "model": "m", "prompt": "p", "temperature": "hot"}).encode(),
        lambda: json.dumps({"id": i, "model": ["x"], "prompt": None}).encode(),
        lambda: json.dumps({"type": "set_strategy"}).encode(),
        lambda: json.dumps({"type": "health", "provider": 1}).encode(),
        lambda: "\u00e9\u0000".encode("utf-16"),
        lambda: b'{"id": "' + b"x" * 5000 + b'"}',
    ]
    return rng.choice(kinds)()


async def test_fuzzed_values_on_every_topic_leave_every_stage_answering(pipe: Harness, emu: Any) -> None:
    rng = random.Random(20261129)
    topics = [pipe.topics.requests, pipe.topics.stage_budget, pipe.topics.stage_route, pipe.topics.stage_execute,
              pipe.topics.stage_record, pipe.topics.control, pipe.topics.costs]
    sent = 0
    for i in range(300):
        topic = topics[i % len(topics)]
        key = f"fz-{pipe.kind}-{i}".encode() if rng.random() < 0.7 else None
        await pipe.bus.publish(Outgoing(topic, _malformed(rng, i), key=key))
        sent += 1
    assert sent == 300
    with anyio.fail_after(30):
        answer = await pipe.client.request(request(f"after-fuzz-{pipe.kind}"))
    assert answer.status == "ok" and answer.content
    # every stage's runner is still running and has handled its share of the garbage
    for runner in pipe.pipeline.runners:
        assert runner.processed > 0
        assert not runner._stopping.is_set()


@pytest.mark.parametrize("pipe", ["kafka"], indirect=True)
async def test_poison_between_valid_messages_is_dead_lettered_once_and_committed_past(pipe: Harness,
                                                                                    emu: Any) -> None:
    # the same key lands on the same partition: valid, poison, valid
    key = f"same-partition-{pipe.kind}"
    first = request(key)
    poison_key = key
    await pipe.client.publish(first)
    await pipe.bus.publish(Outgoing(pipe.topics.requests, b"\xff not json", key=poison_key.encode()))
    second = request(key + "-2")
    answer = await pipe.client.request(second)
    assert answer.status == "ok"
    letters = pipe.decode(
        await pipe.read_all(pipe.topics.deadletter, until=lambda rs: any(r.value.endswith(b'"') for r in rs)),
        DeadLetter,
    )
    mine = [d for d in letters if d.key == poison_key and d.raw == b"\xff not json"]
    assert len(mine) == 1
    partition, offset = mine[0].partition, mine[0].offset
    consumer = AIOKafkaConsumer(bootstrap_servers=pipe.bootstrap, group_id=f"{pipe.topics.prefix}cache",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(pipe.topics.requests, partition)
        committed = None
        with anyio.fail_after(10):
            while committed is None or committed <= offset:
                committed = await consumer.committed(tp)
                if committed is None or committed <= offset:
                    await anyio.sleep(0.1)
    finally:
        await consumer.stop()
    assert committed > offset


async def test_a_call_longer_than_the_poll_interval_is_answered_once_without_rebalance(
    kafka_bootstrap: str, unique_prefix: str
) -> None:
    from pipeline.bus.kafka import KafkaSettings

    settings = KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300, max_poll_interval_ms=1500)
    async with harness("kafka", unique_prefix, bootstrap=kafka_bootstrap, kafka_settings=settings) as h:
        h.emulator.faults.set("cloudflare", {"latency": {"dist": "fixed", "ms": 4000}})
        rid = "slow-call"
        with anyio.fail_after(30):
            answer = await h.client.request(request(rid))
        assert answer.status == "ok" and answer.provider == "cloudflare"
        assert h.emulator.counts().get("cloudflare") == 1
        records = await h.read_all(h.topics.responses)
        assert [msgspec.json.decode(r.value, type=AIResponse).id for r in records].count(rid) == 1
