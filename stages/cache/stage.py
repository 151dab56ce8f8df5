"""cache-lookup: answer from the response cache, or pass the request on (DESIGN B1).

Input ``ai.requests`` (``AIRequest``). Per request:

* ``cache.bypass`` (or the cache disabled): straight on to ``ai.stage.budget``,
  neither looked up nor (by the recorder) stored, and not counted;
* a stored answer under ``stages.rules.cache_key.cache_key``: a hit, sent to
  ``ai.stage.record`` as a ``cached`` outcome (the recorder answers it with
  ``cost_usd`` 0 and a ``saved_usd``);
* otherwise a miss: the request claims its key (coalescing) and goes on to
  ``ai.stage.budget``. An identical request that arrives while the claim is
  held waits here, without holding up other messages, until the claimant's
  outcome reaches the recorder; if its answer was stored the waiter is
  answered as a hit (no provider call, no attempts), otherwise (failure,
  deadline passed) it goes on as an ordinary miss, without claiming again.

Entries are written by the cost-recorder (complete successful answers only).
The stage counts its hits and misses, publishes them with the store's size as
``cache_stats`` on ``ai.control`` every ``stats_interval_s`` and on request
(``cache_stats_request``), and applies ``cache_clear`` (both commands from
``ai.control``; one sent more than ``COMMAND_SKEW_S`` before the replica
started is replayed history and ignored, so a restart never clears the shared
cache again).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc

from pipeline.bus.topics import Topics
from pipeline.runtime.messages import REQUEST_DECODER, error_envelope, new_generation, now_ms, to_record
from pipeline.runtime.runner import Emit, InvalidInput, MessageContext, decode_or_invalid, now_utc, sniff_request_id
from pipeline.stores.cache_store import CLAIM_SLACK_MS, CacheCounters, CacheStore
from schemas.archive import RECEIVED_AT_HEADER
from schemas.cache import CachedAnswer
from schemas.envelope import Envelope, Outcome
from schemas.events import CacheClear, CacheStats, CacheStatsRequest
from schemas.request import MAX_REQUEST_BYTES, AIRequest
from schemas.response import ErrorInfo
from schemas.stream import StreamChunk
from stages.rules.cache_key import cache_key
from stages.rules.tool_ids import whole_call_deltas

log = logging.getLogger("aipipe.cache")

#: Default period (s) of the ``cache_stats`` events of one replica.
STATS_INTERVAL_S = 10.0
#: A command older than the replica's start by more than this (s) is replayed history and ignored;
#: the margin allows for clock skew between the sender's host and the replica's.
COMMAND_SKEW_S = 30.0


def replica_name() -> str:
    """A name for this cache replica: ``host:pid:xxxx`` (random suffix: several pipelines per process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class CacheLookupStage:
    """Looks each request up in ``store`` and coalesces identical requests in flight.

    Args:
        topics: topic names.
        store: the response cache (shared with the recorder in-process, or Redis).
        enabled: ``False`` passes every request on untouched.
        coalesce: let identical requests wait for one provider call; needs the
            recorder in this process or a shared (Redis) store, or the waiters
            would never be told.
        stats_interval_s: period of the ``cache_stats`` events (s).
        replica: name in ``cache_stats`` (default ``replica_name()``).

    Attributes:
        counters: hits and misses since start (``entries``/``bytes``/``evictions`` filled by ``stats``).
        waiting: requests waiting on an identical one in flight now.
        coalesced: requests answered from a claimant's answer since start.
    """

    name = "cache"

    def __init__(
        self,
        topics: Topics,
        store: CacheStore,
        *,
        enabled: bool = True,
        coalesce: bool = True,
        stats_interval_s: float = STATS_INTERVAL_S,
        replica: str | None = None,
    ) -> None:
        self.topics = topics
        self.store = store
        self.enabled = enabled
        self.coalesce = coalesce
        self.stats_interval_s = stats_interval_s
        self.replica = replica or replica_name()
        self.input_topic = topics.requests
        self.counters = CacheCounters()
        self.waiting = 0
        self.coalesced = 0
        self.started_at: datetime = now_utc()
        self._commands_tx, self._commands_rx = anyio.create_memory_object_stream[CacheClear | CacheStatsRequest](64)

    def decode(self, raw: bytes) -> AIRequest:
        """Decode and validate an ``AIRequest``.

        Raises:
            InvalidInput: naming the bad field.
        """
        if len(raw) > MAX_REQUEST_BYTES:
            raise InvalidInput(
                f"request is {len(raw)} bytes; the limit is {MAX_REQUEST_BYTES} bytes",
                request_id=sniff_request_id(raw),
            )
        request: AIRequest = decode_or_invalid(REQUEST_DECODER, raw)
        return request

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Hit: a cached outcome to the recorder; miss: the envelope (with its ``cache_key``) to the budget gate."""
        request: AIRequest = value
        if request.stream_topic is not None and not self.topics.is_stream_topic(request.stream_topic):
            error = ErrorInfo(
                type="invalid_request",
                message=f"`stream_topic` must be {self.topics.stream!r} or a topic under "
                f"{self.topics.stream + '.'!r}, got {request.stream_topic!r}",
            )
            return self.reject(request.id, error, ctx)
        received = now_ms()
        first_received = ctx.record.header(RECEIVED_AT_HEADER)  # a restored request: its deadline counts from then
        if first_received is not None and first_received.isdigit():
            received = min(received, int(first_received))
        envelope = Envelope(
            id=request.id,
            request=request,
            received_at_ms=received,
            deadline_at_ms=received + request.timeout_ms,
        )
        bypass = request.cache is not None and request.cache.bypass
        if not self.enabled or bypass:
            return [Emit(self.topics.stage_budget, request.id, envelope)]
        key = cache_key(request)
        envelope.cache_key = key
        answer = await self.store.get(key)
        if answer is None and self.coalesce:
            answer = await self._coalesce(key, envelope)
        if answer is None:
            self.counters.misses += 1
            return [Emit(self.topics.stage_budget, request.id, envelope)]
        self.counters.hits += 1
        if request.stream:  # a hit for a streaming request is published as a chunk too (DESIGN A9)
            generation = new_generation()
            chunk = StreamChunk(
                id=request.id,
                seq=0,
                generation=generation,
                delta=answer.content,
                provider=answer.provider,
                model=answer.model,
                cached=True,
                tool_call_deltas=whole_call_deltas(answer.tool_calls),
                at=now_utc(),
            )
            await ctx.emit_now(Emit(request.stream_topic or self.topics.stream, request.id, chunk))
            hit = self._hit(envelope, answer)
            assert envelope.outcome is not None
            envelope.outcome.generation, envelope.outcome.stream_chunks = generation, 1
            return [hit]
        return [self._hit(envelope, answer)]

    async def _coalesce(self, key: str, envelope: Envelope) -> CachedAnswer | None:
        """Claim ``key`` (lead: ``None``, go on) or wait for its claimant and return what it stored."""
        ttl_ms = envelope.deadline_at_ms - now_ms() + CLAIM_SLACK_MS
        if await self.store.claim(key, envelope.id, ttl_ms):
            answer = await self.store.get(key)  # stored between our lookup and our claim?
            if answer is not None:
                await self.store.finish(key, envelope.id)
            return answer
        self.waiting += 1
        try:
            await self.store.wait_done(key, (envelope.deadline_at_ms - now_ms()) / 1000)
        finally:
            self.waiting -= 1
        answer = await self.store.get(key)
        if answer is not None:
            self.coalesced += 1
        return answer

    def _hit(self, envelope: Envelope, answer: CachedAnswer) -> Emit:
        envelope.outcome = Outcome(
            status="ok",
            content=answer.content if answer.content or not answer.tool_calls else None,
            provider=answer.provider,
            model=answer.model,
            usage=answer.usage,
            cached=True,
            saved_usd=answer.cost_usd,
            tool_calls=answer.tool_calls,
            finish_reason=answer.finish_reason,
        )
        return to_record(self.topics.stage_record, envelope)

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """An error outcome for ``request_id`` to the recorder."""
        return [to_record(self.topics.stage_record, error_envelope(request_id, error))]

    # --- statistics and commands ---------------------------------------------------------

    async def stats(self, *, in_reply_to: str | None = None) -> CacheStats:
        """The replica's ``cache_stats`` now: its hits and misses, the store's entries, evictions, bytes."""
        size = await self.store.size()
        self.counters.entries, self.counters.bytes, self.counters.evictions = size.entries, size.bytes, size.evictions
        return CacheStats(
            hits=self.counters.hits,
            misses=self.counters.misses,
            entries=size.entries,
            evictions=size.evictions,
            bytes=size.bytes,
            replica=self.replica,
            store="redis" if self.store.kind == "redis" else "memory",
            in_reply_to=in_reply_to,
            at=now_utc(),
        )

    def on_control(self, event: Any) -> None:
        """Queue ``cache_clear`` and ``cache_stats_request`` commands for ``background`` (stale ones are ignored)."""
        if not isinstance(event, CacheClear | CacheStatsRequest):
            return
        if event.at is not None and event.at < self.started_at - timedelta(seconds=COMMAND_SKEW_S):
            return  # replayed history from before this replica started
        try:
            self._commands_tx.send_nowait(event)
        except anyio.WouldBlock:
            log.warning("cache: too many queued commands; dropping a %s", type(event).__name__)

    async def apply(self, command: CacheClear | CacheStatsRequest) -> CacheStats:
        """Apply one command (a clear empties the store) and return the stats to publish."""
        if isinstance(command, CacheClear):
            removed = await self.store.clear()
            log.info("cache cleared (%d entries) on command", removed)
        return await self.stats(in_reply_to=command.request_id)

    async def background(self, publish: Callable[[Emit], Awaitable[None]]) -> None:
        """Publish ``cache_stats`` every ``stats_interval_s`` and answer commands; run the store's listener.

        A failure in one round is logged and the loop goes on; it never stops the pipeline.
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen_forever)
            next_at = anyio.current_time() + self.stats_interval_s
            async with self._commands_rx:
                while True:
                    command: CacheClear | CacheStatsRequest | None = None
                    with anyio.move_on_after(max(0.0, next_at - anyio.current_time())):
                        command = await self._commands_rx.receive()
                    if command is None:
                        next_at = anyio.current_time() + self.stats_interval_s
                    try:
                        stats = await (self.stats() if command is None else self.apply(command))
                    except Exception:
                        log.exception("cache: could not %s", "publish stats" if command is None else "apply a command")
                        continue
                    await publish(Emit(self.topics.control, "*", stats))

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self.store.listen()
                return  # a store with nothing to listen to
            except Exception:
                log.exception("cache: the store's listener failed; restarting it in 1 s")
                await anyio.sleep(1.0)
