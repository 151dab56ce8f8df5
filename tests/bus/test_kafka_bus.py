"""KafkaBus against a real broker (the session's embedded Tansu, or AIPIPE_KAFKA_BOOTSTRAP)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from confluent_kafka import TopicPartition as ConfluentTopicPartition

from pipeline.bus.embedded import EmbeddedBroker
from pipeline.bus.kafka import KafkaBus, KafkaConsumer, KafkaSettings, broker_answers, wait_until_ready
from pipeline.bus.protocol import BusError, Outgoing, Record

pytestmark = pytest.mark.kafka

EMBEDDED = not os.environ.get("AIPIPE_KAFKA_BOOTSTRAP", "").strip()


# ----------------------------------------------------------------------------- helpers


@pytest_asyncio.fixture(scope="module")
async def bus(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    kafka = KafkaBus(kafka_bootstrap, KafkaSettings())
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


async def collect(
    consumer: KafkaConsumer,
    done: Callable[[list[Record]], bool],
    timeout_s: float = 10.0,
) -> list[Record]:
    """Read until ``done(records)`` holds; fail after ``timeout_s``."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while not done(records):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s with {len(records)} records")
        records.extend(await consumer.getmany(timeout_ms=100, max_records=500))
    return records


async def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return len(described[0]["partitions"])


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ----------------------------------------------------------------------------- settings


def test_settings_defaults_suit_the_embedded_broker() -> None:
    settings = KafkaSettings()
    assert settings.fetch_max_wait_ms == 10
    assert settings.session_timeout_ms == 6000
    assert settings.heartbeat_interval_ms == 500
    assert settings.max_poll_interval_ms == 600_000
    assert settings.acks == "all"
    assert settings.enable_idempotence is False
    assert settings.partitions == 6
    assert settings.replication_factor == 1


def test_settings_from_env_reads_every_variable() -> None:
    settings = KafkaSettings.from_env(
        {
            "AIPIPE_KAFKA_FETCH_MAX_WAIT_MS": "20",
            "AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "10000",
            "AIPIPE_KAFKA_PARTITIONS": "12",
            "AIPIPE_KAFKA_REPLICATION_FACTOR": "3",
            "AIPIPE_KAFKA_IDEMPOTENCE": "true",
            "AIPIPE_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "AIPIPE_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "AIPIPE_KAFKA_SASL_USERNAME": "svc",
            "AIPIPE_KAFKA_SASL_PASSWORD": "hunter2",
            "AIPIPE_KAFKA_SSL_CAFILE": "/etc/ca.pem",
            "UNRELATED": "x",
        }
    )
    assert settings.fetch_max_wait_ms == 20
    assert settings.session_timeout_ms == 10000
    assert settings.partitions == 12
    assert settings.replication_factor == 3
    assert settings.enable_idempotence is True
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.sasl_username == "svc"
    assert settings.sasl_password == "hunter2"
    assert settings.ssl_cafile == "/etc/ca.pem"
    assert KafkaSettings.from_env({}) == KafkaSettings()


def test_settings_short_session_timeout_lowers_the_heartbeat() -> None:
    settings = KafkaSettings.from_env({"AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "300"})
    assert settings.heartbeat_interval_ms < settings.session_timeout_ms


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AIPIPE_KAFKA_PARTITIONS", "six"),
        ("AIPIPE_KAFKA_PARTITIONS", "0"),
        ("AIPIPE_KAFKA_FETCH_MAX_WAIT_MS", "-1"),
        ("AIPIPE_KAFKA_SESSION_TIMEOUT_MS", "1.5"),
        ("AIPIPE_KAFKA_REPLICATION_FACTOR", "x"),
        ("AIPIPE_KAFKA_IDEMPOTENCE", "maybe"),
        ("AIPIPE_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("AIPIPE_KAFKA_SASL_MECHANISM", "KERBEROS"),
    ],
)
def test_settings_from_env_names_the_bad_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        KafkaSettings.from_env({variable: value})


def test_settings_sasl_needs_credentials() -> None:
    with pytest.raises(ValueError, match="AIPIPE_KAFKA_SASL_USERNAME"):
        KafkaSettings.from_env({"AIPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    with pytest.raises(ValueError, match="sasl_username"):
        KafkaSettings(security_protocol="SASL_SSL")


def test_settings_repr_masks_the_password() -> None:
    settings = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="svc", sasl_password="hunter2-secret")
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings)
    assert "sasl_password='***'" in repr(settings)
    assert "svc" in repr(settings)


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        KafkaSettings(session_timeout_ms=1000, heartbeat_interval_ms=1000)
    with pytest.raises(ValueError, match="acks"):
        KafkaSettings(enable_idempotence=True, acks=1)
    with pytest.raises(ValueError, match="partitions"):
        KafkaSettings(partitions=0)


def test_bad_bootstrap_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="bad Kafka address"):
        KafkaBus("localhost:notaport")


