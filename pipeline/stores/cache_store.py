"""Stores behind the response cache: in-process (cachetools) or shared (Redis through aiocache).

Both keep, per key (``stages.rules.cache_key``), one ``CachedAnswer`` encoded as
msgspec JSON, zlib-compressed when longer than ``compression_threshold_bytes``
(the first byte says which: ``J`` plain JSON, ``Z`` zlib). Both bound the
number of entries (``max_size``; the least recently used goes first and counts
as an eviction) and give each entry its own TTL (s).

Both also coordinate *coalescing* (DESIGN B1): a miss claims its key
(``claim``) for as long as its request may live; an identical request that
arrives meanwhile waits (``wait_done``) until the claimant's outcome reaches
the cost-recorder, which writes the answer (``set``) and then ends the claim
(``finish``). In-process the claims are a dict of ``anyio.Event``; in Redis
a claim is ``SET key leader NX PX ttl`` and ``finish`` deletes it and
``PUBLISH``-es the key so every replica's waiters wake (with a poll as a
backstop, so a lost message costs at most ``poll_s``).

``MemoryCacheStore`` is for one process (the cache stage and the recorder
share the object). ``RedisCacheStore`` is shared by every replica; when Redis
cannot be reached every operation degrades to "nothing cached" (a get is a
miss, a claim leads, a write is dropped), the outage is logged once when it
starts and once when it ends, and Redis is tried again at most every
``retry_after_s``. ``build_cache_store`` picks one from ``AIPIPE_REDIS_URL``.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import msgspec
from aiocache import RedisCache
from aiocache.serializers import BaseSerializer
from cachetools import TLRUCache
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from pipeline.runtime.config import CacheConfig
from pipeline.stores.redis_client import DEFAULT_MAX_CONNECTIONS, DEFAULT_POOL_TIMEOUT_S
from schemas.cache import CachedAnswer

log = logging.getLogger("aipipe.cache")

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(CachedAnswer)
_PLAIN, _ZLIB = b"J", b"Z"

#: Extra life (ms) of a coalescing claim beyond its request's deadline, for the recorder to finish.
CLAIM_SLACK_MS = 2_000


def encode_answer(answer: CachedAnswer, *, threshold_bytes: int, compress: bool) -> bytes:
    """The stored form of ``answer``: ``b"J"`` + JSON, or ``b"Z"`` + zlib(JSON) above ``threshold_bytes``."""
    raw = _ENC.encode(answer)
    if compress and len(raw) > threshold_bytes:
        return _ZLIB + zlib.compress(raw)
    return _PLAIN + raw


def decode_answer(data: bytes) -> CachedAnswer:
    """The ``CachedAnswer`` in a stored value.

    Raises:
        ValueError: when the value is not one ``encode_answer`` wrote (unknown
            marker, corrupt zlib stream or JSON).
    """
    marker, body = data[:1], data[1:]
    try:
        if marker == _ZLIB:
            return _DEC.decode(zlib.decompress(body))
        if marker == _PLAIN:
            return _DEC.decode(body)
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"corrupt cache value: {exc}") from exc
    raise ValueError(f"unknown cache value marker {marker!r}")


@dataclass
class CacheCounters:
    """Counters of one cache replica: lookups answered (``hits``) or not (``misses``), and the store's size.

    ``entries`` and ``bytes`` (stored, after compression) are the store's
    current size; ``evictions`` counts entries dropped by the LRU bound since
    start (expiries are not evictions). With Redis the last three are the
    shared store's, the same for every replica.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / (hits + misses)``, 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True)
class StoreSize:
    """The size of a store: ``entries``, ``bytes`` stored, ``evictions`` since start."""

    entries: int
    bytes: int
    evictions: int


