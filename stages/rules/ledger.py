"""Budget ledger: spend and reservations per scope and calendar window (pure, no I/O).

Scopes are ``global``, a provider name (``openai``) or ``user:NAME``.
Windows are ``daily``, ``weekly`` (weeks start Monday) and ``monthly``,
aligned to calendar boundaries in the ledger's time zone (default UTC).
Amounts are ``Decimal`` USD. A reservation holds a request's worst-case cost
until its ``CostEvent`` settles it or it is released or expires.

Spend is kept per (scope, window, window start), so a new window starts at
zero without a reset job, and spend replayed from ``ai.costs`` lands in the
window of the event's own time (``at``), never in the window of the replay.

Settled request ids are remembered in a ``stages.rules.recent_ids.RecentIds``
(a window of stream time and a count, both configured), so the ledger's memory
does not grow with traffic. A cost event for an id settled longer ago than that
counts again: spend is over-counted, never under-counted, so a budget then
refuses early rather than lets spend pass its limit; and the cost-recorder
writes one cost event per id within the same window (its read-back of
``ai.costs``), so such a repeat needs a record redelivered later than any
redelivery reaches.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from msgspec import UNSET

from schemas.events import CostEvent, SetBudget
from stages.rules.recent_ids import RecentIds

WINDOWS: tuple[str, ...] = ("daily", "weekly", "monthly")
#: Percentages of a window's limit whose first crossing raises a ``budget_alert`` (percent).
ALERT_THRESHOLDS: tuple[int, ...] = (50, 80, 100)
log = logging.getLogger("aipipe.budget")

#: How long Redis keeps a settled request id (``settled:<id>``, a key with this TTL): longer than
#: the longest window (a month), because every gate that starts replays ``ai.costs`` into the
#: shared state and must find each id already there. About 60 bytes of Redis memory per request.
SETTLED_RETENTION = timedelta(days=40)
ZERO = Decimal(0)
_HUNDRED = Decimal(100)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``UTC``, ``Asia/Tokyo``, ``Europe/Berlin``...).

    Raises:
        ValueError: when the name is not a known IANA time zone.
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as 'UTC' or 'Asia/Tokyo')") from exc


#: The last window computed per (window, zone): (start, end). Every request reserves and settles in the
#: current windows, so the same bounds are asked for many times a second; a hit skips the time-zone
#: arithmetic (``aipipe bench``: 12 ``window_start`` and 6 ``window_end`` calls per request).
_LAST_BOUNDS: dict[tuple[str, ZoneInfo], tuple[datetime, datetime]] = {}


def _bounds(window: str, at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """``(start, end)`` of the calendar ``window`` containing ``at`` (reusing the last one when it holds ``at``)."""
    aware = at.tzinfo is not None
    if aware:
        last = _LAST_BOUNDS.get((window, tz))
        if last is not None and last[0] <= at < last[1]:
            return last
    start = _window_start(window, at, tz)
    if window == "daily":
        nxt = start + timedelta(days=1)
    elif window == "weekly":
        nxt = start + timedelta(days=7)
    else:
        nxt = (start + timedelta(days=32)).replace(day=1)
    # Re-localise across DST changes: midnight of the next calendar day.
    bounds = (start, nxt.replace(tzinfo=None).replace(tzinfo=tz))
    if aware:
        _LAST_BOUNDS[(window, tz)] = bounds
    return bounds


def _window_start(window: str, at: datetime, tz: ZoneInfo) -> datetime:
    local = at.astimezone(tz)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "daily":
        start = day
    elif window == "weekly":
        start = day - timedelta(days=day.weekday())
    elif window == "monthly":
        start = day.replace(day=1)
    else:
        raise ValueError(f"unknown budget window {window!r}")
    # Re-localise: midnight of that calendar day, whatever the UTC offset is then (DST).
    return start.replace(tzinfo=None).replace(tzinfo=tz)


def window_start(window: str, at: datetime, tz: ZoneInfo) -> datetime:
    """Start of the calendar ``window`` containing ``at`` (aware), in ``tz``.

    Daily windows start at local midnight, weekly ones at Monday's local
    midnight, monthly ones at local midnight of the 1st.

    Raises:
        ValueError: for an unknown window name.
    """
    return _bounds(window, at, tz)[0]


def window_end(window: str, at: datetime, tz: ZoneInfo) -> datetime:
    """When the calendar ``window`` containing ``at`` resets (aware, in ``tz``): the next window's start.

    Raises:
        ValueError: for an unknown window name.
    """
    return _bounds(window, at, tz)[1]


def validate_scope(scope: str, providers: tuple[str, ...]) -> str:
    """Check a budget scope name: ``global``, ``user:NAME`` or one of ``providers``; returns it.

    Raises:
        ValueError: naming the accepted forms, for anything else.
    """
    if scope == "global" or scope in providers:
        return scope
    if scope.startswith("user:") and len(scope) > len("user:"):
        return scope
    known = ", ".join(providers)
    raise ValueError(f"unknown budget scope {scope!r}: use 'global', 'user:NAME' or a provider ({known})")


def is_provider_scope(scope: str) -> bool:
    """Whether ``scope`` names a provider (not ``global`` and not ``user:...``)."""
    return scope != "global" and not scope.startswith("user:")


@dataclass
class Reservation:
    """A request's held worst-case cost (USD) on some scopes, until ``expires_at``."""

    request_id: str
    scopes: tuple[str, ...]
    amount_usd: Decimal
    expires_at: datetime


