"""Where the budget gate keeps spend and reservations: in-process, or in Redis for several replicas.

``MemoryBudgetStore`` wraps the pure ``stages.rules.ledger.BudgetLedger`` (one gate
process; reserve is atomic because nothing awaits between check and hold).
``RedisBudgetStore`` keeps the same state in Redis so every gate replica
shares it (``AIPIPE_REDIS_URL``, DESIGN B1): each operation is one Lua script,
which Redis runs atomically, so two replicas can never both take the last
dollar. Limits are not stored in Redis: every replica folds them from the
``set_budget`` commands on ``ai.control`` and passes them to each call.

Redis layout (every key starts with ``aipipe:{<topic prefix>}budget:``; the
``{...}`` hash tag keeps them in one cluster slot), amounts in integer units
of 1e-10 USD (the precision ``cost_usd`` is published with, DESIGN A4):

- ``spend:<scope>|<window>|<window start>``: spend of one window (INCRBY), expires 7 days after the window ends;
- ``rt:<scope>``: total held by unexpired reservations of the scope;
- ``rz:<scope>`` (sorted set id -> expiry ms) and ``ra:<scope>`` (hash id -> amount): the reservations,
  purged lazily when they expire;
- ``rs:<request id>``: the scopes a request holds (set), ``settled:<request id>``: the request's cost
  was counted (kept 40 days, longer than a month, so a replay of ``ai.costs`` counts nothing twice);
- ``alert:<scope>|<window>|<window start>|<pct>``: one replica claimed that alert.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from typing import Any, Protocol

from pipeline.runtime.runner import now_utc
from pipeline.stores.redis_client import redis_from_url
from stages.rules.ledger import (
    SETTLED_RETENTION,
    WINDOWS,
    Admission,
    AlertKey,
    BudgetLedger,
    Limits,
    WindowState,
    window_end,
    window_start,
)

log = logging.getLogger("aipipe.budget_store")

#: One Redis amount unit in USD: amounts are integers of 1e-10 USD.
UNIT_USD = Decimal("1e-10")
#: How long spend keys outlive their window (for inspection), and alert claims outlive theirs.
_SPEND_KEEP = timedelta(days=7)


def to_units(amount_usd: Decimal, rounding: str = ROUND_HALF_EVEN) -> int:
    """USD -> integer units of 1e-10 USD, rounded as asked (reservations round up, limits down)."""
    return int((amount_usd / UNIT_USD).to_integral_value(rounding=rounding))


def from_units(units: int | str | bytes) -> Decimal:
    """Integer units of 1e-10 USD (as Redis returns them) -> USD."""
    raw = units.decode() if isinstance(units, bytes) else units
    return Decimal(int(raw)) * UNIT_USD


class BudgetStore(Protocol):
    """Spend and reservations of every scope (USD), shared by the gate replicas that use the same store."""

    ledger: BudgetLedger
    """Limits and time zone (and, in process, the whole state)."""

    async def reserve(
        self, request_id: str, scopes: tuple[str, ...], amount_usd: Decimal, at: datetime, expires_at: datetime
    ) -> Admission:
        """Hold ``amount_usd`` on ``scopes`` until ``expires_at`` if it fits every limited window, else refuse.

        Idempotent per request id.

        Raises:
            BudgetStoreError: when the store cannot be reached.
        """
        ...

    async def settle(
        self, request_id: str, scopes: tuple[str, ...], cost_usd: Decimal, at: datetime, now: datetime
    ) -> bool:
        """Count a request's real cost at time ``at`` on ``scopes`` and drop its reservation (once per id).

        Windows that ended before ``now`` are skipped. Returns ``False`` when
        this id was already counted (or is too old to matter).

        Raises:
            BudgetStoreError: when the store cannot be reached.
        """
        ...

    async def release(self, request_id: str) -> bool:
        """Drop a request's reservation without spend; ``False`` when none was held.

        Raises:
            BudgetStoreError: when the store cannot be reached.
        """
        ...

    async def status(self, scope: str, at: datetime) -> dict[str, WindowState]:
        """Every window of ``scope`` at ``at`` (expired reservations dropped first).

        Raises:
            BudgetStoreError: when the store cannot be reached.
        """
        ...

    async def expire(self, at: datetime) -> set[str]:
        """Drop reservations whose deadline passed; returns the scopes that changed.

        Raises:
            BudgetStoreError: when the store cannot be reached.
        """
        ...

    async def claim_alert(self, key: AlertKey) -> bool:
        """Whether this caller is the first to raise ``key`` (each alert once per window, across replicas).

        Raises:
            BudgetStoreError: when the store cannot be reached.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class BudgetStoreError(Exception):
    """The budget store (Redis) could not be reached or answered an error."""


