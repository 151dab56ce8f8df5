"""The Kafka implementation of the bus protocol (``pipeline.bus.protocol``), on aiokafka.

``KafkaBus`` talks to any Kafka-compatible broker: the embedded Tansu broker
(``pipeline.bus.discovery``) or a real cluster named by ``AIPIPE_KAFKA_BOOTSTRAP``.
Its defaults (``KafkaSettings``) are tuned for the embedded broker, whose
measured limits are in ``EMBEDDED-BROKER.md``:

- a waiting fetch is not woken by new data, so ``fetch_max_wait_ms`` is low
  (10 ms) to keep the latency per hop at a few milliseconds;
- a group join is held for ``max(1 s, session_timeout_ms / 2)``, so the session
  timeout is short (6 s) with a 500 ms heartbeat;
- idempotent producers fail at start there, so ``enable_idempotence`` is off by
  default (turn it on for a real cluster with ``AIPIPE_KAFKA_IDEMPOTENCE=1``);
- auto-created topics get 4 partitions, so topics are created explicitly with
  the configured partition count, by ``ensure_topics`` and before the first
  publish to or read of a topic;
- end offsets point at the start of the last batch, so a reader that starts
  "from the end" may see the last batch written before it started: readers
  filter by id or by the record's timestamp anyway.

A broker restart loses every topic, group and committed offset (embedded broker
only). The clients reconnect by themselves in about a second; ``getmany``
raises ``BusError`` for errors it cannot hide, and the consumer keeps working
after it. Call ``ensure_topics`` again after a restart: until then, a client
that asks for a lost topic's metadata may have it auto-created (with the
broker's default partition count), which is still correct, only less spread.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka import errors as Errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import ConsumerStoppedError, IllegalStateError, KafkaError, for_code
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.protocol.metadata import MetadataRequest
from cachetools import LRUCache

from pipeline.bus.protocol import BusError, MessageTooLargeError, Outgoing, PermanentBusError, Record, TopicPartition

__all__ = [
    "AssignmentHook",
    "KafkaBus",
    "KafkaConsumer",
    "KafkaSettings",
    "KeyHashPartitioner",
    "broker_answers",
    "client_kwargs",
    "producer_kwargs",
    "wait_until_ready",
]

log = logging.getLogger(__name__)

#: A rebalance hook: called with the partitions gained or lost; may return an awaitable.
AssignmentHook = Callable[[frozenset[TopicPartition]], object]

Acks = Literal[0, 1, "all"]

_SECURITY_PROTOCOLS = frozenset({"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"})
_SASL_MECHANISMS = frozenset({"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"})
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_TOPIC_ALREADY_EXISTS = 36
_DEFAULT_KAFKA_PORT = 9092
_MASK = "***"


#: How long (s) a group member watches for partitions that restarted empty after ``restart_from_zero``.
RESTART_WATCH_S = 30.0

#: Partitions of aipipe's topics on the embedded broker: what it gives a topic it creates on its own.
EMBEDDED_PARTITIONS = 4


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Client settings for ``KafkaBus``; immutable, the SASL password masked in ``repr``.

    The defaults suit the embedded broker and are safe on Apache Kafka.

    Attributes:
        fetch_max_wait_ms: longest time (ms) the broker holds a fetch with no data;
            on the embedded broker the latency per hop is about half of it, and
            each consumer sends about ``1000 / fetch_max_wait_ms`` fetches a second
            while idle (``bench/idle_cpu.py`` measures what that costs).
        background_fetch_max_wait_ms: the same for consumers off a request's path
            (``consumer(..., background=True)``: circuit breaker, health monitor,
            archive, the control and cost feeds), which need no 10 ms reaction;
            never below ``fetch_max_wait_ms`` (``fetch_wait_ms``).
        session_timeout_ms: consumer group session timeout (ms); a group join
            takes at least half of it on the embedded broker.
        heartbeat_interval_ms: consumer group heartbeat period (ms), below the session timeout.
        max_poll_interval_ms: longest gap (ms) between two ``getmany`` calls
            before the member is dropped from its group (long enough for a 60 s provider call).
        linger_ms: how long (ms) the producer waits to batch messages. 0: a
            message goes out at once; messages published while a produce
            request is in flight are still batched into the next one (measured
            with ``aipipe bench`` on the embedded broker: 0 ms halves the
            acknowledgement time at 100 requests/s, ~1 ms instead of ~2.5 ms,
            and costs no throughput under load).
        max_batch_size_bytes: largest producer batch per partition (bytes).
        max_request_size_bytes: largest produce request (bytes), so the largest message.
        request_timeout_ms: limit (ms) for one request to the broker, and for a publish.
        metadata_max_age_ms: period (ms) of the metadata refresh that discovers new partitions.
        retry_backoff_ms: pause (ms) between the client's internal retries.
        acks: acknowledgements a publish waits for: ``0``, ``1`` or ``"all"``.
        enable_idempotence: idempotent producer (needs ``acks="all"``; the
            embedded broker does not support it).
        compression_type: ``None``, ``"gzip"``, ``"snappy"``, ``"lz4"`` or ``"zstd"``.
        partitions: partition count of the topics ``ensure_topics`` creates.
        replication_factor: replication factor of the topics ``ensure_topics`` creates.
        start_timeout_s: how long (s) ``start`` and ``consumer`` keep trying before they fail.
        client_id: client name the broker logs.
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
        sasl_username: SASL user, required with a ``SASL_*`` protocol.
        sasl_password: SASL password, required with a ``SASL_*`` protocol; never printed.
        ssl_cafile: CA bundle (path) to verify the brokers with; ``None``: the system's.

    Raises:
        ValueError: when a value is out of range or the security settings are incomplete.
    """

    fetch_max_wait_ms: int = 10
    background_fetch_max_wait_ms: int = 100
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 500
    max_poll_interval_ms: int = 600_000
    linger_ms: int = 0
    max_batch_size_bytes: int = 262_144
    max_request_size_bytes: int = 4_194_304
    request_timeout_ms: int = 30_000
    metadata_max_age_ms: int = 30_000
    retry_backoff_ms: int = 100
    acks: Acks = "all"
    enable_idempotence: bool = False
    compression_type: str | None = None
    partitions: int = 6
    replication_factor: int = 1
    start_timeout_s: float = 30.0
    client_id: str = "aipipe"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "max_poll_interval_ms",
            "max_batch_size_bytes",
            "max_request_size_bytes",
            "request_timeout_ms",
            "metadata_max_age_ms",
            "partitions",
            "replication_factor",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"KafkaSettings.{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("fetch_max_wait_ms", "background_fetch_max_wait_ms", "linger_ms", "retry_backoff_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"KafkaSettings.{name} must not be negative, got {getattr(self, name)!r}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"KafkaSettings.start_timeout_s must be positive, got {self.start_timeout_s!r}")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                "KafkaSettings.heartbeat_interval_ms must be below session_timeout_ms "
                f"({self.heartbeat_interval_ms} >= {self.session_timeout_ms})"
            )
        if self.acks not in (0, 1, "all"):
            raise ValueError(f"KafkaSettings.acks must be 0, 1 or 'all', got {self.acks!r}")
        if self.enable_idempotence and self.acks != "all":
            raise ValueError("KafkaSettings.enable_idempotence needs acks='all'")
        if self.compression_type not in (None, "gzip", "snappy", "lz4", "zstd"):
            raise ValueError(f"KafkaSettings.compression_type is not supported: {self.compression_type!r}")
        if self.security_protocol not in _SECURITY_PROTOCOLS:
            raise ValueError(
                f"KafkaSettings.security_protocol must be one of {sorted(_SECURITY_PROTOCOLS)}, "
                f"got {self.security_protocol!r}"
            )
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism not in _SASL_MECHANISMS:
                raise ValueError(
                    f"KafkaSettings.sasl_mechanism must be one of {sorted(_SASL_MECHANISMS)}, "
                    f"got {self.sasl_mechanism!r}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_username and sasl_password")

    def __repr__(self) -> str:
        parts = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "sasl_password" and value is not None:
                parts.append(f"{item.name}={_MASK!r}")
            else:
                parts.append(f"{item.name}={value!r}")
        return f"KafkaSettings({', '.join(parts)})"

    __str__ = __repr__

    def fetch_wait_ms(self, *, background: bool = False) -> int:
        """``fetch_max_wait_ms`` (ms) of a consumer: a background one never waits less than one on the path."""
        if background:
            return max(self.background_fetch_max_wait_ms, self.fetch_max_wait_ms)
        return self.fetch_max_wait_ms

    def for_embedded(self, env: Mapping[str, str]) -> KafkaSettings:
        """These settings for the embedded broker: ``EMBEDDED_PARTITIONS`` per topic unless ``AIPIPE_KAFKA_PARTITIONS``.

        The embedded broker creates a topic a client merely names with 4
        partitions (``EMBEDDED-BROKER.md``); after it restarts (a rotation) a
        reconnecting client may name a topic before aipipe re-creates it, so
        aipipe's own topics get the same count and the race changes nothing.
        """
        if env.get("AIPIPE_KAFKA_PARTITIONS"):
            return self
        return replace(self, partitions=EMBEDDED_PARTITIONS)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KafkaSettings:
        """Build settings from ``AIPIPE_KAFKA_*`` environment variables; unset or empty ones keep defaults.

        Reads ``AIPIPE_KAFKA_FETCH_MAX_WAIT_MS``, ``AIPIPE_KAFKA_BACKGROUND_FETCH_MAX_WAIT_MS``,
        ``AIPIPE_KAFKA_SESSION_TIMEOUT_MS``,
        ``AIPIPE_KAFKA_PARTITIONS``, ``AIPIPE_KAFKA_REPLICATION_FACTOR``,
        ``AIPIPE_KAFKA_IDEMPOTENCE`` (``1``/``true``/``yes``/``on`` or
        ``0``/``false``/``no``/``off``), ``AIPIPE_KAFKA_SECURITY_PROTOCOL``,
        ``AIPIPE_KAFKA_SASL_MECHANISM``, ``AIPIPE_KAFKA_SASL_USERNAME``,
        ``AIPIPE_KAFKA_SASL_PASSWORD``, ``AIPIPE_KAFKA_SSL_CAFILE`` and
        ``AIPIPE_KAFKA_START_TIMEOUT_S`` (s, how long to wait for the broker). The
        heartbeat interval follows a session timeout set below the default, so
        it stays under it.

        Args:
            env: the environment (for example ``os.environ``).

        Returns:
            The settings.

        Raises:
            ValueError: naming the variable, when one cannot be parsed or is out of range.
        """
        values: dict[str, Any] = {}
        int_vars = {
            "AIPIPE_KAFKA_FETCH_MAX_WAIT_MS": ("fetch_max_wait_ms", 0),
            "AIPIPE_KAFKA_BACKGROUND_FETCH_MAX_WAIT_MS": ("background_fetch_max_wait_ms", 0),
            "AIPIPE_KAFKA_SESSION_TIMEOUT_MS": ("session_timeout_ms", 2),
            "AIPIPE_KAFKA_PARTITIONS": ("partitions", 1),
            "AIPIPE_KAFKA_REPLICATION_FACTOR": ("replication_factor", 1),
        }
        for var, (name, minimum) in int_vars.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                number = int(raw)
            except ValueError:
                raise ValueError(f"{var} must be an integer, got {raw!r}") from None
            if number < minimum:
                raise ValueError(f"{var} must be at least {minimum}, got {number}")
            values[name] = number
        session_ms = values.get("session_timeout_ms")
        default_heartbeat_ms = next(f.default for f in fields(cls) if f.name == "heartbeat_interval_ms")
        if session_ms is not None and session_ms <= default_heartbeat_ms:
            values["heartbeat_interval_ms"] = max(1, session_ms // 3)

        raw = env.get("AIPIPE_KAFKA_START_TIMEOUT_S", "").strip()
        if raw:
            try:
                values["start_timeout_s"] = float(raw)
            except ValueError as exc:
                raise ValueError(f"AIPIPE_KAFKA_START_TIMEOUT_S must be a number of seconds, got {raw!r}") from exc
            if values["start_timeout_s"] <= 0:
                raise ValueError(f"AIPIPE_KAFKA_START_TIMEOUT_S must be positive, got {raw!r}")
        raw = env.get("AIPIPE_KAFKA_IDEMPOTENCE", "").strip().lower()
        if raw:
            if raw in _TRUE_WORDS:
                values["enable_idempotence"] = True
            elif raw in _FALSE_WORDS:
                values["enable_idempotence"] = False
            else:
                raise ValueError(f"AIPIPE_KAFKA_IDEMPOTENCE must be 1/true/yes/on or 0/false/no/off, got {raw!r}")

        raw = env.get("AIPIPE_KAFKA_SECURITY_PROTOCOL", "").strip().upper()
        if raw:
            if raw not in _SECURITY_PROTOCOLS:
                raise ValueError(
                    f"AIPIPE_KAFKA_SECURITY_PROTOCOL must be one of {sorted(_SECURITY_PROTOCOLS)}, got {raw!r}"
                )
            values["security_protocol"] = raw
        raw = env.get("AIPIPE_KAFKA_SASL_MECHANISM", "").strip().upper()
        if raw:
            if raw not in _SASL_MECHANISMS:
                raise ValueError(f"AIPIPE_KAFKA_SASL_MECHANISM must be one of {sorted(_SASL_MECHANISMS)}, got {raw!r}")
            values["sasl_mechanism"] = raw
        for var, name in (
            ("AIPIPE_KAFKA_SASL_USERNAME", "sasl_username"),
            ("AIPIPE_KAFKA_SASL_PASSWORD", "sasl_password"),
            ("AIPIPE_KAFKA_SSL_CAFILE", "ssl_cafile"),
        ):
            raw = env.get(var, "")
            if raw:
                values[name] = raw
        try:
            return cls(**values)
        except ValueError as exc:
            protocol = values.get("security_protocol", "PLAINTEXT")
            if str(protocol).startswith("SASL_") and "sasl_username" in str(exc):
                raise ValueError(
                    f"AIPIPE_KAFKA_SECURITY_PROTOCOL={protocol} needs AIPIPE_KAFKA_SASL_USERNAME "
                    "and AIPIPE_KAFKA_SASL_PASSWORD"
                ) from None
            raise ValueError(f"invalid AIPIPE_KAFKA_* settings: {exc}") from None


# --------------------------------------------------------------------------- helpers


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Build the connection keyword arguments shared by aiokafka's producer, consumer and admin client."""
    ssl_context = None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        ssl_context = create_ssl_context(cafile=settings.ssl_cafile)
    return {
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "retry_backoff_ms": settings.retry_backoff_ms,
        "metadata_max_age_ms": settings.metadata_max_age_ms,
        "security_protocol": settings.security_protocol,
        "ssl_context": ssl_context,
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_plain_username": settings.sasl_username,
        "sasl_plain_password": settings.sasl_password,
    }


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    """Split ``host:port[,host:port...]`` (IPv6 hosts in brackets) into pairs.

    Raises:
        ValueError: when the address is empty or a port is not a number.
    """
    pairs: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest.lstrip(":")
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        else:
            host, port_text = item, ""
        try:
            port = int(port_text) if port_text else _DEFAULT_KAFKA_PORT
        except ValueError:
            raise ValueError(f"bad Kafka address {item!r} in {bootstrap!r}") from None
        pairs.append((host, port))
    if not pairs:
        raise ValueError(f"no Kafka address in {bootstrap!r}")
    return pairs


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: aiokafka errors after which the same message can never be published (retrying is useless).
PERMANENT_PUBLISH_ERRORS: tuple[type[KafkaError], ...] = (
    Errors.MessageSizeTooLargeError,
    Errors.RecordListTooLargeError,
    Errors.InvalidTopicError,
    Errors.TopicAuthorizationFailedError,
    Errors.ClusterAuthorizationFailedError,
    Errors.UnsupportedVersionError,
    Errors.UnsupportedForMessageFormatError,
    Errors.InvalidRequiredAcksError,
    Errors.CorruptRecordException,
    Errors.RecordTooLargeError,
)


def publish_error(topic: str, exc: BaseException) -> BusError:
    """The bus error for a failed publish: permanent for ``PERMANENT_PUBLISH_ERRORS``, else retryable.

    ``MessageSizeTooLargeError`` (raised by the producer itself when a message
    exceeds ``max_request_size``, or by the broker) is a ``MessageTooLargeError``.
    """
    text = f"publish to {topic} failed: {_describe(exc)}"
    if isinstance(exc, Errors.MessageSizeTooLargeError | Errors.RecordListTooLargeError | Errors.RecordTooLargeError):
        return MessageTooLargeError(text)
    if isinstance(exc, PERMANENT_PUBLISH_ERRORS):
        return PermanentBusError(text)
    return BusError(text)


def _tp_text(partitions: Iterable[TopicPartition]) -> str:
    return "[" + ", ".join(f"{topic}:{partition}" for topic, partition in sorted(partitions)) + "]"


async def _metadata_probe(host: str, port: int, timeout_s: float, settings: KafkaSettings) -> None:
    """Open one connection and ask for cluster metadata (no topics, so nothing is auto-created)."""
    kwargs = client_kwargs(settings)
    async with asyncio.timeout(timeout_s):
        conn = await create_conn(
            host,
            port,
            client_id=kwargs["client_id"],
            request_timeout_ms=max(1, int(timeout_s * 1000)),
            ssl_context=kwargs["ssl_context"],
            security_protocol=kwargs["security_protocol"],
            sasl_mechanism=kwargs["sasl_mechanism"],
            sasl_plain_username=kwargs["sasl_plain_username"],
            sasl_plain_password=kwargs["sasl_plain_password"],
        )
        try:
            await conn.send(MetadataRequest([], allow_auto_topic_creation=False))
        finally:
            conn.close()


async def wait_until_ready(bootstrap: str, timeout_s: float, settings: KafkaSettings | None = None) -> None:
    """Wait until a broker at ``bootstrap`` answers a metadata request.

    Probes each address in turn, with a growing pause (50 ms up to 500 ms)
    between rounds. Quiet: it logs nothing while the broker is down.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        timeout_s: how long to keep trying (s).
        settings: security settings for the connection; ``None``: plaintext defaults.

    Raises:
        BusError: naming the address, when no broker answered within ``timeout_s``.
        ValueError: when ``bootstrap`` is not a valid address list.
    """
    settings = settings or KafkaSettings()
    hosts = _hosts(bootstrap)
    deadline = time.monotonic() + timeout_s
    pause_s = 0.05
    last_error: BaseException | None = None
    while True:
        for host, port in hosts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await _metadata_probe(host, port, min(remaining, 2.0), settings)
                return
            except (OSError, KafkaError, TimeoutError) as exc:
                last_error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = f" (last error: {_describe(last_error)})" if last_error else ""
            raise BusError(f"no Kafka broker answered at {bootstrap} within {timeout_s:g} s{reason}")
        await asyncio.sleep(min(pause_s, remaining))
        pause_s = min(pause_s * 2, 0.5)


async def broker_answers(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """Whether a plaintext Kafka broker at ``bootstrap`` answers a metadata request within ``timeout_s`` (s).

    One attempt per address, no retries: a refused connection answers at once.
    Never raises: a malformed address is simply a broker that does not answer.
    """
    try:
        hosts = _hosts(bootstrap)
    except ValueError:
        return False
    deadline = time.monotonic() + timeout_s
    settings = KafkaSettings()
    for host, port in hosts:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await _metadata_probe(host, port, remaining, settings)
        except (OSError, KafkaError, TimeoutError):
            continue
        return True
    return False


async def _leave_group(bootstrap: str, settings: KafkaSettings, group: str, member_id: str) -> None:
    """Send LeaveGroup for a member aiokafka did not let go (best effort, 2 s at most; logs, never raises).

    Tansu numbers a group's first generation 0, which aiokafka takes for
    "never joined", so it skips LeaveGroup on stop; the member would then hold
    its partitions until its session times out, and the next member to join
    (a restarted stage) would wait that long.
    """
    kwargs = client_kwargs(settings)
    for host, port in _hosts(bootstrap):
        try:
            async with asyncio.timeout(2.0):
                conn = await create_conn(
                    host,
                    port,
                    client_id=kwargs["client_id"],
                    request_timeout_ms=2000,
                    ssl_context=kwargs["ssl_context"],
                    security_protocol=kwargs["security_protocol"],
                    sasl_mechanism=kwargs["sasl_mechanism"],
                    sasl_plain_username=kwargs["sasl_plain_username"],
                    sasl_plain_password=kwargs["sasl_plain_password"],
                )
                try:
                    await conn.send(LeaveGroupRequest(group, member_id))
                finally:
                    conn.close()
        except (OSError, KafkaError, TimeoutError) as exc:
            log.debug("LeaveGroup for group %s via %s:%s failed: %s", group, host, port, _describe(exc))
            continue
        log.debug("left group %s (member %s, generation 0)", group, member_id)
        return


async def _call_hook(hook: AssignmentHook | None, partitions: frozenset[TopicPartition], what: str) -> None:
    """Run a rebalance hook (sync or async); a failing hook is logged, never raised into the client."""
    if hook is None:
        return
    try:
        result = hook(partitions)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("%s hook failed for partitions %s", what, _tp_text(partitions))


# --------------------------------------------------------------------------- consumer


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Forwards aiokafka's rebalance callbacks to a ``KafkaConsumer``."""

    def __init__(self, owner: KafkaConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTopicPartition]) -> None:
        await self._owner._revoked(frozenset((tp.topic, tp.partition) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTopicPartition]) -> None:
        await self._owner._assigned(frozenset((tp.topic, tp.partition) for tp in assigned))


class KafkaConsumer:
    """A ``pipeline.bus.protocol.Consumer`` on an aiokafka consumer: a group member or a broadcast reader.

    Made by ``KafkaBus.consumer``. A group member subscribes to its topics and
    commits by hand; a broadcast reader is assigned every partition of its
    topics, picks up partitions that appear later, and never commits.

    Rebalance hooks: set ``on_assign`` and ``on_revoke`` to callables taking a
    ``frozenset`` of ``(topic, partition)``; they may be ``async``. They run on
    every change after ``consumer()`` returned (the first assignment is
    ``assignment()`` by then). ``on_revoke`` runs before the partitions go to
    another member, so it is the moment to commit finished work. Hooks are not
    called by ``stop``. A hook that raises is logged and ignored.
    """

    def __init__(
        self,
        consumer: Any,
        topics: Sequence[str],
        *,
        group: str | None,
        on_stop: Callable[[KafkaConsumer], None] | None = None,
        leave_group: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._consumer = consumer
        self._leave_group = leave_group
        self._topics = tuple(dict.fromkeys(topics))
        self._group = group
        self._on_stop = on_stop
        self._stopped = False
        self._known: frozenset[TopicPartition] = frozenset()
        self._next_offsets: dict[TopicPartition, int] = {}
        #: How many times a broadcast reader found its partitions restarted empty (a new embedded broker).
        self.restarts = 0
        #: Until when (monotonic s) a group member checks for partitions that restarted empty (after a rotation).
        self._restart_watch_until = 0.0
        self.on_assign: AssignmentHook | None = None
        self.on_revoke: AssignmentHook | None = None

    @property
    def group(self) -> str | None:
        """The consumer group id, or ``None`` for a broadcast reader."""
        return self._group

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics this consumer reads."""
        return self._topics

    def _where(self) -> str:
        return f"in group {self._group}" if self._group is not None else "(broadcast)"

    async def _assigned(self, partitions: frozenset[TopicPartition]) -> None:
        # group assignments at INFO (operators follow rebalances); broadcast readers are routine: DEBUG
        log.log(
            logging.INFO if self._group is not None else logging.DEBUG,
            "assigned partitions %s %s",
            _tp_text(partitions),
            self._where(),
        )
        await _call_hook(self.on_assign, partitions, "on_assign")

    async def _revoked(self, partitions: frozenset[TopicPartition]) -> None:
        if not partitions:
            return
        log.log(
            logging.INFO if self._group is not None else logging.DEBUG,
            "revoked partitions %s %s",
            _tp_text(partitions),
            self._where(),
        )
        await _call_hook(self.on_revoke, partitions, "on_revoke")

    async def _start_broadcast(self, partitions: frozenset[TopicPartition]) -> None:
        """Broadcast: take the first assignment (every partition known at start)."""
        self._consumer.assign([KafkaTopicPartition(t, p) for t, p in sorted(partitions)])
        self._known = partitions
        await self._assigned(partitions)

    async def _refresh_broadcast(self) -> None:
        """Broadcast: follow partitions that appear in the metadata, keeping each position reached."""
        wanted: set[TopicPartition] = set()
        for topic in self._topics:
            ids = self._consumer.partitions_for_topic(topic)
            if ids:
                wanted.update((topic, int(p)) for p in ids)
            else:
                # Unknown right now (for example just after a broker restart): keep what we have.
                wanted.update(tp for tp in self._known if tp[0] == topic)
        target = frozenset(wanted)
        if not target or target == self._known:
            return
        gone = self._known - target
        added = target - self._known
        kept = {tp: self._next_offsets[tp] for tp in target & self._known if tp in self._next_offsets}
        # assign() resets every position, so put back the ones already reached.
        self._consumer.assign([KafkaTopicPartition(t, p) for t, p in sorted(target)])
        for tp, offset in kept.items():
            self._consumer.seek(KafkaTopicPartition(*tp), offset)
        self._known = target
        for tp in gone:
            self._next_offsets.pop(tp, None)
        if gone:
            await self._revoked(gone)
        if added:
            await self._assigned(added)

    async def getmany(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_ms`` (ms) for the first one.

        Records of one partition come in offset order.

        Raises:
            BusError: when the client reports an error (the consumer stays usable
                unless it was stopped).
        """
        if self._stopped:
            raise BusError("consumer is stopped")
        try:
            if self._group is None:
                await self._refresh_broadcast()
            batches = await self._consumer.getmany(timeout_ms=max(0, timeout_ms), max_records=max_records)
        except (KafkaError, ConsumerStoppedError) as exc:
            raise BusError(f"fetch from {list(self._topics)} failed: {_describe(exc)}") from exc
        records: list[Record] = []
        for tp, messages in batches.items():
            for message in messages:
                records.append(
                    Record(
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                        key=message.key,
                        value=message.value if message.value is not None else b"",
                        headers=tuple((name, value if value is not None else b"") for name, value in message.headers),
                        timestamp_ms=message.timestamp if message.timestamp is not None else 0,
                    )
                )
            if messages and (self._group is None or self._restart_watch_until):
                self._next_offsets[(tp.topic, tp.partition)] = messages[-1].offset + 1
        if not records:
            if self._group is None:
                self._rewind_restarted()
            elif self._restart_watch_until:
                if time.monotonic() < self._restart_watch_until:
                    self._rewind_restarted()
                else:
                    self._restart_watch_until = 0.0
                    self._next_offsets.clear()
        return records

    def _rewind_restarted(self) -> None:
        """Broadcast: read from offset 0 a partition whose end is now below the position reached (a new log).

        A restarted embedded broker (or a rotation, DESIGN A11) starts every
        partition empty, and it answers a fetch past the end with no records
        and no error, so without this a reader would wait for offsets that
        come only after as many new records as it had read before.
        """
        rewound = False
        for tp, reached in list(self._next_offsets.items()):
            try:
                end = self._consumer.highwater(KafkaTopicPartition(*tp))
            except (IllegalStateError, AssertionError, KafkaError):  # not assigned to this member (any more)
                continue
            if end is None or end >= reached:
                continue
            rewound = True
            try:
                self._consumer.seek(KafkaTopicPartition(*tp), 0)
            except (IllegalStateError, AssertionError, KafkaError) as exc:
                log.debug("consumer of %s: cannot rewind %s (%s)", list(self._topics), tp, exc)
                continue
            self._next_offsets[tp] = 0
            log.info(
                "%s:%d now ends at %d, before offset %d read already: the broker restarted empty; reading it from 0",
                tp[0],
                tp[1],
                end,
                reached,
            )
        self.restarts += rewound

    async def restart_from_zero(self, reached: Mapping[TopicPartition, int] | None = None) -> None:
        """Read every assigned partition from offset 0 again (the broker was replaced by an empty one).

        Offset 0 rather than the broker's reported beginning, which the
        embedded broker can get wrong by one (``EMBEDDED-BROKER.md``). A seek
        can fail while the group rejoins the new broker, leaving the member at
        its old position, past the new log's end, where the embedded broker
        answers with nothing and no error. So for ``RESTART_WATCH_S`` a group
        member also rewinds, at an empty fetch, any partition whose end is
        below the position it had reached (``reached``: the old positions,
        per partition, e.g. the runner's finished offsets).
        """
        self._next_offsets.clear()
        if self._group is not None:
            self._next_offsets.update(reached or {})
            self._restart_watch_until = time.monotonic() + RESTART_WATCH_S
        for tp in self._consumer.assignment():
            try:
                self._consumer.seek(tp, 0)
            except (KafkaError, IllegalStateError, AssertionError) as exc:
                log.info("consumer of %s: cannot seek %s to 0 (%s)", list(self._topics), tp, exc)
                continue
            self._next_offsets.pop((tp.topic, tp.partition), None)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit, per partition, the offset of the next record to read.

        Only partitions this member holds now are committed; others are
        dropped (they belong to another member since a rebalance). A broadcast
        reader commits nothing.

        Raises:
            BusError: when the broker refuses the commit (for example the group
                rebalanced meanwhile); the caller may drop it.
        """
        if self._group is None or not offsets:
            return
        if self._stopped:
            raise BusError(f"commit in group {self._group} after stop")
        held = self.assignment()
        to_commit = {
            KafkaTopicPartition(topic, partition): int(offset)
            for (topic, partition), offset in offsets.items()
            if (topic, partition) in held
        }
        dropped = len(offsets) - len(to_commit)
        if dropped:
            log.debug("commit in group %s: dropped %d partition(s) no longer assigned", self._group, dropped)
        if not to_commit:
            return
        try:
            await self._consumer.commit(to_commit)
        except KafkaError as exc:
            raise BusError(f"commit in group {self._group} failed: {_describe(exc)}") from exc

    def assignment(self) -> frozenset[TopicPartition]:
        """Return the partitions this consumer currently reads, as ``(topic, partition)`` pairs."""
        if self._stopped:
            return frozenset()
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end offset as of the latest fetch (``None``: not assigned or not fetched yet).

        aiokafka's ``highwater`` (from fetch responses; no request is sent), for
        consumer-lag metrics.
        """
        if self._stopped:
            return None
        try:
            value = self._consumer.highwater(KafkaTopicPartition(*tp))
        except (AssertionError, KafkaError, AttributeError):  # not assigned (any more)
            return None
        return int(value) if value is not None else None

    async def _stop_client(self) -> None:
        """Stop the aiokafka consumer, finishing the job when aiokafka's own cleanup trips over itself."""
        try:
            await self._consumer.stop()
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled: let it through
        # aiokafka 0.14's Fetcher.close() awaits the retry tasks it has just cancelled and so
        # re-raises their CancelledError when the broker is unreachable; close what it left open.
        log.debug("aiokafka consumer stop was interrupted by its own cleanup; finishing it")
        fetcher = getattr(self._consumer, "_fetcher", None)
        pending = list(getattr(fetcher, "_pending_tasks", ()))
        for leftover in pending:
            leftover.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        client = getattr(self._consumer, "_client", None)
        if client is not None:
            await client.close()

    async def stop(self) -> None:
        """Leave the group (if any) and close the connection; idempotent, never raises."""
        if self._stopped:
            return
        self._stopped = True
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", None)
        member_id = getattr(coordinator, "member_id", "")
        try:
            await self._stop_client()
            if self._group is not None and generation == 0 and member_id and self._leave_group is not None:
                await self._leave_group(self._group, member_id)
        except (KafkaError, OSError) as exc:
            log.warning("stopping consumer of %s %s: %s", list(self._topics), self._where(), _describe(exc))
        finally:
            if self._on_stop is not None:
                self._on_stop(self)


def producer_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """The producer arguments of ``settings`` (aiokafka): acks, idempotence, linger, batch and request sizes, codec."""
    return {
        "acks": settings.acks,
        "enable_idempotence": settings.enable_idempotence,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size_bytes,
        "max_request_size": settings.max_request_size_bytes,
        "compression_type": settings.compression_type,
    }


# --------------------------------------------------------------------------- bus


class KeyHashPartitioner:
    """aiokafka's ``DefaultPartitioner`` (murmur2 of the key, as Kafka's Java client), each key's hash remembered.

    A request's id keys every message of its path (five or six publishes in one
    ``aipipe run`` process), and aiokafka's murmur2 is pure Python (~2 us a
    call); the positive hash of the last ``size`` keys is kept, so the same key
    lands on the same partition as before for any partition count. A message
    without a key goes to a random available partition, as with the default.
    """

    def __init__(self, size: int = 16_384) -> None:
        self._hashes: LRUCache[bytes, int] = LRUCache(maxsize=size)

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        """The partition for ``key`` among ``all_partitions`` (sorted ids)."""
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        found = self._hashes.get(key)
        if found is None:
            found = murmur2(key) & 0x7FFFFFFF
            self._hashes[key] = found
        return all_partitions[found % len(all_partitions)]


class KafkaBus:
    """The bus (``pipeline.bus.protocol.Bus``) on a Kafka-compatible broker.

    One producer is shared by every ``publish`` (batched by ``linger_ms``); one
    admin client creates topics; each ``consumer`` call opens its own
    consumer. ``stop`` also stops the consumers still open.

    Args:
        bootstrap: ``host:port[,host:port...]`` of the brokers.
        settings: client settings; ``None``: ``KafkaSettings()``.

    Raises:
        ValueError: when ``bootstrap`` is not a valid address list.
    """

    def __init__(self, bootstrap: str, settings: KafkaSettings | None = None) -> None:
        self._published: dict[str, int] = {}
        _hosts(bootstrap)
        self._bootstrap = bootstrap
        self._settings = settings or KafkaSettings()
        self._producer: Any = None
        self._admin: Any = None
        self._consumers: set[KafkaConsumer] = set()
        self._ready_topics: set[str] = set()
        self._topic_lock = asyncio.Lock()
        self._partitioner = KeyHashPartitioner()

    @property
    def bootstrap(self) -> str:
        """The broker addresses this bus connects to."""
        return self._bootstrap

    @property
    def settings(self) -> KafkaSettings:
        """The client settings."""
        return self._settings

    def __repr__(self) -> str:
        return f"KafkaBus({self._bootstrap!r}, started={self._producer is not None})"

    async def __aenter__(self) -> KafkaBus:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect: wait for the broker, then start the producer and the admin client.

        Retries with a growing pause until ``settings.start_timeout_s``.

        Raises:
            BusError: naming the address, when the broker does not answer in
                time, or refuses the producer (for example idempotence on the
                embedded broker).
        """
        if self._producer is not None:
            return
        settings = self._settings
        deadline = time.monotonic() + settings.start_timeout_s
        await wait_until_ready(self._bootstrap, settings.start_timeout_s, settings)
        kwargs = client_kwargs(settings)
        pause_s = 0.05
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap, partitioner=self._partitioner, **producer_kwargs(settings), **kwargs
            )
            admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **kwargs)
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await producer.start()
                    await admin.start()
            except (KafkaError, OSError, TimeoutError) as exc:
                await self._close_quietly(producer, admin)
                if settings.enable_idempotence and not isinstance(exc, (OSError, TimeoutError)):
                    raise BusError(
                        f"Kafka broker at {self._bootstrap} refused the idempotent producer "
                        f"({_describe(exc)}); the embedded broker does not support it: "
                        "set AIPIPE_KAFKA_IDEMPOTENCE=0"
                    ) from exc
                if time.monotonic() + pause_s >= deadline:
                    raise BusError(
                        f"could not connect to the Kafka broker at {self._bootstrap} within "
                        f"{settings.start_timeout_s:g} s: {_describe(exc)}"
                    ) from exc
                log.debug("Kafka start at %s failed (%s); retrying", self._bootstrap, _describe(exc))
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, 1.0)
                continue
            self._producer = producer
            self._admin = admin
            log.debug("Kafka bus connected to %s", self._bootstrap)
            return

    @staticmethod
    async def _close_quietly(producer: Any, admin: Any) -> None:
        for closer in (producer.stop, admin.close):
            try:
                await closer()
            except Exception as exc:  # cleanup after a failed start: nothing more to do
                log.debug("cleanup after failed start: %s", _describe(exc))

    async def stop(self) -> None:
        """Stop the consumers still open, flush pending messages and disconnect; idempotent."""
        for consumer in list(self._consumers):
            await consumer.stop()
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        self._ready_topics.clear()
        if producer is not None:
            try:
                await producer.stop()
            except (KafkaError, OSError) as exc:
                log.warning("stopping the Kafka producer: %s", _describe(exc))
        if admin is not None:
            try:
                await admin.close()
            except (KafkaError, OSError) as exc:
                log.warning("closing the Kafka admin client: %s", _describe(exc))

    def _require_started(self) -> None:
        if self._producer is None:
            raise BusError("the Kafka bus is not started (call start() first)")

    async def _partition_counts(self) -> dict[str, int]:
        """Partition count of every topic on the cluster (one metadata request for all topics)."""
        described = await self._admin.describe_topics()
        return {item["topic"]: len(item["partitions"]) for item in described if item.get("error_code", 0) == 0}

    async def ensure_topics(self, topics: Sequence[str]) -> None:
        """Create the topics that do not exist yet, with ``settings.partitions`` partitions.

        Idempotent and safe to race with other processes; call it again after
        an embedded broker restart (which loses every topic). A topic that
        exists with another partition count is kept as it is (logged).

        Raises:
            BusError: when the bus is not started, or the broker refuses to
                create a topic (for example a replication factor above the broker count).
        """
        self._require_started()
        wanted = list(dict.fromkeys(topics))
        if not wanted:
            return
        settings = self._settings
        try:
            async with asyncio.timeout(settings.request_timeout_ms / 1000):
                counts = await self._partition_counts()
                missing = [topic for topic in wanted if topic not in counts]
                if missing:
                    response = await self._admin.create_topics(
                        [NewTopic(topic, settings.partitions, settings.replication_factor) for topic in missing]
                    )
                    for topic, code, message in response.topic_errors:
                        if code in (0, _TOPIC_ALREADY_EXISTS):
                            continue
                        error = for_code(code)
                        raise BusError(
                            f"could not create topic {topic!r} ({settings.partitions} partitions, "
                            f"replication factor {settings.replication_factor}) on {self._bootstrap}: "
                            f"{error.__name__}: {message or error.description}"
                        )
                    log.info("created topics %s with %d partitions", missing, settings.partitions)
                    counts = await self._await_topics(missing)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BusError(f"could not ensure topics {wanted} on {self._bootstrap}: {_describe(exc)}") from exc
        for topic in wanted:
            count = counts.get(topic)
            if count is not None and count != settings.partitions and topic not in self._ready_topics:
                log.info(
                    "topic %s has %d partitions (configured: %d); keeping it",
                    topic,
                    count,
                    settings.partitions,
                )
        self._ready_topics.update(wanted)

    async def _await_topics(self, topics: Sequence[str]) -> dict[str, int]:
        """Wait until newly created topics appear in the metadata (a moment on a cluster)."""
        pause_s = 0.02
        while True:
            counts = await self._partition_counts()
            if all(topic in counts for topic in topics):
                return counts
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.5)

    async def _ensure_known(self, topics: Sequence[str]) -> None:
        """Ensure the topics this bus has not seen yet (one check per topic per bus)."""
        if all(topic in self._ready_topics for topic in topics):
            return
        async with self._topic_lock:
            unseen = [topic for topic in topics if topic not in self._ready_topics]
            if unseen:
                await self.ensure_topics(unseen)

    @property
    def max_message_bytes(self) -> int:
        """The largest message this bus publishes (bytes): the producer's ``max_request_size``."""
        return self.settings.max_request_size_bytes

    async def publish(self, message: Outgoing) -> None:
        """Publish one message and wait for the broker's acknowledgement (``settings.acks``).

        The first publish to a topic this bus has not ensured creates it if
        missing. Cancelling the call does not withdraw a message already handed
        to the producer.

        Raises:
            BusError: when the bus is not started, or the message cannot be
                delivered within ``settings.request_timeout_ms``.
        """
        self._require_started()
        if message.topic not in self._ready_topics:  # checked per message: skip the call when known
            await self._ensure_known([message.topic])
        try:
            await self._producer.send_and_wait(
                message.topic,
                value=message.value,
                key=message.key,
                headers=list(message.headers) or None,
                timestamp_ms=message.timestamp_ms,
            )
        except KafkaError as exc:
            # The topic may be gone (a broker restart): check it again next time.
            self._ready_topics.discard(message.topic)
            raise publish_error(message.topic, exc) from exc
        self._published[message.topic] = self._published.get(message.topic, 0) + 1

    def published_counts(self) -> dict[str, int]:
        """Records this bus published per topic since start (or since ``reset_counts``)."""
        return dict(self._published)

    def reset_counts(self) -> None:
        """Start counting published records from zero (a fresh broker)."""
        self._published.clear()

    async def partition_for(self, topic: str, key: bytes) -> int:
        """The partition ``publish`` puts a message keyed ``key`` on.

        aiokafka's default partitioner: murmur2 of the key over every partition,
        as Kafka's Java client does. Used to decide which group member owns a key (e.g. a provider on ``ai.control``).

        Raises:
            BusError: when the bus is not started or the topic's partitions cannot be learnt.
        """
        self._require_started()
        await self._ensure_known([topic])
        try:
            partitions = sorted(await self._producer.partitions_for(topic))
        except KafkaError as exc:
            raise BusError(f"partitions of {topic} unknown: {_describe(exc)}") from exc
        if not partitions:
            raise BusError(f"partitions of {topic} unknown")
        return self._partitioner(key, partitions, partitions)

    async def consumer(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        from_beginning: bool = True,
        background: bool = False,
    ) -> KafkaConsumer:
        """Open a consumer; for a group, return once this member has joined and got its partitions.

        The topics are created first if missing. A group member commits by
        hand (no auto-commit). Without a committed offset it starts at the
        earliest record (``from_beginning``) or at the end of each partition
        (on the embedded broker "the end" is the start of the last batch, so
        it may see a few records written just before; filter by id or
        timestamp). A broadcast reader (``group=None``) reads every partition
        and never commits.

        Args:
            topics: topic names to read (at least one).
            group: consumer group id; ``None`` makes a broadcast reader of every partition.
            from_beginning: where to start without a committed offset.
            background: off a request's path: fetch with ``settings.background_fetch_max_wait_ms``
                instead of ``settings.fetch_max_wait_ms``.

        Returns:
            The started consumer, with ``on_assign``/``on_revoke`` hooks to set.

        Raises:
            BusError: when the bus is not started, the topics cannot be
                created, or the group cannot be joined within ``settings.start_timeout_s``.
            ValueError: when ``topics`` is empty.
        """
        self._require_started()
        names = list(dict.fromkeys(topics))
        if not names:
            raise ValueError("consumer() needs at least one topic")
        await self.ensure_topics(names)
        settings = self._settings
        raw = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            fetch_max_wait_ms=settings.fetch_wait_ms(background=background),
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            max_partition_fetch_bytes=settings.max_request_size_bytes,
            **client_kwargs(settings),
        )
        wrapper = KafkaConsumer(
            raw,
            names,
            group=group,
            on_stop=self._consumers.discard,
            leave_group=lambda group_id, member_id: _leave_group(self._bootstrap, settings, group_id, member_id),
        )
        try:
            async with asyncio.timeout(settings.start_timeout_s):
                if group is not None:
                    raw.subscribe(names, listener=_Listener(wrapper))
                    await raw.start()
                else:
                    await raw.start()
                    counts = await self._partition_counts()
                    await wrapper._start_broadcast(frozenset((t, p) for t in names for p in range(counts.get(t, 0))))
                # Fix the start positions now, so "from the end" means the end at this call,
                # not at the first fetch.
                for tp in raw.assignment():
                    try:
                        await raw.position(tp)
                    except IllegalStateError:  # a rebalance already took it away: nothing to fix
                        break
        except (KafkaError, OSError, TimeoutError) as exc:
            await wrapper.stop()
            where = f"join group {group!r}" if group is not None else "open a broadcast reader"
            raise BusError(f"could not {where} on {names} at {self._bootstrap}: {_describe(exc)}") from exc
        except BaseException:
            await wrapper.stop()
            raise
        self._consumers.add(wrapper)
        return wrapper
