"""What a restore puts back into a fresh broker (DESIGN A11), computed from archived events (pure, no I/O).

Two folds, each small whatever the history's length:

* ``ControlFold``: the ``control`` commands that are state — every budget
  scope's limits (``set_budget`` merged per window, DESIGN A6), the latest
  ``set_strategy`` — and the circuits as the latest snapshots and the
  transitions after them left them.
* ``CostRollup``: cost events summed per (user, provider, model, UTC hour,
  cache hit or not). ``restored_cost_events`` turns the buckets of the budget
  windows still open into a few ``CostEvent`` s (one per user, provider,
  model, cache hit or not, and piece of time between two window boundaries or
  UTC midnights), so every open daily, weekly and monthly window of every
  scope sums to the same spend as the original events did, and per-day
  reports keep their days.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from msgspec import UNSET

from schemas.archive import ControlSummary, CostBucket
from schemas.events import (
    CircuitSnapshot,
    CircuitState,
    CircuitTransition,
    ControlEvent,
    CostEvent,
    CostLine,
    SetBudget,
    SetStrategy,
)
from schemas.response import Usage
from stages.rules.ledger import WINDOWS, window_start

#: Id prefix of the cost events a restore writes for rolled-up spend (they stand for many requests).
RESTORED_ID_PREFIX = "restored-"
_HOUR_MS = 3_600_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def is_restored_id(request_id: str) -> bool:
    """Whether a cost event id is a restore's roll-up rather than a request id."""
    return request_id.startswith(RESTORED_ID_PREFIX)


class ControlFold:
    """Folds ``control`` events, in the order they were archived, into the state a restore republishes.

    Args:
        start: the summary of the days before (``None``: nothing before).
    """

    def __init__(self, start: ControlSummary | None = None) -> None:
        self.budgets: dict[str, dict[str, float | None]] = {}
        self._budget_at: dict[tuple[str, str], datetime] = {}
        self.strategy: SetStrategy | None = None
        self.states: dict[str, CircuitState] = {}
        self.snapshot_at: datetime | None = None
        if start is not None:
            self.budgets = {scope: dict(windows) for scope, windows in start.budgets.items()}
            self.strategy = start.strategy
            if start.snapshot is not None:
                self.states = dict(start.snapshot.states)
                self.snapshot_at = start.snapshot.at

    def add(self, event: ControlEvent) -> None:
        """Fold one event; events that are not state (health, alerts, statuses, cache commands) are ignored."""
        if isinstance(event, SetBudget):
            at = event.at or _EPOCH
            for window, value in (
                ("daily", event.daily_usd),
                ("weekly", event.weekly_usd),
                ("monthly", event.monthly_usd),
            ):
                if value is UNSET:
                    continue
                known = self._budget_at.get((event.scope, window))
                if known is not None and at < known:
                    continue
                self._budget_at[(event.scope, window)] = at
                self.budgets.setdefault(event.scope, {})[window] = value  # type: ignore[assignment]
        elif isinstance(event, SetStrategy):
            if self.strategy is None or (event.at or _EPOCH) >= (self.strategy.at or _EPOCH):
                self.strategy = event
        elif isinstance(event, CircuitSnapshot):
            self.states.update(event.states)  # several breaker replicas each snapshot their own providers
            self.snapshot_at = max(self.snapshot_at or event.at, event.at)
        elif isinstance(event, CircuitTransition):
            self.states[event.provider] = event.to_state
            self.snapshot_at = max(self.snapshot_at or event.at, event.at)

    def merged(self, later: ControlFold) -> ControlFold:
        """A new fold: this one, then what ``later`` folded (a later day), the latest ``at`` winning per command."""
        out = ControlFold()
        out.budgets = {scope: dict(windows) for scope, windows in self.budgets.items()}
        out._budget_at = dict(self._budget_at)
        for (scope, window), at in later._budget_at.items():
            known = out._budget_at.get((scope, window))
            if known is None or at >= known:
                out._budget_at[(scope, window)] = at
                out.budgets.setdefault(scope, {})[window] = later.budgets[scope][window]
        out.strategy = self.strategy
        if later.strategy is not None and (
            out.strategy is None or (later.strategy.at or _EPOCH) >= (out.strategy.at or _EPOCH)
        ):
            out.strategy = later.strategy
        out.states = {**self.states, **later.states}
        stamps = [t for t in (self.snapshot_at, later.snapshot_at) if t is not None]
        out.snapshot_at = max(stamps) if stamps else None
        return out

    def summary(self, day: str, records: int) -> ControlSummary:
        """The fold as a day summary (``records``: how many records the day held)."""
        snapshot = CircuitSnapshot(states=dict(self.states), at=self.snapshot_at) if self.snapshot_at else None
        return ControlSummary(
            day=day,
            records=records,
            budgets={scope: dict(windows) for scope, windows in self.budgets.items()},
            strategy=self.strategy,
            snapshot=snapshot,
        )

    def events(self) -> list[ControlEvent]:
        """What a restore publishes: a ``set_budget`` per scope (windows ever set), the strategy, the circuits."""
        out: list[ControlEvent] = []
        for scope, windows in sorted(self.budgets.items()):
            at = max((self._budget_at.get((scope, w), _EPOCH) for w in windows), default=_EPOCH)
            out.append(
                SetBudget(
                    scope=scope,
                    daily_usd=windows.get("daily", UNSET),  # type: ignore[arg-type]
                    weekly_usd=windows.get("weekly", UNSET),  # type: ignore[arg-type]
                    monthly_usd=windows.get("monthly", UNSET),  # type: ignore[arg-type]
                    at=at if at > _EPOCH else None,
                )
            )
        if self.strategy is not None:
            out.append(self.strategy)
        if self.snapshot_at is not None and self.states:
            out.append(CircuitSnapshot(states=dict(self.states), at=self.snapshot_at))
        return out


