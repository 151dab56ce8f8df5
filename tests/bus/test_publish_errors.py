"""Publish errors are classified: permanent ones are never retried (aiokafka error classes, DESIGN B3)."""

from __future__ import annotations

import aiokafka.errors as Errors
import anyio
import pytest

from pipeline.bus.kafka import PERMANENT_PUBLISH_ERRORS, publish_error
from pipeline.bus.protocol import BusError, MessageTooLargeError, Outgoing, PermanentBusError
from pipeline.runtime.runner import dead_letter, publish_with_retry


@pytest.mark.parametrize("error_class", PERMANENT_PUBLISH_ERRORS)
def test_each_permanent_kafka_error_is_a_permanent_bus_error(error_class: type[Exception]) -> None:
    error = publish_error("ai.requests", error_class())
    assert isinstance(error, PermanentBusError) and "ai.requests" in str(error)


@pytest.mark.parametrize(
    "error_class", [Errors.MessageSizeTooLargeError, Errors.RecordListTooLargeError, Errors.RecordTooLargeError]
)
def test_size_errors_say_too_large(error_class: type[Exception]) -> None:
    assert isinstance(publish_error("t", error_class()), MessageTooLargeError)


@pytest.mark.parametrize(
    "error_class",
    [
        Errors.KafkaConnectionError,
        Errors.RequestTimedOutError,
        Errors.NotLeaderForPartitionError,
        Errors.LeaderNotAvailableError,
        Errors.KafkaTimeoutError,
        Errors.UnknownTopicOrPartitionError,
    ],
)
def test_transient_kafka_errors_stay_retryable(error_class: type[Exception]) -> None:
    error = publish_error("t", error_class())
    assert type(error) is BusError


class _FailingBus:
    """A bus whose publish fails with the given errors, then succeeds."""

    def __init__(self, *errors: BusError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def publish(self, message: Outgoing) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


async def test_a_permanent_failure_is_raised_at_once() -> None:
    bus = _FailingBus(MessageTooLargeError("too large"))
    with anyio.fail_after(1), pytest.raises(MessageTooLargeError):
        await publish_with_retry(bus, Outgoing(topic="t", value=b"x"))  # type: ignore[arg-type]
    assert bus.calls == 1


async def test_a_transient_failure_is_retried_until_it_passes() -> None:
    bus = _FailingBus(BusError("broker away"), BusError("broker away"))
    with anyio.fail_after(5):
        await publish_with_retry(bus, Outgoing(topic="t", value=b"x"), max_delay_s=0.05)  # type: ignore[arg-type]
    assert bus.calls == 3


def test_a_dead_letter_too_large_for_the_bus_keeps_the_originals_size_and_hash() -> None:
    raw = bytes(range(256)) * 20_000  # 5,120,000 bytes
    letter = dead_letter("ai.requests", 1, 7, "k", "not JSON", "cache", raw, 4_194_304)
    assert letter.truncated and letter.raw_size == len(raw) and 0 < len(letter.raw) < len(raw)
    assert letter.raw_sha256 == __import__("hashlib").sha256(raw).hexdigest()
    assert raw.startswith(letter.raw)
    encoded = __import__("msgspec").json.encode(letter)
    assert len(encoded) <= 4_194_304
    small = dead_letter("ai.requests", 1, 8, "k", "not JSON", "cache", b"abc", 4_194_304)
    assert not small.truncated and small.raw == b"abc" and small.raw_size == 3
    unlimited = dead_letter("ai.requests", 1, 9, "k", "not JSON", "cache", raw, None)
    assert not unlimited.truncated and unlimited.raw == raw


def test_a_key_that_is_not_utf8_is_kept_exactly_in_the_dead_letter() -> None:
    letter = dead_letter("ai.requests", 1, 7, b"\xff\xfe-tenant", "not JSON", "cache", b"raw", None)
    assert letter.raw_key == b"\xff\xfe-tenant" and letter.key == "\ufffd\ufffd-tenant" and letter.raw == b"raw"
    plain = dead_letter("ai.requests", 1, 8, b"tenant-7", "not JSON", "cache", b"raw", None)
    assert plain.key == "tenant-7" and plain.raw_key is None