# ----------------------------------------------------------------------------- connecting


async def test_broker_answers(kafka_bootstrap: str) -> None:
    assert await broker_answers(kafka_bootstrap)
    await wait_until_ready(kafka_bootstrap, timeout_s=5)
    started = time.monotonic()
    assert not await broker_answers(f"127.0.0.1:{free_port()}", timeout_s=0.3)
    assert time.monotonic() - started < 2.0
    assert not await broker_answers("not an address:x")


async def test_start_fails_clearly_when_nothing_answers() -> None:
    address = f"127.0.0.1:{free_port()}"
    kafka = KafkaBus(address, KafkaSettings(start_timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(BusError, match=address):
        await kafka.start()
    assert time.monotonic() - started < 5.0
    await kafka.stop()


async def test_use_before_start_is_a_bus_error(kafka_bootstrap: str) -> None:
    kafka = KafkaBus(kafka_bootstrap)
    with pytest.raises(BusError, match="not started"):
        await kafka.publish(Outgoing("t", b"v"))
    with pytest.raises(BusError, match="not started"):
        await kafka.consumer(["t"], group=None)


@pytest.mark.skipif(not EMBEDDED, reason="a real Kafka cluster supports idempotent producers")
async def test_idempotence_on_the_embedded_broker_fails_with_a_hint(kafka_bootstrap: str) -> None:
    kafka = KafkaBus(kafka_bootstrap, KafkaSettings(enable_idempotence=True, start_timeout_s=5))
    with pytest.raises(BusError, match="AIPIPE_KAFKA_IDEMPOTENCE=0"):
        await kafka.start()
    await kafka.stop()


# ----------------------------------------------------------------------------- topics


async def test_ensure_topics_creates_configured_partitions_and_is_idempotent(
    bus: KafkaBus, kafka_bootstrap: str, unique_prefix: str
) -> None:
    topics = [f"{unique_prefix}a", f"{unique_prefix}b"]
    # Two concurrent calls race to create the same topics: both must succeed.
    await asyncio.gather(bus.ensure_topics(topics), bus.ensure_topics(topics))
    await bus.ensure_topics(topics)
    for topic in topics:
        assert await partition_count(kafka_bootstrap, topic) == 6

    other = KafkaBus(kafka_bootstrap, KafkaSettings(partitions=2))
    await other.start()
    try:
        await other.ensure_topics([topics[0], f"{unique_prefix}c"])  # existing one kept as it is
    finally:
        await other.stop()
    assert await partition_count(kafka_bootstrap, topics[0]) == 6
    assert await partition_count(kafka_bootstrap, f"{unique_prefix}c") == 2


async def test_first_publish_creates_the_topic_with_configured_partitions(
    bus: KafkaBus, kafka_bootstrap: str, unique_prefix: str
) -> None:
    topic = f"{unique_prefix}fresh"
    await bus.publish(Outgoing(topic, b"x"))
    assert await partition_count(kafka_bootstrap, topic) == 6  # not the broker's auto-creation default


# ----------------------------------------------------------------------------- publish and read


async def test_round_trip_keeps_key_headers_and_timestamp(bus: KafkaBus, unique_prefix: str) -> None:
    topic = f"{unique_prefix}rt"
    reader = await bus.consumer([topic], group=None)
    try:
        before_ms = int(time.time() * 1000)
        await bus.publish(
            Outgoing(topic, b'{"hello": 1}', key=b"req-1", headers=(("traceparent", b"00-abc"), ("x", b"")))
        )
        await bus.publish(Outgoing(topic, b"no key"))
        after_ms = int(time.time() * 1000)
        records = await collect(reader, lambda got: len(got) >= 2)
    finally:
        await reader.stop()
    by_value = {record.value: record for record in records}
    first = by_value[b'{"hello": 1}']
    assert first.topic == topic
    assert first.key == b"req-1"
    assert first.headers == (("traceparent", b"00-abc"), ("x", b""))
    assert first.header("traceparent") == b"00-abc"
    assert before_ms - 1000 <= first.timestamp_ms <= after_ms + 1000
    assert by_value[b"no key"].key is None
    assert by_value[b"no key"].headers == ()
    # Same key, same partition: a later record with key req-1 goes where the first did.
    assert 0 <= first.partition < 6


async def test_broadcast_reads_every_partition(bus: KafkaBus, unique_prefix: str) -> None:
    topic = f"{unique_prefix}bc"
    await bus.ensure_topics([topic])
    sent = {f"k{i}".encode() for i in range(40)}
    await asyncio.gather(*(bus.publish(Outgoing(topic, key, key=key)) for key in sent))
    reader = await bus.consumer([topic], group=None)
    second = await bus.consumer([topic], group=None)
    try:
        assert reader.assignment() == frozenset((topic, p) for p in range(6))
        records = await collect(reader, lambda got: {r.value for r in got} >= sent)
        again = await collect(second, lambda got: {r.value for r in got} >= sent)
        # A broadcast reader never commits; committing is a no-op.
        await reader.commit({(topic, 0): 1})
    finally:
        await reader.stop()
        await second.stop()
    assert {r.partition for r in records} == set(range(6))
    assert len(again) == len(records)  # every reader sees everything
    per_partition: dict[int, list[int]] = {}
    for record in records:
        per_partition.setdefault(record.partition, []).append(record.offset)
    assert all(offsets == sorted(offsets) for offsets in per_partition.values())


async def test_broadcast_from_end_skips_old_records(bus: KafkaBus, unique_prefix: str) -> None:
    topic = f"{unique_prefix}end"
    for i in range(12):
        await bus.publish(Outgoing(topic, f"old-{i}".encode(), key=f"k{i}".encode()))
    reader = await bus.consumer([topic], group=None, from_beginning=False)
    try:
        await bus.publish(Outgoing(topic, b"new", key=b"k0"))
        records = await collect(reader, lambda got: any(r.value == b"new" for r in got))
    finally:
        await reader.stop()
    old_seen = [r for r in records if r.value.startswith(b"old-")]
    # Tansu's end offset is the start of the last batch: at most one old batch per partition shows up.
    assert len(old_seen) <= (6 if EMBEDDED else 0)


@pytest_asyncio.fixture(scope="module")
async def group_bus(kafka_bootstrap: str) -> AsyncIterator[KafkaBus]:
    """A bus whose group joins are quick on the embedded broker (each is held session_timeout / 2)."""
    kafka = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


async def test_group_commit_resume_and_rebalance(
    group_bus: KafkaBus, unique_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = group_bus
    caplog.set_level(logging.INFO, logger="pipeline.bus.kafka")
    topic = f"{unique_prefix}grp"
    group = f"{unique_prefix}g"
    for i in range(10):
        await bus.publish(Outgoing(topic, str(i).encode(), key=b"same"))  # one partition, in order

    first = await bus.consumer([topic], group=group)
    assert first.assignment() == frozenset((topic, p) for p in range(6))
    assert f"in group {group}" in caplog.text and "assigned partitions" in caplog.text
    records = await collect(first, lambda got: len(got) >= 10)
    assert [r.value for r in records] == [str(i).encode() for i in range(10)]
    fifth = records[4]
    # Commit after the 5th record; a partition we do not hold is dropped, not an error.
    await first.commit({(fifth.topic, fifth.partition): fifth.offset + 1, (f"{unique_prefix}other", 0): 3})
    await first.stop()
    with pytest.raises(BusError):
        await first.getmany(timeout_ms=10, max_records=1)

    resumed = await bus.consumer([topic], group=group)
    try:
        again = await collect(resumed, lambda got: len(got) >= 5)
        assert [r.value for r in again][:5] == [str(i).encode() for i in range(5, 10)]

        assigned: list[frozenset[tuple[str, int]]] = []
        revoked: list[frozenset[tuple[str, int]]] = []
        resumed.on_assign = assigned.append

        async def on_revoke(partitions: frozenset[tuple[str, int]]) -> None:
            revoked.append(partitions)

        resumed.on_revoke = on_revoke
        caplog.clear()
        joiner = await bus.consumer([topic], group=group)
        try:
            # The old member takes part in the rebalance while it keeps reading.
            async def keep_reading() -> None:
                while not assigned:
                    await resumed.getmany(timeout_ms=50, max_records=10)

            await asyncio.wait_for(keep_reading(), timeout=20)
            await wait_for(lambda: len(resumed.assignment()) + len(joiner.assignment()) == 6)
            assert revoked and revoked[0] == frozenset((topic, p) for p in range(6))
            assert resumed.assignment() | joiner.assignment() == frozenset((topic, p) for p in range(6))
            assert not resumed.assignment() & joiner.assignment()
            assert caplog.text.count(f"in group {group}") >= 2  # each member logs its assignment
        finally:
            await joiner.stop()
    finally:
        await resumed.stop()


async def test_confluent_kafka_reads_what_kafka_bus_wrote_and_back(
    bus: KafkaBus, kafka_bootstrap: str, unique_prefix: str
) -> None:
    to_confluent = f"{unique_prefix}out"
    from_confluent = f"{unique_prefix}in"
    await bus.ensure_topics([to_confluent, from_confluent])
    await bus.publish(Outgoing(to_confluent, b'{"id": "r1"}', key=b"r1", headers=(("aipipe-schema", b"1"),)))

    def confluent_read() -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]]:
        consumer = Consumer(
            {"bootstrap.servers": kafka_bootstrap, "group.id": f"{unique_prefix}cf", "enable.auto.commit": False}
        )
        try:
            consumer.assign([ConfluentTopicPartition(to_confluent, p, OFFSET_BEGINNING) for p in range(6)])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    return [(message.key(), message.value(), message.headers())]
            return []
        finally:
            consumer.close()

    def confluent_write() -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(from_confluent, value=b'{"id": "r2"}', key=b"r2", headers=[("traceparent", b"00-x")])
        assert producer.flush(15) == 0

    got = await asyncio.to_thread(confluent_read)
    assert got == [(b"r1", b'{"id": "r1"}', [("aipipe-schema", b"1")])]

    await asyncio.to_thread(confluent_write)
    reader = await bus.consumer([from_confluent], group=None)
    try:
        records = await collect(reader, lambda got: len(got) >= 1)
    finally:
        await reader.stop()
    assert records[0].key == b"r2"
    assert records[0].value == b'{"id": "r2"}'
    assert records[0].headers == (("traceparent", b"00-x"),)


# ----------------------------------------------------------------------------- broker restart


async def test_bus_survives_a_broker_restart(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    await broker.start()
    kafka = KafkaBus(broker.address, KafkaSettings(request_timeout_ms=10_000))
    try:
        await kafka.start()
        topic = "restart.t"
        await kafka.ensure_topics([topic])
        reader = await kafka.consumer([topic], group=None)
        await kafka.publish(Outgoing(topic, b"before", key=b"k"))
        await collect(reader, lambda got: any(r.value == b"before" for r in got))

        await broker.stop()
        for _ in range(3):  # errors while the broker is down are BusErrors or empty reads, never others
            try:
                await reader.getmany(timeout_ms=50, max_records=10)
            except BusError:
                pass
        await broker.start()  # same port, empty broker
        await kafka.ensure_topics([topic])
        # The new log restarts at offset 0 while the reader's position is 1: write a few so it sees some.
        for _ in range(3):
            await asyncio.wait_for(kafka.publish(Outgoing(topic, b"after", key=b"k")), timeout=20)

        async def read_after() -> None:
            while True:
                try:
                    records = await reader.getmany(timeout_ms=100, max_records=10)
                except BusError:
                    continue
                if any(r.value == b"after" for r in records):
                    return

        await asyncio.wait_for(read_after(), timeout=20)

        # Stopping while the broker is gone must neither hang nor raise.
        await broker.stop()
        for _ in range(5):
            try:
                await reader.getmany(timeout_ms=50, max_records=10)
            except BusError:
                pass
        await asyncio.wait_for(reader.stop(), timeout=15)
        assert reader.assignment() == frozenset()
    finally:
        await kafka.stop()
        await broker.stop()
