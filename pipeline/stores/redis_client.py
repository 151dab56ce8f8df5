"""One way to open a Redis client for the shared stores (budget, rate limits, cache).

redis-py's async ``ConnectionPool`` raises ``MaxConnectionsError`` as soon as
its connections are all busy; a stage handles hundreds of messages at once,
so the stores use a ``BlockingConnectionPool``, which makes a caller wait
(up to ``timeout_s``) for a free connection instead of failing.
(redis-py docs: "BlockingConnectionPool ... blocks the calling thread/task
when no connections are available", redis.readthedocs.io, connections.)
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

#: Connections one store keeps to Redis at most.
DEFAULT_MAX_CONNECTIONS = 64
#: Longest wait (s) for a free pooled connection before the call fails.
DEFAULT_POOL_TIMEOUT_S = 5.0


def blocking_pool_kwargs(
    max_connections: int = DEFAULT_MAX_CONNECTIONS, timeout_s: float = DEFAULT_POOL_TIMEOUT_S
) -> dict[str, Any]:
    """Keyword arguments that give a client (redis-py or aiocache) a bounded, blocking pool."""
    return {"max_connections": max_connections, "timeout": timeout_s}


def redis_from_url(
    url: str,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
    **kwargs: Any,
) -> aioredis.Redis:
    """An async Redis client on a ``BlockingConnectionPool`` for ``url`` (``redis://`` or ``rediss://``).

    Raises:
        ValueError: for a malformed URL (from redis-py).
    """
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s, **kwargs)
    return aioredis.Redis(connection_pool=pool)