class MemoryBudgetStore:
    """The in-process store: one ``BudgetLedger`` (one gate replica only)."""

    def __init__(self, ledger: BudgetLedger | None = None) -> None:
        self.ledger = ledger or BudgetLedger()
        self._alerts: set[AlertKey] = set()

    async def reserve(
        self, request_id: str, scopes: tuple[str, ...], amount_usd: Decimal, at: datetime, expires_at: datetime
    ) -> Admission:
        """See ``BudgetStore.reserve`` (atomic: no await between check and hold)."""
        return self.ledger.reserve(request_id, scopes, amount_usd, at, expires_at)

    async def settle(
        self, request_id: str, scopes: tuple[str, ...], cost_usd: Decimal, at: datetime, now: datetime
    ) -> bool:
        """See ``BudgetStore.settle``."""
        return self.ledger.settle(request_id, scopes, cost_usd, at, now=now)

    async def release(self, request_id: str) -> bool:
        """See ``BudgetStore.release``."""
        return self.ledger.release(request_id)

    async def status(self, scope: str, at: datetime) -> dict[str, WindowState]:
        """See ``BudgetStore.status``."""
        return self.ledger.status(scope, at)

    async def expire(self, at: datetime) -> set[str]:
        """See ``BudgetStore.expire``; also forgets old windows and settled ids."""
        gone = self.ledger.expire(at)
        self.ledger.prune(at)
        self._alerts = {k for k in self._alerts if k.current(at, self.ledger.tz)}
        return {scope for r in gone for scope in r.scopes}

    async def claim_alert(self, key: AlertKey) -> bool:
        """See ``BudgetStore.claim_alert``."""
        if key in self._alerts:
            return False
        self._alerts.add(key)
        return True

    async def aclose(self) -> None:
        """Nothing to close."""


# --- Redis ---------------------------------------------------------------------------------------

_PURGE = """
local function purge(p, scope, now)
  local zkey = p .. 'rz:' .. scope
  local hkey = p .. 'ra:' .. scope
  local gone = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  for _, rid in ipairs(gone) do
    local a = redis.call('HGET', hkey, rid)
    if a then
      redis.call('DECRBY', p .. 'rt:' .. scope, a)
      redis.call('HDEL', hkey, rid)
    end
    redis.call('ZREM', zkey, rid)
  end
  return #gone
end
local function release(p, id)
  local skey = p .. 'rs:' .. id
  local scopes = redis.call('SMEMBERS', skey)
  if #scopes == 0 then return 0 end
  for _, scope in ipairs(scopes) do
    local a = redis.call('HGET', p .. 'ra:' .. scope, id)
    if a then
      redis.call('DECRBY', p .. 'rt:' .. scope, a)
      redis.call('HDEL', p .. 'ra:' .. scope, id)
    end
    redis.call('ZREM', p .. 'rz:' .. scope, id)
  end
  redis.call('DEL', skey)
  return 1
end
"""

# ARGV: prefix, id, now_ms, expires_ms, amount, nscopes, then per scope: scope, nwindows,
# then per limited window: window name, spend key suffix, limit.
_RESERVE = (
    _PURGE
    + """
local p = ARGV[1]
local id = ARGV[2]
local now = tonumber(ARGV[3])
local expires = tonumber(ARGV[4])
local amount = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
if redis.call('EXISTS', p .. 'rs:' .. id) == 1 or redis.call('EXISTS', p .. 'settled:' .. id) == 1 then
  return {1}
end
local i = 7
local scopes = {}
for s = 1, n do
  local scope = ARGV[i]
  local nw = tonumber(ARGV[i + 1])
  i = i + 2
  purge(p, scope, now)
  local reserved_s = redis.call('GET', p .. 'rt:' .. scope) or '0'
  local reserved = tonumber(reserved_s)
  for w = 1, nw do
    local wname = ARGV[i]
    local spent_s = redis.call('GET', p .. 'spend:' .. ARGV[i + 1]) or '0'
    local limit = tonumber(ARGV[i + 2])
    i = i + 3
    if tonumber(spent_s) + reserved + amount > limit then
      return {0, scope, wname, spent_s, reserved_s}
    end
  end
  scopes[#scopes + 1] = scope
end
local ttl = expires - now + 60000
if ttl < 60000 then ttl = 60000 end
ttl = math.floor(ttl)
for _, scope in ipairs(scopes) do
  redis.call('ZADD', p .. 'rz:' .. scope, ARGV[4], id)
  redis.call('HSET', p .. 'ra:' .. scope, id, ARGV[5])
  redis.call('INCRBY', p .. 'rt:' .. scope, ARGV[5])
  redis.call('SADD', p .. 'rs:' .. id, scope)
end
if #scopes > 0 then redis.call('PEXPIRE', p .. 'rs:' .. id, ttl) end
return {1}
"""
)

