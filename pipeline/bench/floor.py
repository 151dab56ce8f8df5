"""The Kafka floor: a relay chain of bare aiokafka clients shaped like aipipe's Kafka path.

``aipipe bench``'s ``kafka-floor`` target answers the same chat completions as
``aipipe-kafka`` through the same number of hops, on the same broker, with the
same topics, partitions and client settings, but does nothing at each hop
except decode the message and forward one of the same size; the fourth relay
(where aipipe's provider executor sits) makes the same HTTP call to the
emulator with the same HTTP client. What aipipe-Kafka takes beyond it is
aipipe's own work: validation, routing, budgets, pricing, health and cost
events, tracing headers, the two broadcast readers of ``ai.control`` and
``ai.costs``, and its commit bookkeeping.

The chain (one producer shared by the process, as ``KafkaBus`` has)::

    client ─▶ requests ─▶ relay 1 ─▶ stage.budget ─▶ relay 2 ─▶ stage.route ─▶ relay 3
      ▲                                                                          │
      │                                                                    stage.execute
      │                                                                          ▼
    responses ◀── relay 5 ◀── stage.record ◀── relay 4 (HTTP call to the emulator)

Each relay is its own consumer group (as each stage is); relays 1 to 3 and 5
forward a fetched batch and wait for its acknowledgements together; relay 4
runs one task per message (up to ``MAX_IN_FLIGHT`` at once) so a provider call
does not hold up the next message, as aipipe's runner does. Offsets are
committed by aiokafka's auto-commit every 200 ms (aipipe's commit interval);
the floor does not track unfinished messages (at-most-once, which a real
pipeline could not accept, but which costs nothing per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.bench.targets import (
    COMPLETION_DECODER,
    EMULATOR_KEY,
    MAX_TOKENS,
    MODEL,
    BaseTarget,
    CallFailed,
    bench_kafka_settings,
)
from pipeline.bus.kafka import client_kwargs, producer_kwargs, wait_until_ready
from pipeline.runtime.http_client import ProviderHttpClient

__all__ = ["HOP_BYTES", "KafkaFloorTarget"]

log = logging.getLogger("aipipe.bench")

#: Mean size (bytes, value and headers) of aipipe's message on each topic of the request path for the
#: bench's requests (160 MT-Bench/Vicuna first turns, OpenAI answer from the emulator), measured on the
#: in-process bus on 2026-12-06; the floor pads its messages to the same sizes.
HOP_BYTES: dict[str, int] = {
    "requests": 614,
    "stage.budget": 885,
    "stage.route": 898,
    "stage.execute": 1010,
    "stage.record": 1667,
    "responses": 734,
}
#: The topics of the chain, in order (aipipe's names under the run's prefix).
CHAIN: tuple[str, ...] = tuple(HOP_BYTES)
#: The relay that calls the emulator (0-based: the consumer of ``stage.execute``, aipipe's executor).
HTTP_HOP = 3
#: Messages the HTTP relay handles at once (aipipe's default ``AIPIPE_MAX_IN_FLIGHT``).
MAX_IN_FLIGHT = 512
#: aipipe's commit interval (s), used here as aiokafka's auto-commit interval.
COMMIT_INTERVAL_MS = 200
#: Headers every message carries, as aipipe's do (schema version and a W3C ``traceparent``).
_TRACEPARENT = b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"1-01"
_HEADERS = [("aipipe-schema", b"1"), ("traceparent", _TRACEPARENT)]
_HEADER_BYTES = sum(len(k) + len(v) for k, v in _HEADERS)


class _Hop(msgspec.Struct, omit_defaults=True):
    """The floor's message: the request id and prompt, the provider's answer once there, and padding."""

    id: str
    prompt: str
    answer: msgspec.Raw  # JSON ``null`` until the provider answered
    pad: str = ""


_HOP_DECODER = msgspec.json.Decoder(_Hop)
_NULL = msgspec.Raw(b"null")
_ENCODER = msgspec.json.Encoder()


def _padded(message: _Hop, size: int) -> bytes:
    """``message`` encoded, padded to ``size`` bytes with its headers (or as is when already larger)."""
    raw = _ENCODER.encode(message)
    missing = size - _HEADER_BYTES - len(raw) - 9  # ``,"pad":""`` adds 9 bytes
    if missing <= 0:
        return raw
    return _ENCODER.encode(msgspec.structs.replace(message, pad="x" * missing))


class KafkaFloorTarget(BaseTarget):
    """The ``kafka-floor`` target: five bare relays and a client on aiokafka, no aipipe code on the path.

    Args:
        emulator_url: the emulator's root URL.
        prompts: the prompts.
        timeout_s: limit of one call (s).
        bootstrap: an existing broker to use instead of starting the embedded one.
        env: environment for the Kafka settings (default ``os.environ``).
    """

    key = "kafka-floor"

    def __init__(
        self,
        emulator_url: str,
        prompts: Sequence[str],
        *,
        timeout_s: float,
        bootstrap: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(emulator_url, prompts)
        self.timeout_s = timeout_s
        self.bootstrap = bootstrap
        self.settings = bench_kafka_settings(dict(os.environ if env is None else env))
        self._run = secrets.token_hex(3)
        self._topics = [f"floor-{self._run}.{name}" for name in CHAIN]
        self._waiters: dict[str, asyncio.Future[bytes]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[AIOKafkaConsumer] = []

    async def __aenter__(self) -> KafkaFloorTarget:
        bootstrap = self.bootstrap or await self._start_embedded_broker("aipipe-bench-floor-")
        settings = self.settings
        await wait_until_ready(bootstrap, settings.start_timeout_s, settings)
        kwargs = client_kwargs(settings)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kwargs)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(t, settings.partitions, settings.replication_factor) for t in self._topics]
            )
        finally:
            await admin.close()
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **producer_kwargs(settings), **kwargs)
        await self._producer.start()
        self._stack.push_async_callback(self._producer.stop)
        self._stack.push_async_callback(self._stop_consumers)
        self._http = await self._stack.enter_async_context(
            ProviderHttpClient(max_connections=MAX_IN_FLIGHT, timeout=None)
        )
        self._url = f"{self.emulator_url}/v1/chat/completions"
        self._auth = {"authorization": f"Bearer {EMULATOR_KEY}", "content-type": "application/json"}
        self._semaphore = asyncio.Semaphore(MAX_IN_FLIGHT)
        for hop in range(len(CHAIN) - 1):
            consumer = self._consumer(bootstrap, group=f"floor-{self._run}.relay{hop + 1}")
            consumer.subscribe([self._topics[hop]])
            await consumer.start()
            self._consumers.append(consumer)
            self._tasks.append(asyncio.create_task(self._relay(consumer, hop)))
        reader = self._consumer(bootstrap, group=None)
        await reader.start()
        partitions = reader.partitions_for_topic(self._topics[-1]) or set()
        reader.assign([KafkaTopicPartition(self._topics[-1], p) for p in sorted(partitions)])
        self._consumers.append(reader)
        self._tasks.append(asyncio.create_task(self._read_responses(reader)))
        return self

    def _consumer(self, bootstrap: str, *, group: str | None) -> AIOKafkaConsumer:
        s = self.settings
        return AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            enable_auto_commit=group is not None,
            auto_commit_interval_ms=COMMIT_INTERVAL_MS,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            max_partition_fetch_bytes=s.max_request_size_bytes,
            **client_kwargs(s),
        )

    async def _stop_consumers(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _relay(self, consumer: AIOKafkaConsumer, hop: int) -> None:
        """Forward every message of topic ``hop`` to topic ``hop + 1``, padded to that topic's size."""
        out_topic = self._topics[hop + 1]
        size = HOP_BYTES[CHAIN[hop + 1]]
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            if hop == HTTP_HOP:
                for messages in batches.values():
                    for message in messages:
                        await self._semaphore.acquire()
                        task = asyncio.create_task(self._call(message.key, message.value, out_topic, size))
                        task.add_done_callback(lambda _t: self._semaphore.release())
                continue
            sent = []
            for messages in batches.values():
                for message in messages:
                    value = _padded(_HOP_DECODER.decode(message.value), size)
                    sent.append(await self._producer.send(out_topic, value, key=message.key, headers=_HEADERS))
            if sent:
                await asyncio.gather(*sent)

    async def _call(self, key: bytes | None, raw: bytes, out_topic: str, size: int) -> None:
        """The middle hop: call the emulator with the request's prompt, then forward the answer."""
        hop = _HOP_DECODER.decode(raw)
        body = _ENCODER.encode(
            {"model": MODEL, "messages": [{"role": "user", "content": hop.prompt}], "max_completion_tokens": MAX_TOKENS}
        )
        try:
            response = await self._http.post(self._url, content=body, headers=self._auth, timeout=self.timeout_s)
            answer = msgspec.Raw(response.content) if response.status_code == 200 else _NULL
        except Exception as exc:  # the client sees the missing answer as an error
            log.debug("floor: provider call failed: %s", exc)
            answer = _NULL
        value = _padded(_Hop(id=hop.id, prompt=hop.prompt, answer=answer), size)
        await self._producer.send_and_wait(out_topic, value, key=key, headers=_HEADERS)

    async def _read_responses(self, reader: AIOKafkaConsumer) -> None:
        while True:
            batches = await reader.getmany(timeout_ms=100, max_records=1000)
            for messages in batches.values():
                for message in messages:
                    hop = _HOP_DECODER.decode(message.value)
                    waiter = self._waiters.pop(hop.id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(bytes(hop.answer))

    async def call(self, index: int) -> None:
        """Publish request ``index`` to the chain's first topic and await its answer on the last.

        Raises:
            CallFailed: when the emulator's answer is missing or empty.
            TimeoutError: when no answer arrives within ``timeout_s``.
        """
        request_id = f"f{self._run}-{index}"
        prompt = self.prompts[index % len(self.prompts)]
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        try:
            value = _padded(_Hop(id=request_id, prompt=prompt, answer=_NULL), HOP_BYTES[CHAIN[0]])
            await self._producer.send_and_wait(self._topics[0], value, key=request_id.encode(), headers=_HEADERS)
            async with asyncio.timeout(self.timeout_s):
                answer = await waiter
        finally:
            self._waiters.pop(request_id, None)
        completion = COMPLETION_DECODER.decode(answer) if answer != b"null" else None
        if completion is None or not completion.choices or not completion.choices[0].message.content:
            raise CallFailed("no answer from the provider")

    def info(self) -> dict[str, Any]:
        """The chain's shape and the client settings it shares with ``aipipe-kafka``."""
        s = self.settings
        return {
            "relays": len(CHAIN) - 1,
            "topics": list(CHAIN),
            "hop_bytes": HOP_BYTES,
            "fetch_max_wait_ms": s.fetch_max_wait_ms,
            "linger_ms": s.linger_ms,
            "partitions": s.partitions,
            "acks": s.acks,
            "broker": "embedded (Tansu)" if self.bootstrap is None else self.bootstrap,
        }
