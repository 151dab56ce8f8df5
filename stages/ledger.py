"""Budget ledger: spend and reservations per scope and calendar window (pure, no I/O).

Scopes are ``global``, a provider name (``openai``) or ``user:NAME``.
Windows are ``daily``, ``weekly`` (weeks start Monday) and ``monthly``,
aligned to calendar boundaries in the ledger's time zone (default UTC).
Amounts are ``Decimal`` USD. A reservation holds a request's worst-case cost
until its ``CostEvent`` settles it or it is released or expires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

WINDOWS: tuple[str, ...] = ("daily", "weekly", "monthly")
ZERO = Decimal(0)


def window_start(window: str, at: datetime, tz: ZoneInfo) -> datetime:
    """Start of the calendar ``window`` containing ``at`` (aware), in ``tz``.

    Raises:
        ValueError: for an unknown window name.
    """
    local = at.astimezone(tz)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "daily":
        return day
    if window == "weekly":
        return day - timedelta(days=day.weekday())
    if window == "monthly":
        return day.replace(day=1)
    raise ValueError(f"unknown budget window {window!r}")


def window_end(window: str, at: datetime, tz: ZoneInfo) -> datetime:
    """When the calendar ``window`` containing ``at`` resets (aware, in ``tz``)."""
    start = window_start(window, at, tz)
    if window == "daily":
        nxt = start + timedelta(days=1)
    elif window == "weekly":
        nxt = start + timedelta(days=7)
    else:
        nxt = (start + timedelta(days=32)).replace(day=1)
    # Re-localise across DST changes: midnight of the next calendar day.
    return nxt.replace(tzinfo=None).replace(tzinfo=tz)


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
        """The limit of ``window``."""
        value: Decimal | None = getattr(self, window)
        return value


@dataclass
class Admission:
    """The gate's answer: admitted (with the reservation) or refused (scope and window that is full)."""

    admitted: bool
    scope: str | None = None
    window: str | None = None
    limit_usd: Decimal | None = None
    spent_usd: Decimal = ZERO
    reserved_usd: Decimal = ZERO


@dataclass
class BudgetLedger:
    """Limits, spend and reservations for every scope.

    Spend is kept per (scope, window, window start), so a new window starts at
    zero without a reset job, and spend of past windows replayed from
    ``ai.costs`` lands in the right window by the event's own time.
    """

    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))
    limits: dict[str, Limits] = field(default_factory=dict)
    spend: dict[tuple[str, str, datetime], Decimal] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)

    def set_limits(self, scope: str, limits: Limits) -> None:
        """Set ``scope``'s limits (replacing the previous ones)."""
        self.limits[scope] = limits

    def spent(self, scope: str, window: str, at: datetime) -> Decimal:
        """USD spent by ``scope`` in the ``window`` containing ``at``."""
        return self.spend.get((scope, window, window_start(window, at, self.tz)), ZERO)

    def reserved(self, scope: str, at: datetime) -> Decimal:
        """USD held by unexpired reservations on ``scope``."""
        return sum(
            (r.amount_usd for r in self.reservations.values() if scope in r.scopes and r.expires_at > at),
            ZERO,
        )

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
        """Admit and hold ``amount_usd`` on ``scopes``, or refuse; idempotent per request id."""
        if request_id in self.reservations or request_id in self.settled:
            return Admission(True)
        self.expire(at)
        verdict = self.check(scopes, amount_usd, at)
        if verdict.admitted:
            self.reservations[request_id] = Reservation(request_id, scopes, amount_usd, expires_at)
        return verdict

    def settle(self, request_id: str, scopes: tuple[str, ...], cost_usd: Decimal, at: datetime) -> bool:
        """Record a request's real cost on ``scopes`` at time ``at`` and drop its reservation.

        Returns ``False`` (and changes nothing) when that id was already settled.
        """
        if request_id in self.settled:
            return False
        self.settled.add(request_id)
        self.reservations.pop(request_id, None)
        for scope in scopes:
            for window in WINDOWS:
                key = (scope, window, window_start(window, at, self.tz))
                self.spend[key] = self.spend.get(key, ZERO) + cost_usd
        return True

    def release(self, request_id: str) -> bool:
        """Drop a reservation without spend (rejections, failures); ``False`` if none was held."""
        return self.reservations.pop(request_id, None) is not None


def scopes_for(user: str | None, provider: str | None = None) -> tuple[str, ...]:
    """The budget scopes a request or cost counts toward: global, its user, its provider."""
    scopes = ["global"]
    if user:
        scopes.append(f"user:{user}")
    if provider:
        scopes.append(provider)
    return tuple(scopes)