@dataclass
class Limits:
    """A scope's limits per window (USD; ``None`` = unlimited)."""

    daily: Decimal | None = None
    weekly: Decimal | None = None
    monthly: Decimal | None = None

    def get(self, window: str) -> Decimal | None:
        """The limit of ``window`` (USD), ``None`` when unlimited."""
        value: Decimal | None = getattr(self, window)
        return value

    def any(self) -> bool:
        """Whether at least one window is limited."""
        return any(self.get(w) is not None for w in WINDOWS)


@dataclass
class Admission:
    """The gate's answer: admitted (with the reservation) or refused (scope and window that is full)."""

    admitted: bool
    scope: str | None = None
    window: str | None = None
    limit_usd: Decimal | None = None
    spent_usd: Decimal = ZERO
    reserved_usd: Decimal = ZERO


@dataclass(frozen=True)
class WindowState:
    """One window of one scope at a moment: limit, spent and reserved (USD) and when it resets."""

    limit_usd: Decimal | None
    spent_usd: Decimal
    reserved_usd: Decimal
    starts_at: datetime
    resets_at: datetime

    @property
    def percentage(self) -> Decimal | None:
        """Spent as a percentage of the limit (``None`` when unlimited; a zero limit spent counts 100)."""
        if self.limit_usd is None:
            return None
        if self.limit_usd == 0:
            return _HUNDRED if self.spent_usd > 0 else ZERO
        return self.spent_usd * _HUNDRED / self.limit_usd


@dataclass(frozen=True)
class AlertKey:
    """Identifies one alert: a scope's window (by its start) crossing a threshold (percent)."""

    scope: str
    window: str
    window_start: datetime
    threshold_pct: int

    def current(self, now: datetime, tz: ZoneInfo) -> bool:
        """Whether the alert's window has not ended at ``now`` (an ended one can never alert again)."""
        return window_end(self.window, self.window_start, tz) > now


def crossed_thresholds(state: WindowState, thresholds: tuple[int, ...] = ALERT_THRESHOLDS) -> list[int]:
    """The thresholds (percent) that ``state``'s spend has reached; empty when the window is unlimited.

    A zero limit is crossed by any spend (all thresholds at once).
    """
    pct = state.percentage
    if pct is None or state.spent_usd <= 0:
        return []
    return [t for t in thresholds if pct >= t]