class CacheStore(Protocol):
    """Where cached answers live, and where identical in-flight requests meet.

    ``kind`` is ``"memory"`` (this process only) or ``"redis"`` (shared by every replica).
    """

    kind: str

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer stored under ``key``, or ``None`` (absent, expired, or the store unreachable)."""
        ...

    async def set(self, key: str, answer: CachedAnswer, ttl_s: float) -> bool:
        """Store ``answer`` under ``key`` for ``ttl_s`` seconds; ``False`` when not stored (``ttl_s`` <= 0, outage)."""
        ...

    async def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        ...

    async def size(self) -> StoreSize:
        """Entries, bytes and evictions now (expired entries are dropped first)."""
        ...

    async def claim(self, key: str, leader_id: str, ttl_ms: int) -> bool:
        """Claim ``key`` for request ``leader_id`` for ``ttl_ms``; ``False`` when another request holds it.

        A request that already holds the claim (a redelivery) gets it again;
        an unreachable store grants every claim (no coalescing, no waiting).
        """
        ...

    async def finish(self, key: str, leader_id: str) -> None:
        """End ``leader_id``'s claim on ``key`` (no-op when it holds none) and wake the requests waiting on it."""
        ...

    async def wait_done(self, key: str, timeout_s: float) -> bool:
        """Wait until the claim on ``key`` ends (finished or expired); ``False`` when ``timeout_s`` passed first."""
        ...

    async def listen(self) -> None:
        """Deliver other replicas' ``finish`` signals to local waiters until cancelled (Redis; a no-op in memory)."""
        ...

    async def aclose(self) -> None:
        """Release connections (idempotent)."""
        ...


# ============================================================================ in-process


class _Flight:
    __slots__ = ("done", "expires_at", "leader")

    def __init__(self, leader: str, expires_at: float) -> None:
        self.leader = leader
        self.expires_at = expires_at
        self.done = anyio.Event()


class _BoundedTLRU(TLRUCache[str, tuple[float, bytes]]):
    """A TLRU map of ``key -> (ttl_s, stored bytes)`` that counts LRU evictions."""

    def __init__(self, maxsize: int, timer: Callable[[], float]) -> None:
        super().__init__(maxsize=maxsize, ttu=lambda _key, value, now: now + value[0], timer=timer)
        self.evictions = 0

    def popitem(self) -> tuple[str, tuple[float, bytes]]:
        """Evict the least recently used entry (cachetools calls this only when full)."""
        key, value = super().popitem()
        self.evictions += 1
        return key, value


