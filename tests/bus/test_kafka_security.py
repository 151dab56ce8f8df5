"""Production Kafka settings reach aiokafka: SASL/SSL, CA file, acks=all and idempotence, on every client.

``KafkaSettings.from_env`` parsing is covered in test_kafka_bus.py; here the producer, the admin
client and a group consumer that ``KafkaBus`` builds are replaced by recorders of their keyword
arguments, so the test needs no SASL-enabled broker.
"""

from __future__ import annotations

from typing import Any

import pytest

import pipeline.bus.kafka as kafka_bus
from pipeline.bus.kafka import KafkaBus, KafkaSettings

ENV = {
    "AIPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "AIPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "AIPIPE_KAFKA_SASL_USERNAME": "aipipe-svc",
    "AIPIPE_KAFKA_SASL_PASSWORD": "s3cret-value",
    "AIPIPE_KAFKA_SSL_CAFILE": "/etc/kafka/ca.pem",
    "AIPIPE_KAFKA_IDEMPOTENCE": "1",
    "AIPIPE_KAFKA_REPLICATION_FACTOR": "3",
    "AIPIPE_KAFKA_PARTITIONS": "12",
}


class _Recorder:
    """Stands in for an aiokafka client class: records its keyword arguments, does no I/O."""

    def __init__(self, kind: str, made: list[tuple[str, dict[str, Any]]], *args: Any, **kwargs: Any) -> None:
        self.kind = kind
        made.append((kind, kwargs))

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def describe_topics(self) -> list[dict[str, Any]]:
        return [{"topic": "ai.stage.execute", "partitions": [{}] * 12, "error_code": 0}]

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        return None

    def assignment(self) -> set[Any]:
        return set()


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    made: list[tuple[str, dict[str, Any]]] = []

    async def ready(bootstrap: str, timeout_s: float, settings: KafkaSettings | None = None) -> None:
        made.append(("probe", {"settings": settings}))

    monkeypatch.setattr(kafka_bus, "wait_until_ready", ready)
    monkeypatch.setattr(kafka_bus, "create_ssl_context", lambda cafile=None: ("ssl-context", cafile))
    for name, kind in (
        ("AIOKafkaProducer", "producer"),
        ("AIOKafkaAdminClient", "admin"),
        ("AIOKafkaConsumer", "consumer"),
    ):
        monkeypatch.setattr(kafka_bus, name, lambda *a, _kind=kind, **kw: _Recorder(_kind, made, *a, **kw))
    return made


async def test_sasl_ssl_acks_and_idempotence_reach_every_client(made: list[tuple[str, dict[str, Any]]]) -> None:
    settings = KafkaSettings.from_env(ENV)
    bus = KafkaBus("kafka-1:9093,kafka-2:9093", settings)
    await bus.start()
    consumer = await bus.consumer(["ai.stage.execute"], group="ai.executor")
    await consumer.stop()
    await bus.stop()

    clients = {kind: kwargs for kind, kwargs in made if kind != "probe"}
    assert set(clients) == {"producer", "admin", "consumer"}
    for kind, kwargs in clients.items():
        assert kwargs["bootstrap_servers"] == "kafka-1:9093,kafka-2:9093", kind
        assert kwargs["security_protocol"] == "SASL_SSL", kind
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512", kind
        assert kwargs["sasl_plain_username"] == "aipipe-svc", kind
        assert kwargs["sasl_plain_password"] == "s3cret-value", kind
        assert kwargs["ssl_context"] == ("ssl-context", "/etc/kafka/ca.pem"), kind
    assert clients["producer"]["acks"] == "all"
    assert clients["producer"]["enable_idempotence"] is True
    assert clients["consumer"]["group_id"] == "ai.executor"
    assert clients["consumer"]["enable_auto_commit"] is False
    # The readiness probe connects with the same security settings.
    probes = [kwargs["settings"] for kind, kwargs in made if kind == "probe"]
    assert probes == [settings]
    assert (settings.partitions, settings.replication_factor) == (12, 3)
    assert "s3cret-value" not in repr(settings)


def test_defaults_are_acks_all_and_plaintext() -> None:
    settings = KafkaSettings.from_env({})
    assert settings.acks == "all"
    assert settings.security_protocol == "PLAINTEXT"
    assert not settings.enable_idempotence  # the embedded broker refuses idempotent producers
    assert settings.partitions == 6 and settings.replication_factor == 1
