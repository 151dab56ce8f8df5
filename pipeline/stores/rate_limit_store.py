"""Rate limits shared by every replica through Redis (``AIPIPE_REDIS_URL``), or kept in-process.

``RedisRateLimiter`` implements ``stages.rules.rate_limits.RateLimiter`` with the same
sliding window log as the in-process ``SlidingWindowLimiter``, kept in Redis
so the executors of every replica charge one window per provider. Each
operation is one Lua script (``EVALSHA``), so check-and-charge is atomic
across replicas. Per provider, three keys under ``namespace``
(``aipipe:ratelimit:<topic prefix>`` by default, so two deployments on one
Redis do not mix):

* ``{provider}:log``: sorted set, call id -> call time (Unix ms);
* ``{provider}:tok``: hash, call id -> tokens charged;
* ``{provider}:sum``: the tokens of the calls in the window.

Times come from the caller's clock (``time.time``; replicas' clocks should
be NTP-synchronised, a skew only moves the window's edge by that much). The
keys expire after two windows without writes.

When Redis fails, a call is checked and charged against an in-process
window instead (one warning per 30 s): the limits then hold per replica
until Redis answers again, and requests keep flowing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pipeline.runtime.config import RateLimit
from pipeline.runtime.settings import Settings
from pipeline.stores.redis_client import redis_from_url
from stages.rules.rate_limits import WINDOW_S, MemoryRateLimiter, RateLimiter, WindowUsage

log = logging.getLogger("aipipe.ratelimit")

_PRUNE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cutoff = now - window
while true do
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, 500)
  if #old == 0 then break end
  local vals = redis.call('HMGET', KEYS[2], unpack(old))
  local freed = 0
  for _, v in ipairs(vals) do
    if v then freed = freed + tonumber(v) end
  end
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
  if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
end
"""

# ARGV: now_ms, window_ms, rpm (0: none), tpm (0: none), tokens, call id ('' = only check).
# Returns 0 (room; charged when a call id is given), the wait in ms, or -1 (never: tokens > tpm).
_ACQUIRE = (
    _PRUNE
    + """
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local call_id = ARGV[6]
local count = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
local wait = 0
if rpm > 0 and count + 1 > rpm then
  local e = redis.call('ZRANGE', KEYS[1], count - rpm, count - rpm, 'WITHSCORES')
  local w = tonumber(e[2]) + window - now
  if w > wait then wait = w end
end
if tpm > 0 then
  if tokens > tpm then return -1 end
  local excess = used + tokens - tpm
  if excess > 0 then
    local freed = 0
    local start = 0
    local done = false
    while not done do
      local batch = redis.call('ZRANGE', KEYS[1], start, start + 499, 'WITHSCORES')
      if #batch == 0 then break end
      local ids = {}
      for i = 1, #batch, 2 do ids[#ids + 1] = batch[i] end
      local vals = redis.call('HMGET', KEYS[2], unpack(ids))
      for j = 1, #ids do
        freed = freed + (tonumber(vals[j]) or 0)
        if freed >= excess then
          local w = tonumber(batch[2 * j]) + window - now
          if w > wait then wait = w end
          done = true
          break
        end
      end
      start = start + 500
    end
  end
end
if wait > 0 then return math.ceil(wait) end
if call_id == '' then return 0 end
redis.call('ZADD', KEYS[1], now, call_id)
redis.call('HSET', KEYS[2], call_id, tokens)
redis.call('INCRBY', KEYS[3], tokens)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], window * 2) end
return 0
"""
)

# ARGV: call id, tokens. Returns 1 when the call was still in the window.
_SETTLE = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
local new = tonumber(ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], new)
redis.call('INCRBY', KEYS[3], new - tonumber(old))
return 1
"""

# ARGV: call id. Returns 1 when the call was still in the window.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if not old then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], tonumber(old))
return 1
"""

# ARGV: now_ms, window_ms. Returns {calls, tokens} in the window.
_USAGE = (
    _PRUNE
    + """
return {redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}
"""
)