class MemoryCacheStore:
    """In-process cache: at most ``max_size`` entries (LRU), per-entry TTL, compression above a size.

    Args:
        max_size: entries kept; the least recently used is evicted first.
        compression_threshold_bytes: values longer than this (bytes of JSON) are zlib-compressed.
        enable_compression: turn compression off entirely.
        timer: monotonic clock (s) for TTLs; tests pass a fake one.

    Raises:
        ValueError: when ``max_size`` < 1.
    """

    kind = "memory"

    def __init__(
        self,
        max_size: int = 1000,
        compression_threshold_bytes: int = 1024,
        enable_compression: bool = True,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.threshold = compression_threshold_bytes
        self.compress = enable_compression
        self._cache = _BoundedTLRU(max_size, timer)
        self._flights: dict[str, _Flight] = {}

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer under ``key`` if present and not expired (a hit makes it most recently used)."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        try:
            return decode_answer(entry[1])
        except ValueError:
            log.warning("dropping a corrupt cache entry")
            self._cache.pop(key, None)
            return None

    async def set(self, key: str, answer: CachedAnswer, ttl_s: float) -> bool:
        """Store ``answer`` for ``ttl_s`` seconds (``ttl_s`` <= 0: not stored)."""
        if ttl_s <= 0:
            return False
        data = encode_answer(answer, threshold_bytes=self.threshold, compress=self.compress)
        self._cache[key] = (float(ttl_s), data)
        return True

    async def clear(self) -> int:
        """Remove every entry (the eviction count is kept); returns how many there were."""
        self._cache.expire()
        count, evictions = len(self._cache), self._cache.evictions
        self._cache.clear()  # MutableMapping.clear pops item by item: not evictions
        self._cache.evictions = evictions
        return count

    async def size(self) -> StoreSize:
        """Entries and stored bytes after dropping expired ones (O(entries)), and evictions since start."""
        self._cache.expire()
        stored = sum(len(data) for _ttl, data in self._cache.values())
        return StoreSize(entries=len(self._cache), bytes=stored, evictions=self._cache.evictions)

    async def claim(self, key: str, leader_id: str, ttl_ms: int) -> bool:
        """Claim ``key`` for ``leader_id`` unless a live claim of another request holds it."""
        now = time.monotonic()
        flight = self._flights.get(key)
        if flight is not None and flight.expires_at > now and flight.leader != leader_id:
            return False
        if flight is not None and flight.leader != leader_id:
            flight.done.set()  # an expired claim: wake anyone still waiting on it
        if len(self._flights) > 1024:
            for stale in [k for k, f in self._flights.items() if f.expires_at <= now]:
                self._flights.pop(stale).done.set()
        self._flights[key] = _Flight(leader_id, now + ttl_ms / 1000)
        return True

    async def finish(self, key: str, leader_id: str) -> None:
        """End ``leader_id``'s claim on ``key`` and wake its waiters."""
        flight = self._flights.get(key)
        if flight is not None and flight.leader == leader_id:
            del self._flights[key]
            flight.done.set()

    async def wait_done(self, key: str, timeout_s: float) -> bool:
        """Wait until the claim on ``key`` is finished or expires, at most ``timeout_s``."""
        flight = self._flights.get(key)
        if flight is None:
            return True
        left_s = flight.expires_at - time.monotonic()
        with anyio.move_on_after(max(0.0, min(timeout_s, left_s))):
            await flight.done.wait()
        return flight.done.is_set() or time.monotonic() >= flight.expires_at

    async def listen(self) -> None:
        """Nothing to listen to in one process."""

    async def aclose(self) -> None:
        """Nothing to release."""


# ============================================================================ Redis


class _Waiting:
    __slots__ = ("count", "event")

    def __init__(self) -> None:
        self.count = 0
        self.event = anyio.Event()


class _BytesSerializer(BaseSerializer):  # type: ignore[misc]
    """aiocache serializer for values that are already bytes (no text decoding)."""

    DEFAULT_ENCODING = None

    def dumps(self, value: bytes) -> bytes:
        return value

    def loads(self, value: bytes | None) -> bytes | None:
        return value


class OutageLog:
    """Tracks whether a dependency is reachable; logs once when an outage starts and once when it ends.

    While down, ``should_try`` is false until ``retry_after_s`` have passed
    since the last failure, so requests do not each wait on a dead server.

    Args:
        what: the dependency, for log lines (e.g. ``"Redis cache at host:6379"``; never a password).
        retry_after_s: how long to skip the dependency after a failure (s).
        clock: monotonic clock (s).
    """

    def __init__(self, what: str, *, retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.down = False
        self.outages = 0
        self._since = 0.0
        self._next_try = 0.0

    def should_try(self) -> bool:
        """Whether to call the dependency now."""
        return not self.down or self.clock() >= self._next_try

    def failed(self, exc: BaseException) -> None:
        """Record a failed call (logs a warning only at the start of an outage)."""
        now = self.clock()
        self._next_try = now + self.retry_after_s
        if not self.down:
            self.down = True
            self.outages += 1
            self._since = now
            log.warning(
                "%s is unreachable (%s): lookups count as misses and answers are not cached until it is back",
                self.what,
                type(exc).__name__,
            )

    def ok(self) -> None:
        """Record a successful call (logs once when an outage ends)."""
        if self.down:
            self.down = False
            log.info("%s is reachable again after %.1f s", self.what, self.clock() - self._since)


_REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

# KEYS: lru, exp, sizes, bytes, evictions. ARGV: value prefix, key, data, ttl_ms, max_size, purge limit.
_SET_LUA = """
local lru, exp, sizes, total, evictions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, key, data = ARGV[1], ARGV[2], ARGV[3]
local ttl_ms, max_size, purge = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop(k)
  local size = tonumber(redis.call('HGET', sizes, k) or '0')
  redis.call('DEL', prefix .. k)
  redis.call('ZREM', lru, k)
  redis.call('ZREM', exp, k)
  redis.call('HDEL', sizes, k)
  if size > 0 then redis.call('DECRBY', total, size) end
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, purge)) do drop(k) end
drop(key)
redis.call('SET', prefix .. key, data, 'PX', ttl_ms)
redis.call('ZADD', lru, now, key)
redis.call('ZADD', exp, now + ttl_ms, key)
redis.call('HSET', sizes, key, string.len(data))
redis.call('INCRBY', total, string.len(data))
local excess = redis.call('ZCARD', lru) - max_size
if excess > 0 then
  for _, k in ipairs(redis.call('ZRANGE', lru, 0, excess - 1)) do drop(k) end
  redis.call('INCRBY', evictions, excess)
  return excess
end
return 0
"""

# KEYS: lru. ARGV: key. Marks a hit entry as most recently used.
_TOUCH_LUA = """
local t = redis.call('TIME')
return redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
"""

# KEYS: lru, exp, sizes, bytes, evictions. ARGV: value prefix, purge limit. Returns {entries, bytes, evictions}.
_SIZE_LUA = """
local lru, exp, sizes, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, k in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local size = tonumber(redis.call('HGET', sizes, k) or '0')
  redis.call('DEL', ARGV[1] .. k)
  redis.call('ZREM', lru, k)
  redis.call('ZREM', exp, k)
  redis.call('HDEL', sizes, k)
  if size > 0 then redis.call('DECRBY', total, size) end
end
return {redis.call('ZCARD', lru), tonumber(redis.call('GET', total) or '0'),
        tonumber(redis.call('GET', KEYS[5]) or '0')}
"""

# KEYS: lru, exp, sizes, bytes. ARGV: value prefix. Returns the number of entries removed.
_CLEAR_LUA = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #members, 500 do
  local batch = {}
  for j = i, math.min(i + 499, #members) do batch[#batch + 1] = ARGV[1] .. members[j] end
  redis.call('DEL', unpack(batch))
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return #members
"""

# KEYS: claim. ARGV: leader id, ttl_ms. 1 when the caller holds the claim now.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: claim. ARGV: leader id, channel, key. Deletes the caller's claim and announces it.
_FINISH_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


def redis_location(url: str) -> dict[str, Any]:
    """Connection arguments for aiocache's ``RedisCache`` from a ``redis://`` or ``rediss://`` URL.

    ``redis://[[user]:password@]host[:port][/db]``; defaults 127.0.0.1, 6379, 0.

    Raises:
        ValueError: for another scheme or a database that is not an integer
            (the message never repeats the password).
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"AIPIPE_REDIS_URL must start with redis:// or rediss://, got {parsed.scheme!r}")
    db_text = parsed.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(f"AIPIPE_REDIS_URL: the database must be an integer, got {db_text!r}")
    pool_kwargs: dict[str, Any] = {}
    if parsed.username:
        pool_kwargs["username"] = urllib.parse.unquote(parsed.username)
    return {
        "endpoint": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 6379,
        "db": int(db_text),
        "password": urllib.parse.unquote(parsed.password) if parsed.password else None,
        "ssl": parsed.scheme == "rediss",
        "connection_pool_kwargs": pool_kwargs,
    }


class RedisCacheStore:
    """The cache shared by every replica: values in Redis through aiocache's ``RedisCache``.

    Keys live under ``namespace`` (``aipipe:{<topic prefix>cache}``; the
    braces are a Redis Cluster hash tag, so the scripts' keys share a slot):
    ``<ns>:v:<key>`` holds a value (with its TTL as ``PX``), the sorted sets
    ``<ns>:lru`` (last use, ms) and ``<ns>:exp`` (expiry, ms) and the hash
    ``<ns>:size`` index the entries, ``<ns>:bytes`` and ``<ns>:evictions`` count,
    ``<ns>:claim:<key>`` is a coalescing claim and ``<ns>:done`` the channel
    that announces finished claims. Writes, trimming to ``max_size`` (least
    recently used first) and clears are Lua scripts, so replicas never see
    half an update; times are Redis server time, so replica clocks do not matter.

    Args:
        url: ``redis://`` or ``rediss://`` URL (``AIPIPE_REDIS_URL``).
        namespace: key prefix.
        max_size: entries kept across all replicas.
        compression_threshold_bytes: values longer than this are zlib-compressed.
        enable_compression: turn compression off entirely.
        op_timeout_s: limit for one Redis call (s), connection included.
        retry_after_s: after a failure, how long Redis is skipped (s).
        poll_s: how often a waiter re-checks a claim in case a ``finish`` message was lost (s).

    Raises:
        ValueError: for a malformed URL.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        max_size: int = 1000,
        compression_threshold_bytes: int = 1024,
        enable_compression: bool = True,
        op_timeout_s: float = 1.0,
        retry_after_s: float = 1.0,
        poll_s: float = 0.5,
    ) -> None:
        where = redis_location(url)
        self.namespace = namespace
        self.max_size = max_size
        self.threshold = compression_threshold_bytes
        self.compress = enable_compression
        self.op_timeout_s = op_timeout_s
        self.poll_s = poll_s
        # one immediate retry on a broken connection, so the first call after Redis restarts is not lost
        where["connection_pool_kwargs"].update(
            socket_timeout=op_timeout_s, retry_on_error=[RedisConnectionError], timeout=DEFAULT_POOL_TIMEOUT_S
        )
        self._cache = RedisCache(
            connection_pool_class=BlockingConnectionPool,
            pool_max_size=DEFAULT_MAX_CONNECTIONS,
            serializer=_BytesSerializer(),
            namespace=f"{namespace}:v",
            timeout=op_timeout_s,
            create_connection_timeout=op_timeout_s,
            **where,
        )
        self._client: Any = self._cache.client
        self.outage = OutageLog(
            f"Redis cache at {where['endpoint']}:{where['port']}/{where['db']}", retry_after_s=retry_after_s
        )
        self._keys = [f"{namespace}:{k}" for k in ("lru", "exp", "size", "bytes", "evictions")]
        self._value_prefix = f"{namespace}:v:"
        self._channel = f"{namespace}:done"
        self._set = self._client.register_script(_SET_LUA)
        self._touch = self._client.register_script(_TOUCH_LUA)
        self._size = self._client.register_script(_SIZE_LUA)
        self._clear = self._client.register_script(_CLEAR_LUA)
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._finish = self._client.register_script(_FINISH_LUA)
        self._waiters: dict[str, _Waiting] = {}
        self.listening = False
        self._closed = False

    def _claim_key(self, key: str) -> str:
        return f"{self.namespace}:claim:{key}"

    async def _call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """Run one Redis call within ``op_timeout_s``; ``(False, None)`` on an outage (logged once)."""
        if not self.outage.should_try():
            return False, None
        try:
            with anyio.fail_after(self.op_timeout_s):
                result = await func(*args, **kwargs)
        except _REDIS_ERRORS as exc:
            self.outage.failed(exc)
            return False, None
        self.outage.ok()
        return True, result

    async def get(self, key: str) -> CachedAnswer | None:
        """The answer under ``key`` (a hit also marks it most recently used); ``None`` on a miss or an outage."""
        ok, data = await self._call(self._cache.get, key)
        if not ok or data is None:
            return None
        try:
            answer = decode_answer(data)
        except ValueError:
            log.warning("ignoring a corrupt cache entry in Redis")
            return None
        await self._call(self._touch, keys=self._keys[:1], args=[key])
        return answer

    async def set(self, key: str, answer: CachedAnswer, ttl_s: float) -> bool:
        """Store ``answer`` for ``ttl_s`` seconds and trim to ``max_size``; ``False`` when not stored."""
        ttl_ms = int(ttl_s * 1000)
        if ttl_ms <= 0:
            return False
        data = encode_answer(answer, threshold_bytes=self.threshold, compress=self.compress)
        ok, _ = await self._call(
            self._set, keys=self._keys, args=[self._value_prefix, key, data, ttl_ms, self.max_size, 100]
        )
        return ok

    async def clear(self) -> int:
        """Remove every entry of this namespace (claims and the eviction count are kept)."""
        ok, removed = await self._call(self._clear, keys=self._keys[:4], args=[self._value_prefix])
        return int(removed) if ok else 0

    async def size(self) -> StoreSize:
        """Entries, bytes and evictions of the shared store (zeros during an outage)."""
        ok, result = await self._call(self._size, keys=self._keys, args=[self._value_prefix, 1000])
        if not ok:
            return StoreSize(0, 0, 0)
        entries, stored, evictions = (int(x) for x in result)
        return StoreSize(entries=entries, bytes=stored, evictions=evictions)

    async def claim(self, key: str, leader_id: str, ttl_ms: int) -> bool:
        """``SET <ns>:claim:<key> leader NX PX ttl_ms`` (or the caller's own claim renewed); ``True`` on an outage."""
        ok, got = await self._call(self._claim, keys=[self._claim_key(key)], args=[leader_id, max(1, ttl_ms)])
        return not ok or bool(got)

    async def finish(self, key: str, leader_id: str) -> None:
        """Delete ``leader_id``'s claim on ``key`` and publish ``key`` on ``<ns>:done``."""
        await self._call(self._finish, keys=[self._claim_key(key)], args=[leader_id, self._channel, key])

    async def wait_done(self, key: str, timeout_s: float) -> bool:
        """Wait for the claim on ``key`` to end: woken by ``listen`` or by polling every ``poll_s``."""
        waiting = self._waiters.get(key)
        if waiting is None:
            waiting = self._waiters[key] = _Waiting()
        waiting.count += 1
        event = waiting.event
        try:
            deadline = anyio.current_time() + max(0.0, timeout_s)
            while True:
                ok, pttl = await self._call(self._client.pttl, self._claim_key(key))
                if not ok or pttl is None or pttl < 0:  # gone (-2), or Redis down: stop waiting
                    return True
                left_s = deadline - anyio.current_time()
                if left_s <= 0:
                    return False
                with anyio.move_on_after(min(left_s, pttl / 1000, self.poll_s)):
                    await event.wait()
                if event.is_set():
                    return True
        finally:
            waiting.count -= 1
            if waiting.count == 0 and self._waiters.get(key) is waiting:
                del self._waiters[key]

    def _wake(self, key: str) -> None:
        waiting = self._waiters.pop(key, None)
        if waiting is not None:
            waiting.event.set()

    async def listen(self) -> None:
        """Subscribe to ``<ns>:done`` and wake local waiters; reconnects after an outage. Runs until cancelled."""
        while True:
            if not self.outage.should_try():
                await anyio.sleep(self.outage.retry_after_s)
                continue
            pubsub = self._client.pubsub()
            try:
                with anyio.fail_after(self.op_timeout_s):
                    await pubsub.subscribe(self._channel)
                self.listening = True
                self.outage.ok()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.poll_s)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except _REDIS_ERRORS as exc:
                self.outage.failed(exc)
            finally:
                self.listening = False
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.op_timeout_s):
                    try:
                        await pubsub.aclose()
                    except _REDIS_ERRORS:
                        pass

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.aclose()
        except _REDIS_ERRORS:
            pass


def build_cache_store(redis_url: str | None, config: CacheConfig, *, namespace: str) -> CacheStore:
    """``RedisCacheStore`` when ``redis_url`` (``AIPIPE_REDIS_URL``) is set, else ``MemoryCacheStore``.

    Raises:
        ValueError: for a malformed Redis URL.
    """
    if redis_url:
        return RedisCacheStore(
            redis_url,
            namespace=namespace,
            max_size=config.max_size,
            compression_threshold_bytes=config.compression_threshold_bytes,
            enable_compression=config.enable_compression,
        )
    return MemoryCacheStore(
        max_size=config.max_size,
        compression_threshold_bytes=config.compression_threshold_bytes,
        enable_compression=config.enable_compression,
    )