@dataclass
class BudgetLedger:
    """Limits, spend and reservations for every scope (the in-process budget state).

    Spend is kept per (scope, window, window start), so a new window starts at
    zero without a reset job, and spend of past windows replayed from
    ``ai.costs`` lands in the right window by the event's own time.
    """

    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    limits: dict[str, Limits] = field(default_factory=dict)
    limit_at: dict[tuple[str, str], datetime] = field(default_factory=dict)
    spend: dict[tuple[str, str, datetime], Decimal] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    settled: RecentIds = field(default_factory=RecentIds)

    def set_limits(self, scope: str, limits: Limits) -> None:
        """Set ``scope``'s limits (replacing the previous ones)."""
        self.limits[scope] = limits

    def apply_command(self, scope: str, windows: Mapping[str, Decimal | None], at: datetime) -> bool:
        """Fold one ``set_budget`` command (DESIGN A6): each named window gets its limit (``None``: unlimited).

        Windows the command does not name keep their limits. Per (scope,
        window) the command with the latest ``at`` wins, so commands read out
        of order (a replay, two writers) fold to the same limits.

        Returns:
            Whether any limit changed.
        """
        current = self.limits.get(scope, Limits())
        values = {w: current.get(w) for w in WINDOWS}
        changed = False
        for window, limit in windows.items():
            known = self.limit_at.get((scope, window))
            if known is not None and at < known:
                continue  # an older command arriving late
            self.limit_at[(scope, window)] = at
            if values[window] != limit:
                values[window] = limit
                changed = True
        if changed or scope not in self.limits:
            self.limits[scope] = Limits(**values)
        return changed

    def spent(self, scope: str, window: str, at: datetime) -> Decimal:
        """USD spent by ``scope`` in the ``window`` containing ``at``."""
        return self.spend.get((scope, window, window_start(window, at, self.tz)), ZERO)

    def reserved(self, scope: str, at: datetime) -> Decimal:
        """USD held by unexpired reservations on ``scope``."""
        return sum(
            (r.amount_usd for r in self.reservations.values() if scope in r.scopes and r.expires_at > at),
            ZERO,
        )

    def window_state(self, scope: str, window: str, at: datetime) -> WindowState:
        """Limit, spend and reservations of ``scope`` in the ``window`` containing ``at``."""
        limits = self.limits.get(scope, Limits())
        return WindowState(
            limit_usd=limits.get(window),
            spent_usd=self.spent(scope, window, at),
            reserved_usd=self.reserved(scope, at),
            starts_at=window_start(window, at, self.tz),
            resets_at=window_end(window, at, self.tz),
        )

    def status(self, scope: str, at: datetime) -> dict[str, WindowState]:
        """Every window of ``scope`` at ``at`` (``daily``, ``weekly``, ``monthly``)."""
        return {w: self.window_state(scope, w, at) for w in WINDOWS}

    def expire(self, at: datetime) -> list[Reservation]:
        """Drop the reservations whose deadline has passed; returns them."""
        gone = [r for r in self.reservations.values() if r.expires_at <= at]
        for r in gone:
            del self.reservations[r.request_id]
        return gone

    def check(self, scopes: tuple[str, ...], amount_usd: Decimal, at: datetime) -> Admission:
        """Whether ``amount_usd`` more fits every limited window of every scope (no change made)."""
        for scope in scopes:
            limits = self.limits.get(scope)
            if limits is None:
                continue
            reserved = self.reserved(scope, at)
            for window in WINDOWS:
                limit = limits.get(window)
                if limit is None:
                    continue
                spent = self.spent(scope, window, at)
                if spent + reserved + amount_usd > limit:
                    return Admission(False, scope, window, limit, spent, reserved)
        return Admission(True)

    def reserve(
        self, request_id: str, scopes: tuple[str, ...], amount_usd: Decimal, at: datetime, expires_at: datetime
    ) -> Admission:
        """Admit and hold ``amount_usd`` on ``scopes``, or refuse; idempotent per request id.

        A request id that already holds a reservation or was settled is
        admitted again without a second hold (a redelivered message).
        """
        if request_id in self.reservations or request_id in self.settled:
            return Admission(True)
        self.expire(at)
        verdict = self.check(scopes, amount_usd, at)
        if verdict.admitted:
            self.reservations[request_id] = Reservation(request_id, scopes, amount_usd, expires_at)
        return verdict

    def settle(
        self, request_id: str, scopes: tuple[str, ...], cost_usd: Decimal, at: datetime, *, now: datetime | None = None
    ) -> bool:
        """Record a request's real cost on ``scopes`` at time ``at`` and drop its reservation.

        With ``now``, windows that ended before ``now`` are skipped (a replay of
        old events adds nothing that can matter). Returns ``False`` (and changes
        nothing) when that id was settled within the memory of ``settled``.
        """
        if request_id in self.settled:
            return False
        self.reservations.pop(request_id, None)
        self.settled.add(request_id, at.timestamp())
        for scope in scopes:
            for window in WINDOWS:
                start = window_start(window, at, self.tz)
                if now is not None and window_end(window, at, self.tz) <= now:
                    continue
                key = (scope, window, start)
                self.spend[key] = self.spend.get(key, ZERO) + cost_usd
        return True

    def release(self, request_id: str) -> bool:
        """Drop a reservation without spend (rejections, failures); ``False`` if none was held."""
        return self.reservations.pop(request_id, None) is not None

    def prune(self, now: datetime) -> int:
        """Forget the spend of windows that ended before ``now`` (settled ids expire by themselves).

        Returns how many entries were dropped; keeps memory bounded in a long-running gate.
        """
        dropped = 0
        for key in [k for k in self.spend if window_end(k[1], k[2], self.tz) <= now]:
            del self.spend[key]
            dropped += 1
        return dropped