#: Amounts are summed as integers of this many USD (1e-10: cost events carry 10 decimal places), exactly and fast.
_UNIT = Decimal("1e-10")


def _units(usd: float) -> int:
    """``usd`` in units of 1e-10 USD (a cost event's amounts have at most 10 decimal places)."""
    return round(usd * 10_000_000_000)


def _usd(units: int) -> float:
    """Units of 1e-10 USD back to USD."""
    return float(Decimal(units) * _UNIT)


@dataclass
class _Sums:
    cost: int = 0  # 1e-10 USD
    saved: int = 0  # 1e-10 USD
    prompt: int = 0
    completion: int = 0
    requests: int = 0
    hits: int = 0

    def add(self, other: _Sums) -> None:
        self.cost += other.cost
        self.saved += other.saved
        self.prompt += other.prompt
        self.completion += other.completion
        self.requests += other.requests
        self.hits += other.hits


#: (user, provider, model, cache hit)
_Who = tuple[str | None, str, str, bool]


@dataclass
class CostRollup:
    """Cost events summed per (user, provider, model, cache hit or not, UTC hour)."""

    buckets: dict[tuple[_Who, int], _Sums] = field(default_factory=dict)
    events: int = 0

    def add(self, event: CostEvent, *, sign: int = 1) -> None:
        """Add one cost event: each of its ``lines`` to its own provider and model (a cache hit: its saving).

        ``sign=-1`` takes an event added before out again.
        """
        self.events += sign
        hour = int(event.at.timestamp() * 1000) // _HOUR_MS * _HOUR_MS
        count = event.requests * sign
        if event.cached or not event.lines:
            sums = _Sums(
                cost=_units(event.cost_usd) * sign,
                saved=_units(event.saved_usd) * sign,
                prompt=event.usage.prompt_tokens * sign,
                completion=event.usage.completion_tokens * sign,
                requests=count,
                hits=count if event.cached else 0,
            )
            self._add((event.user, event.provider, event.model, event.cached), hour, sums)
            return
        last = len(event.lines) - 1
        for i, line in enumerate(event.lines):
            sums = _Sums(
                cost=_units(line.cost_usd) * sign,
                prompt=line.usage.prompt_tokens * sign,
                completion=line.usage.completion_tokens * sign,
                requests=count if i == last else 0,  # the request counts once, with its last line
            )
            self._add((event.user, line.provider, line.model, False), hour, sums)

    def add_bucket(self, bucket: CostBucket) -> None:
        """Add a bucket of a day summary."""
        sums = _Sums(
            cost=_units(bucket.cost_usd),
            saved=_units(bucket.saved_usd),
            prompt=bucket.prompt_tokens,
            completion=bucket.completion_tokens,
            requests=bucket.requests,
            hits=bucket.cache_hits,
        )
        hit = bucket.cache_hits != 0 and bucket.cache_hits == bucket.requests
        self._add((bucket.user, bucket.provider, bucket.model, hit), bucket.hour_ms, sums)

    def _add(self, who: _Who, hour_ms: int, sums: _Sums) -> None:
        known = self.buckets.get((who, hour_ms))
        if known is None:
            self.buckets[(who, hour_ms)] = sums
        else:
            known.add(sums)

    def to_buckets(self) -> list[CostBucket]:
        """The buckets, for a day summary (amounts rounded to 10 decimal places, USD)."""
        return [
            CostBucket(
                user=who[0],
                provider=who[1],
                model=who[2],
                hour_ms=hour,
                cost_usd=_usd(s.cost),
                saved_usd=_usd(s.saved),
                prompt_tokens=s.prompt,
                completion_tokens=s.completion,
                requests=s.requests,
                cache_hits=s.hits,
            )
            for (who, hour), s in sorted(self.buckets.items(), key=lambda kv: (kv[0][1], str(kv[0][0])))
        ]