# ARGV: prefix, id, amount, settled_ttl_ms, n, then n x (spend key suffix, ttl_ms)
_SETTLE = (
    _PURGE
    + """
local p = ARGV[1]
local id = ARGV[2]
if not redis.call('SET', p .. 'settled:' .. id, '1', 'NX', 'PX', tonumber(ARGV[4])) then
  release(p, id)
  return 0
end
release(p, id)
local n = tonumber(ARGV[5])
local i = 6
for k = 1, n do
  local key = p .. 'spend:' .. ARGV[i]
  redis.call('INCRBY', key, ARGV[3])
  redis.call('PEXPIRE', key, tonumber(ARGV[i + 1]))
  i = i + 2
end
return 1
"""
)

_RELEASE = (
    _PURGE
    + """
return release(ARGV[1], ARGV[2])
"""
)

# ARGV: prefix, scope, now_ms, then spend key suffixes; returns reserved, then each spend.
_STATUS = (
    _PURGE
    + """
local p = ARGV[1]
local scope = ARGV[2]
purge(p, scope, tonumber(ARGV[3]))
local out = {redis.call('GET', p .. 'rt:' .. scope) or '0'}
for i = 4, #ARGV do
  out[#out + 1] = redis.call('GET', p .. 'spend:' .. ARGV[i]) or '0'
end
return out
"""
)

# ARGV: prefix, now_ms, scopes...; returns how many reservations expired per scope.
_EXPIRE = (
    _PURGE
    + """
local out = {}
for i = 3, #ARGV do
  out[#out + 1] = purge(ARGV[1], ARGV[i], tonumber(ARGV[2]))
end
return out
"""
)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _spend_suffix(scope: str, window: str, start: datetime) -> str:
    return f"{scope}|{window}|{start.isoformat()}"