def scopes_for(user: str | None, provider: str | None = None) -> tuple[str, ...]:
    """The budget scopes a request or cost counts toward: global, its user, its provider."""
    scopes = ["global"]
    if user:
        scopes.append(f"user:{user}")
    if provider:
        scopes.append(provider)
    return tuple(scopes)


def apply_set_budget(ledger: BudgetLedger, event: SetBudget, now: datetime) -> bool:
    """Fold a ``set_budget`` command into ``ledger`` (DESIGN A6: absent window unchanged, ``null`` unlimited).

    A command with a negative or non-finite limit is ignored with a warning.

    Returns:
        Whether a limit changed.
    """
    named = {
        window: value
        for window, value in (("daily", event.daily_usd), ("weekly", event.weekly_usd), ("monthly", event.monthly_usd))
        if value is not UNSET
    }
    if any(v is not None and not 0 <= v < float("inf") for v in named.values()):  # type: ignore[operator]
        log.warning("ignoring set_budget for %s: limits must be finite and >= 0 USD, got %s", event.scope, named)
        return False
    windows = {w: Decimal(str(v)) if v is not None else None for w, v in named.items()}  # type: ignore[arg-type]
    return ledger.apply_command(event.scope, windows, event.at or now)


def provider_hold_id(request_id: str, provider: str) -> str:
    """The key under which a request's spend on ``provider``'s budget scope is held and settled.

    The executor holds and settles each attempt under it; the budget gate
    settles the request's cost event under it too, so the provider's spend is
    counted once whoever sees it first.
    """
    return f"{request_id}@{provider}"


def provider_shares(event: CostEvent) -> list[tuple[str, Decimal]]:
    """Each provider's share of a cost event (USD): from its ``lines`` when it has them, else all to ``provider``.

    An answer begun by one provider and continued by another (DESIGN A9)
    counts toward each provider's budget with its own line.
    """
    if not event.lines:
        return [(event.provider, Decimal(str(event.cost_usd)))]
    shares: dict[str, Decimal] = {}
    for line in event.lines:
        shares[line.provider] = shares.get(line.provider, Decimal(0)) + Decimal(str(line.cost_usd))
    return list(shares.items())