class RedisRateLimiter:
    """A ``RateLimiter`` whose windows live in Redis, shared by every replica.

    Args:
        client: a ``redis.asyncio.Redis`` client (closed by ``aclose`` when ``owns_client``).
        namespace: key prefix; replicas that share limits use the same one.
        window_s: window length (s), 60 for per-minute limits.
        clock: current Unix time (s); injectable for tests.
        owns_client: close ``client`` in ``aclose``.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str = "aipipe:ratelimit:",
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.time,
        owns_client: bool = True,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.window_ms = int(window_s * 1000)
        self.clock = clock
        self.owns_client = owns_client
        self.fallback = MemoryRateLimiter(window_s=window_s)
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)
        self._release = client.register_script(_RELEASE)
        self._usage = client.register_script(_USAGE)
        self._warned_at = -math.inf

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisRateLimiter:
        """A limiter on a new client for ``url`` (``redis://host:port/db``); connects on first use."""
        return cls(redis_from_url(url), **kwargs)

    def _keys(self, provider: str) -> list[str]:
        base = f"{self.namespace}{{{provider}}}"
        return [f"{base}:log", f"{base}:tok", f"{base}:sum"]

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 30:
            self._warned_at = now
            log.warning("rate limits: Redis failed (%s); limiting in-process until it answers", type(exc).__name__)

    async def _run_acquire(self, provider: str, limit: RateLimit, tokens: int, call_id: str) -> float:
        args: list[str | int] = [
            self._now_ms(),
            self.window_ms,
            limit.requests_per_minute or 0,
            limit.tokens_per_minute or 0,
            max(0, tokens),
            call_id,
        ]
        result = int(await self._acquire(keys=self._keys(provider), args=args))
        if result < 0:
            return math.inf
        return result / 1000

    async def wait_s(self, provider: str, limit: RateLimit, tokens: int) -> float:
        """Seconds until a call of ``tokens`` fits (0: now; ``math.inf``: never); charges nothing."""
        try:
            return await self._run_acquire(provider, limit, tokens, "")
        except (RedisError, OSError) as exc:
            self._warn(exc)
            return await self.fallback.wait_s(provider, limit, tokens)

    async def acquire(self, provider: str, limit: RateLimit, tokens: int, call_id: str) -> float:
        """Charge the call atomically when it fits (returns 0.0), else return the wait (s)."""
        try:
            return await self._run_acquire(provider, limit, tokens, call_id)
        except (RedisError, OSError) as exc:
            self._warn(exc)
            return await self.fallback.acquire(provider, limit, tokens, call_id)

    async def settle(self, provider: str, call_id: str, tokens: int) -> None:
        """Correct a charged call to ``tokens``."""
        try:
            await self._settle(keys=self._keys(provider), args=[call_id, max(0, tokens)])
        except (RedisError, OSError) as exc:
            self._warn(exc)
        await self.fallback.settle(provider, call_id, tokens)

    async def release(self, provider: str, call_id: str) -> None:
        """Give a charged call's quota back."""
        try:
            await self._release(keys=self._keys(provider), args=[call_id])
        except (RedisError, OSError) as exc:
            self._warn(exc)
        await self.fallback.release(provider, call_id)

    async def usage(self, provider: str) -> WindowUsage:
        """Calls and tokens in the provider's shared window now.

        Raises:
            RedisError: when Redis does not answer.
        """
        calls, tokens = await self._usage(keys=self._keys(provider), args=[self._now_ms(), self.window_ms])
        return WindowUsage(int(calls), int(tokens))

    async def aclose(self) -> None:
        """Close the Redis client (when this limiter owns it)."""
        if self.owns_client:
            await self.client.aclose()


def open_rate_limiter(settings: Settings) -> RateLimiter:
    """The limiter for this process: Redis-shared when ``AIPIPE_REDIS_URL`` is set, else in-process.

    The Redis namespace includes the topic prefix, so replicas of one
    deployment share limits and separate deployments on one Redis do not.
    """
    if settings.redis_url:
        return RedisRateLimiter.from_url(settings.redis_url, namespace=f"aipipe:ratelimit:{settings.topic_prefix}")
    return MemoryRateLimiter()