class RedisBudgetStore:
    """Spend and reservations in Redis, shared by every gate replica (atomic Lua scripts).

    Args:
        url: Redis URL (``redis://host:port/db``); never logged.
        namespace: separates deployments sharing one Redis (the topic prefix, e.g. ``ai.``).
        ledger: holds the limits and time zone (its spend and reservations are unused).
        client: an existing ``redis.asyncio.Redis`` (tests); default: one from ``url``.
    """

    def __init__(
        self, url: str, *, namespace: str = "ai.", ledger: BudgetLedger | None = None, client: Any = None
    ) -> None:

        self.ledger = ledger or BudgetLedger()
        self._client = client if client is not None else redis_from_url(url)
        self._owns_client = client is None
        self._p = f"aipipe:{{{namespace}}}budget:"
        self._scopes_seen: set[str] = set()
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)
        self._release = self._client.register_script(_RELEASE)
        self._status = self._client.register_script(_STATUS)
        self._expire = self._client.register_script(_EXPIRE)

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._p

    async def _call(self, script: Any, args: list[Any]) -> Any:
        import redis

        try:
            return await script(keys=[self._p + "lock"], args=args)
        except (redis.RedisError, OSError) as exc:
            raise BudgetStoreError(f"budget store (Redis) failed: {type(exc).__name__}: {exc}") from exc

    async def reserve(
        self, request_id: str, scopes: tuple[str, ...], amount_usd: Decimal, at: datetime, expires_at: datetime
    ) -> Admission:
        """See ``BudgetStore.reserve``: one atomic script checks every limited window and holds on every scope."""
        amount = to_units(amount_usd, ROUND_CEILING)
        args: list[Any] = [self._p, request_id, _ms(at), _ms(expires_at), amount, len(scopes)]
        for scope in scopes:
            self._scopes_seen.add(scope)
            limits = self.ledger.limits.get(scope, Limits())
            limited = [(w, limits.get(w)) for w in WINDOWS if limits.get(w) is not None]
            args += [scope, len(limited)]
            for window, limit in limited:
                assert limit is not None
                start = window_start(window, at, self.ledger.tz)
                args += [window, _spend_suffix(scope, window, start), to_units(limit, ROUND_FLOOR)]
        result = await self._call(self._reserve, args)
        if int(result[0]) == 1:
            return Admission(True)
        scope, window = _text(result[1]), _text(result[2])
        return Admission(
            False,
            scope,
            window,
            self.ledger.limits[scope].get(window),
            from_units(result[3]),
            from_units(result[4]),
        )

    async def settle(
        self, request_id: str, scopes: tuple[str, ...], cost_usd: Decimal, at: datetime, now: datetime
    ) -> bool:
        """See ``BudgetStore.settle``: counted once per id across every replica (``settled:<id>``)."""
        if at < now - SETTLED_RETENTION:
            await self.release(request_id)
            return False
        windows: list[Any] = []
        for scope in scopes:
            self._scopes_seen.add(scope)
            for window in WINDOWS:
                end = window_end(window, at, self.ledger.tz)
                if end <= now:
                    continue
                start = window_start(window, at, self.ledger.tz)
                windows += [_spend_suffix(scope, window, start), _ms(end + _SPEND_KEEP) - _ms(now)]
        settled_ttl_ms = int(SETTLED_RETENTION.total_seconds() * 1000)
        args = [self._p, request_id, to_units(cost_usd), settled_ttl_ms, len(windows) // 2, *windows]
        return int(await self._call(self._settle, args)) == 1

    async def release(self, request_id: str) -> bool:
        """See ``BudgetStore.release``."""
        return int(await self._call(self._release, [self._p, request_id])) == 1

    async def status(self, scope: str, at: datetime) -> dict[str, WindowState]:
        """See ``BudgetStore.status``."""
        tz = self.ledger.tz
        starts = {w: window_start(w, at, tz) for w in WINDOWS}
        args = [self._p, scope, _ms(at), *(_spend_suffix(scope, w, starts[w]) for w in WINDOWS)]
        values = await self._call(self._status, args)
        reserved = from_units(values[0])
        limits = self.ledger.limits.get(scope, Limits())
        return {
            w: WindowState(
                limit_usd=limits.get(w),
                spent_usd=from_units(values[i + 1]),
                reserved_usd=reserved,
                starts_at=starts[w],
                resets_at=window_end(w, at, tz),
            )
            for i, w in enumerate(WINDOWS)
        }

    async def expire(self, at: datetime) -> set[str]:
        """See ``BudgetStore.expire`` (for the scopes this replica has used)."""
        scopes = sorted(self._scopes_seen)
        if not scopes:
            return set()
        counts = await self._call(self._expire, [self._p, _ms(at), *scopes])
        return {scope for scope, n in zip(scopes, counts, strict=True) if int(n) > 0}

    async def claim_alert(self, key: AlertKey) -> bool:
        """See ``BudgetStore.claim_alert``: ``SET NX`` on the alert's key, kept until a week after the window."""
        import redis

        end = window_end(key.window, key.window_start, self.ledger.tz)
        ttl_ms = max(_ms(end + _SPEND_KEEP) - _ms(_now()), 1000)
        name = f"{self._p}alert:{_spend_suffix(key.scope, key.window, key.window_start)}|{key.threshold_pct}"
        try:
            return bool(await self._client.set(name, b"1", nx=True, px=ttl_ms))
        except (redis.RedisError, OSError) as exc:
            raise BudgetStoreError(f"budget store (Redis) failed: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the Redis connection pool (when this store opened it)."""
        if self._owns_client:
            await self._client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now() -> datetime:
    return now_utc()


def open_budget_store(redis_url: str | None, namespace: str, ledger: BudgetLedger) -> BudgetStore:
    """The Redis store when ``redis_url`` is set (``AIPIPE_REDIS_URL``), else the in-process one over ``ledger``."""
    if redis_url:
        log.info("budget state in Redis (shared by every gate replica)")
        return RedisBudgetStore(redis_url, namespace=namespace, ledger=ledger)
    return MemoryBudgetStore(ledger)


__all__ = [
    "UNIT_USD",
    "BudgetStore",
    "BudgetStoreError",
    "MemoryBudgetStore",
    "RedisBudgetStore",
    "from_units",
    "open_budget_store",
    "to_units",
]