def open_windows_start(now: datetime, tz: ZoneInfo) -> datetime:
    """The start of the oldest budget window still open at ``now`` (the earlier of this week's and this month's)."""
    return min(window_start(w, now, tz) for w in WINDOWS)


def restored_cost_events(buckets: Iterable[CostBucket], now: datetime, tz: ZoneInfo) -> list[CostEvent]:
    """Cost events that give every budget window open at ``now`` the spend ``buckets`` hold.

    Buckets older than ``open_windows_start`` are left out. The rest are
    grouped per (user, provider, model, cache hit) and per piece of time
    between two consecutive boundaries among the open windows' starts and UTC
    midnights; each group becomes one event at its first bucket's hour (never
    before its piece's start), ``requests`` counting the events it stands
    for. A bucket is placed by its hour's start (exact for time zones whose
    offset is a whole number of hours). Ids are ``restored-`` and a digest of
    the group, so the same group restored twice has the same id.
    """
    oldest = open_windows_start(now, tz)
    starts = sorted({window_start(w, now, tz).astimezone(UTC) for w in WINDOWS})
    rollup = CostRollup()
    for bucket in buckets:
        rollup.add_bucket(bucket)
    groups: dict[tuple[_Who, int, str], tuple[int, _Sums]] = {}
    oldest_ms = int(oldest.timestamp() * 1000)
    for (who, hour_ms), sums in rollup.buckets.items():
        if hour_ms < oldest_ms:
            continue
        at = datetime.fromtimestamp(hour_ms / 1000, UTC)
        piece = sum(1 for s in starts if s <= at)
        key = (who, piece, at.date().isoformat())
        known = groups.get(key)
        if known is None:
            groups[key] = (hour_ms, _Sums())
            known = groups[key]
        first, total = known
        total.add(sums)
        groups[key] = (min(first, hour_ms), total)
    out: list[CostEvent] = []
    for (who, piece, day), (first_ms, s) in sorted(groups.items(), key=lambda kv: (kv[1][0], str(kv[0]))):
        user, provider, model, hit = who
        at = datetime.fromtimestamp(first_ms / 1000, UTC)
        if piece > 0:
            at = max(at, starts[piece - 1])
        cost = _usd(s.cost)
        usage = Usage(prompt_tokens=s.prompt, completion_tokens=s.completion, total_tokens=s.prompt + s.completion)
        digest = hashlib.sha256(
            repr((user, provider, model, hit, piece, day, str(s.cost), str(s.saved), s.requests)).encode()
        ).hexdigest()[:24]
        out.append(
            CostEvent(
                id=f"{RESTORED_ID_PREFIX}{digest}",
                user=user,
                provider=provider,
                model=model,
                usage=usage,
                cost_usd=cost,
                saved_usd=_usd(s.saved),
                cached=hit,
                at=at,
                lines=[] if hit or not cost else [CostLine(provider=provider, model=model, usage=usage, cost_usd=cost)],
                requests=s.requests,
            )
        )
    return out


def hour_of(timestamp_ms: int) -> int:
    """The start of the UTC hour holding ``timestamp_ms`` (Unix epoch ms)."""
    return timestamp_ms // _HOUR_MS * _HOUR_MS


def days_between(first: datetime, last: datetime) -> list[str]:
    """The UTC days (``YYYY-MM-DD``) from ``first`` to ``last``, both included."""
    day = first.astimezone(UTC).date()
    end = last.astimezone(UTC).date()
    out = []
    while day <= end:
        out.append(day.isoformat())
        day += timedelta(days=1)
    return out
