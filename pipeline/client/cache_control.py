"""Cache statistics and clearing from outside the stages (``aipipe cache``, the manager).

Both are a command on ``ai.control`` and the replies to it: the sender opens
a reader at the topic's end, publishes ``cache_stats_request`` (or
``cache_clear``) with a fresh ``request_id``, and takes the ``cache_stats``
whose ``in_reply_to`` is that id (every cache replica answers a command with
its stats, after applying it). It stops when ``expected_replicas`` have
answered, or ``quiet_s`` after the last reply, or at ``timeout_s``.
``fold_cache_stats`` sums the replies up.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import anyio
import msgspec

from pipeline.bus.protocol import Bus, Outgoing
from pipeline.bus.topics import Topics
from pipeline.runtime.runner import SCHEMA_HEADER, encode, now_utc, publish_with_retry
from schemas import SCHEMA_VERSION
from schemas.cache import CacheStatsSummary
from schemas.events import CacheClear, CacheStats, CacheStatsRequest, ControlEvent

_CONTROL = msgspec.json.Decoder(ControlEvent)


def fold_cache_stats(replicas: Iterable[CacheStats]) -> CacheStatsSummary:
    """Sum the latest ``cache_stats`` of each replica into one summary.

    Hits and misses add up over replicas. Entries, bytes and evictions add up
    over in-process stores; replicas on Redis share one store, so its numbers
    are taken once (from the most recent of their reports).
    """
    latest: dict[str, CacheStats] = {}
    for i, stats in enumerate(replicas):
        name = stats.replica or f"replica-{i}"
        if name not in latest or stats.at >= latest[name].at:
            latest[name] = stats
    chosen = sorted(latest.values(), key=lambda s: s.replica or "")
    hits = sum(s.hits for s in chosen)
    misses = sum(s.misses for s in chosen)
    local = [s for s in chosen if s.store != "redis"]
    shared = max((s for s in chosen if s.store == "redis"), key=lambda s: s.at, default=None)
    sized = [*local, *([shared] if shared is not None else [])]
    return CacheStatsSummary(
        hits=hits,
        misses=misses,
        hit_rate=round(hits / (hits + misses), 6) if hits + misses else 0.0,
        entries=sum(s.entries for s in sized),
        evictions=sum(s.evictions for s in sized),
        bytes=sum(s.bytes for s in sized),
        replicas=chosen,
    )


async def cache_command(
    bus: Bus,
    topics: Topics,
    command: CacheClear | CacheStatsRequest,
    *,
    expected_replicas: int | None = None,
    timeout_s: float = 3.0,
    quiet_s: float = 0.5,
) -> list[CacheStats]:
    """Publish ``command`` on ``ai.control`` and collect the cache replicas' ``cache_stats`` replies.

    Args:
        bus: a started bus.
        topics: topic names.
        command: ``CacheClear`` or ``CacheStatsRequest``; its ``request_id`` and ``at`` are filled in when unset.
        expected_replicas: stop as soon as this many replicas answered (``None``: unknown).
        timeout_s: longest wait (s).
        quiet_s: with replies in hand, stop after this long without another one (s).

    Returns:
        The latest reply of each replica that answered, possibly none.

    Raises:
        BusError: when the control topic cannot be read.
    """
    if command.request_id is None:
        command.request_id = uuid.uuid4().hex
    if command.at is None:
        command.at = now_utc()
    consumer = await bus.consumer([topics.control], group=None, from_beginning=False)
    replies: dict[str, CacheStats] = {}
    try:
        await publish_with_retry(
            bus,
            Outgoing(
                topics.control,
                encode(command),
                key=b"*",
                headers=((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()),),
            ),
        )
        now = anyio.current_time()
        give_up, quiet_until = now + timeout_s, now + timeout_s
        while anyio.current_time() < min(give_up, quiet_until):
            wait_ms = max(1, int((min(give_up, quiet_until) - anyio.current_time()) * 1000))
            for record in await consumer.getmany(min(wait_ms, 100), max_records=1000):
                try:
                    event = _CONTROL.decode(record.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if isinstance(event, CacheStats) and event.in_reply_to == command.request_id:
                    replies[event.replica or f"replica-{len(replies)}"] = event
                    quiet_until = anyio.current_time() + quiet_s
            if expected_replicas is not None and len(replies) >= expected_replicas:
                break
    finally:
        await consumer.stop()
    return list(replies.values())


async def request_cache_stats(
    bus: Bus, topics: Topics, *, expected_replicas: int | None = None, timeout_s: float = 3.0, quiet_s: float = 0.5
) -> CacheStatsSummary:
    """Ask every cache replica for its stats now and sum them up (``replicas`` empty: none answered).

    Raises:
        BusError: when the control topic cannot be read.
    """
    replies = await cache_command(
        bus, topics, CacheStatsRequest(), expected_replicas=expected_replicas, timeout_s=timeout_s, quiet_s=quiet_s
    )
    return fold_cache_stats(replies)


async def clear_cache(
    bus: Bus, topics: Topics, *, expected_replicas: int | None = None, timeout_s: float = 3.0, quiet_s: float = 0.5
) -> CacheStatsSummary:
    """Publish ``cache_clear`` and return the stats the replicas report once cleared (``replicas`` empty: none).

    Raises:
        BusError: when the control topic cannot be read.
    """
    replies = await cache_command(
        bus, topics, CacheClear(), expected_replicas=expected_replicas, timeout_s=timeout_s, quiet_s=quiet_s
    )
    return fold_cache_stats(replies)
