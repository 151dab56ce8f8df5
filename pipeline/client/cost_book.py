"""Cost reports folded from ``ai.costs`` and the budget events of ``ai.control`` (pure, no I/O).

``CostBook`` takes every ``CostEvent`` (counted once per request id, so a
duplicated event never counts twice) and the ``set_budget``/``budget_status``
events, and answers the manager's report methods (DESIGN A5). Every number
is explainable from ``ai.costs`` alone: costs, tokens and counts are sums of
its events; budget spend is the sum of the events whose own ``at`` falls in
the window (calendar windows in the book's time zone, weeks from Monday);
only a window's limit and its reserved amount come from ``ai.control``.

Amounts are summed as ``Decimal`` and returned as floats rounded to 10
decimal places (USD, DESIGN A4).

Projection method (``projection``): the spend rate is the scope's spend from
local midnight ``days - 1`` days ago until now, divided by the time elapsed
since that midnight (in days, so today's partial day counts as a fraction);
each window's projection is what it has spent so far plus that rate times
the time left until it resets. ``days=1`` is today's pace; ``days=30``
smooths over a month.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from cachetools import LRUCache
from msgspec import Struct, UnsetType

from schemas.events import BudgetStatus, ControlEvent, CostEvent, SetBudget
from stages.rules.ledger import WINDOWS, provider_shares, scopes_for, window_end, window_start

ZERO = Decimal(0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_S = Decimal(86_400)
#: How many request ids the book remembers to drop duplicated cost events.
SEEN_IDS_MAX = 500_000

PROJECTION_METHOD = (
    "rate = spend since local midnight (days-1) days ago / days elapsed since then; "
    "projected = spent in the window so far + rate x days left until the window resets"
)


def _usd(amount: Decimal) -> float:
    return float(round(amount, 10))


class CostSummary(Struct, kw_only=True):
    """One provider's totals (DESIGN A5): cost (USD), tokens, USD per token, requests, cache hits and savings.

    ``request_count``, ``total_tokens`` and ``total_cost_usd`` count calls the
    provider answered; cache hits are counted apart (``cache_hits``, with
    ``saved_usd`` what they would have cost).
    """

    total_cost_usd: float
    total_tokens: int
    average_cost_per_token_usd: float
    request_count: int
    cache_hits: int = 0
    saved_usd: float = 0.0


class WindowReport(Struct, kw_only=True):
    """One budget window: limit, spent, reserved (USD), spent as percent of the limit, and when it resets."""

    limit_usd: float | None
    spent_usd: float
    reserved_usd: float
    percentage: float | None
    resets_at: datetime


class BudgetReport(Struct, kw_only=True):
    """A scope's budget windows (``daily``, ``weekly``, ``monthly``) at ``at``."""

    scope: str
    daily: WindowReport
    weekly: WindowReport
    monthly: WindowReport
    at: datetime

    def window(self, name: str) -> WindowReport:
        """The window called ``name``.

        Raises:
            AttributeError: for an unknown window name.
        """
        report: WindowReport = getattr(self, name)
        return report


class CostProjection(Struct, kw_only=True):
    """Projected spend (USD) of a scope at the end of the current day, week and month (method: ``method``)."""

    scope: str
    days: int
    rate_usd_per_day: float
    daily: float
    weekly: float
    monthly: float
    at: datetime
    method: str = PROJECTION_METHOD


class ModelUsage(Struct, kw_only=True):
    """One provider model's usage: requests answered, cache hits, tokens and cost (USD)."""

    model: str
    provider: str
    request_count: int
    cache_hits: int
    total_tokens: int
    total_cost_usd: float


class UserUsage(Struct, kw_only=True):
    """One user's usage: requests answered, cache hits, tokens, cost and savings (USD)."""

    user: str
    request_count: int
    cache_hits: int
    total_tokens: int
    total_cost_usd: float
    saved_usd: float


class DailyCost(Struct, kw_only=True):
    """One calendar day (in the book's time zone): cost and savings (USD), requests, cache hits, tokens."""

    date: date
    total_cost_usd: float
    request_count: int
    cache_hits: int
    total_tokens: int
    saved_usd: float


@dataclass
class _Totals:
    cost: Decimal = ZERO
    tokens: int = 0
    requests: int = 0
    cache_hits: int = 0
    saved: Decimal = ZERO

    def add(self, event: CostEvent, cost: Decimal, saved: Decimal) -> None:
        if event.cached:
            self.cache_hits += event.requests
            self.saved += saved
        else:
            self.requests += event.requests
            self.cost += cost
            self.tokens += event.usage.total_tokens

    def add_line(self, cost: Decimal, tokens: int, *, request: int) -> None:
        """One cost line of an event (an attempt's share): its cost (USD), tokens, and ``request`` requests."""
        self.requests += request
        self.cost += cost
        self.tokens += tokens


class CostBook:
    """Folds cost and budget events into the report numbers (see the module docstring).

    Args:
        tz: time zone of the calendar windows and days (the budget gate's, ``budget.timezone``).
    """

    def __init__(self, tz: ZoneInfo | None = None) -> None:
        self.tz = tz or ZoneInfo("UTC")
        self._seen: LRUCache[str, bool] = LRUCache(maxsize=SEEN_IDS_MAX)
        self.providers: dict[str, _Totals] = defaultdict(_Totals)
        self.models: dict[tuple[str, str], _Totals] = defaultdict(_Totals)
        self.users: dict[str, _Totals] = defaultdict(_Totals)
        self.days: dict[date, _Totals] = defaultdict(_Totals)
        self.scope_days: dict[str, dict[date, Decimal]] = defaultdict(lambda: defaultdict(lambda: ZERO))
        self.limits: dict[str, tuple[datetime, dict[str, float | None]]] = {}
        self._limit_at: dict[tuple[str, str], datetime] = {}
        self.statuses: dict[str, BudgetStatus] = {}
        self.duplicates = 0
        self.events = 0

    # --- folding ---------------------------------------------------------------------------

    def add_cost(self, event: CostEvent) -> bool:
        """Count one cost event; ``False`` (nothing counted) for a request id already counted."""
        if event.id in self._seen:
            self.duplicates += 1
            return False
        self._seen[event.id] = True
        self.events += 1
        cost = Decimal(str(event.cost_usd))
        saved = Decimal(str(event.saved_usd))
        if event.lines and not event.cached:  # each attempt's provider and model gets its own line (A4, A9)
            last = len(event.lines) - 1
            for i, line in enumerate(event.lines):
                share, tokens = Decimal(str(line.cost_usd)), line.usage.total_tokens
                counted = event.requests if i == last else 0
                self.providers[line.provider].add_line(share, tokens, request=counted)
                self.models[(line.provider, line.model)].add_line(share, tokens, request=counted)
        else:
            self.providers[event.provider].add(event, cost, saved)
            self.models[(event.provider, event.model)].add(event, cost, saved)
        if event.user:
            self.users[event.user].add(event, cost, saved)
        day = event.at.astimezone(self.tz).date()
        self.days[day].add(event, cost, saved)
        if not event.cached and cost:
            for scope in scopes_for(event.user):
                self.scope_days[scope][day] += cost
            for provider, share in provider_shares(event):
                self.scope_days[provider][day] += share
        return True

    def add_control(self, event: ControlEvent) -> None:
        """Fold one control event: ``set_budget`` and ``budget_status`` set limits and reservations."""
        if isinstance(event, SetBudget):
            at = event.at or _EPOCH
            named = {"daily": event.daily_usd, "weekly": event.weekly_usd, "monthly": event.monthly_usd}
            self._set_limits(event.scope, at, {w: v for w, v in named.items() if not isinstance(v, UnsetType)})
        elif isinstance(event, BudgetStatus):
            known = self.statuses.get(event.scope)
            if known is None or event.at >= known.at:
                self.statuses[event.scope] = event
            self._set_limits(event.scope, event.at, {w: win.limit_usd for w, win in event.windows.items()})

    def _set_limits(self, scope: str, at: datetime, limits: dict[str, float | None]) -> None:
        """Merge ``limits`` into ``scope``'s, per window the latest ``at`` winning (DESIGN A6)."""
        known_at, known = self.limits.get(scope, (at, {}))
        merged = dict(known)
        for window, value in limits.items():
            seen = self._limit_at.get((scope, window))
            if seen is None or at >= seen:
                self._limit_at[(scope, window)] = at
                merged[window] = value
        self.limits[scope] = (max(at, known_at), merged)

    # --- reports ---------------------------------------------------------------------------

    def cost_summary(self) -> dict[str, CostSummary]:
        """Per provider: total cost (USD), tokens, average USD per token, requests, cache hits, savings."""
        out: dict[str, CostSummary] = {}
        for provider in sorted(self.providers):
            t = self.providers[provider]
            out[provider] = CostSummary(
                total_cost_usd=_usd(t.cost),
                total_tokens=t.tokens,
                average_cost_per_token_usd=float(round(t.cost / t.tokens, 14)) if t.tokens else 0.0,
                request_count=t.requests,
                cache_hits=t.cache_hits,
                saved_usd=_usd(t.saved),
            )
        return out

    def spent(self, scope: str, since: datetime, now: datetime) -> Decimal:
        """USD spent by ``scope`` on the local calendar days from ``since``'s day through ``now``'s day."""
        first = since.astimezone(self.tz).date()
        last = now.astimezone(self.tz).date()
        days = self.scope_days.get(scope, {})
        return sum((v for d, v in days.items() if first <= d <= last), ZERO)

    def budget_status(self, scope: str, now: datetime) -> BudgetReport:
        """Per window of ``scope`` at ``now``: limit, spent (from ``ai.costs``), reserved, percent, resets_at.

        ``reserved_usd`` is the gate's latest ``budget_status`` for the same
        window (0 when the gate has published none for it).
        """
        limits = self.limits.get(scope, (now, {}))[1]
        status = self.statuses.get(scope)
        windows: dict[str, WindowReport] = {}
        for window in WINDOWS:
            start = window_start(window, now, self.tz)
            resets_at = window_end(window, now, self.tz)
            spent = self.spent(scope, start, now)
            limit = limits.get(window)
            reserved = 0.0
            if status is not None and window in status.windows:
                published = status.windows[window]
                if published.resets_at == resets_at:
                    reserved = published.reserved_usd
            pct: float | None = None
            if limit is not None:
                pct = round(float(spent) * 100 / limit, 6) if limit > 0 else (100.0 if spent > 0 else 0.0)
            windows[window] = WindowReport(
                limit_usd=limit, spent_usd=_usd(spent), reserved_usd=reserved, percentage=pct, resets_at=resets_at
            )
        return BudgetReport(
            scope=scope, daily=windows["daily"], weekly=windows["weekly"], monthly=windows["monthly"], at=now
        )

    def projection(self, scope: str, days: int, now: datetime) -> CostProjection:
        """Projected spend of ``scope`` at the end of today, this week and this month (module docstring).

        Raises:
            ValueError: when ``days`` < 1.
        """
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        today_start = window_start("daily", now, self.tz)
        lookback_start = (today_start - timedelta(days=days - 1)).replace(tzinfo=None).replace(tzinfo=self.tz)
        elapsed_days = Decimal(str(max((now - lookback_start).total_seconds(), 1.0))) / _DAY_S
        rate = self.spent(scope, lookback_start, now) / elapsed_days
        projected: dict[str, float] = {}
        for window in WINDOWS:
            start = window_start(window, now, self.tz)
            left_days = Decimal(str(max((window_end(window, now, self.tz) - now).total_seconds(), 0.0))) / _DAY_S
            projected[window] = _usd(self.spent(scope, start, now) + rate * left_days)
        return CostProjection(
            scope=scope,
            days=days,
            rate_usd_per_day=_usd(rate),
            daily=projected["daily"],
            weekly=projected["weekly"],
            monthly=projected["monthly"],
            at=now,
        )

    def top_models(self, n: int) -> list[ModelUsage]:
        """The ``n`` provider models with the most requests (answered plus cache hits), then highest cost."""
        ranked = sorted(self.models.items(), key=lambda kv: (-(kv[1].requests + kv[1].cache_hits), -kv[1].cost, kv[0]))
        return [
            ModelUsage(
                model=model,
                provider=provider,
                request_count=t.requests,
                cache_hits=t.cache_hits,
                total_tokens=t.tokens,
                total_cost_usd=_usd(t.cost),
            )
            for (provider, model), t in ranked[: max(n, 0)]
        ]

    def top_users(self, n: int) -> list[UserUsage]:
        """The ``n`` users with the highest cost (then most requests); requests without a user are not listed."""
        ranked = sorted(self.users.items(), key=lambda kv: (-kv[1].cost, -kv[1].requests, kv[0]))
        return [
            UserUsage(
                user=user,
                request_count=t.requests,
                cache_hits=t.cache_hits,
                total_tokens=t.tokens,
                total_cost_usd=_usd(t.cost),
                saved_usd=_usd(t.saved),
            )
            for user, t in ranked[: max(n, 0)]
        ]

    def daily_costs(self, days: int, now: datetime) -> list[DailyCost]:
        """One entry per calendar day for the last ``days`` days (today included), oldest first, zeros included."""
        today = now.astimezone(self.tz).date()
        out: list[DailyCost] = []
        for back in range(max(days, 0) - 1, -1, -1):
            day = today - timedelta(days=back)
            t = self.days.get(day) or _Totals()
            out.append(
                DailyCost(
                    date=day,
                    total_cost_usd=_usd(t.cost),
                    request_count=t.requests,
                    cache_hits=t.cache_hits,
                    total_tokens=t.tokens,
                    saved_usd=_usd(t.saved),
                )
            )
        return out

    def budget_scopes(self) -> list[str]:
        """Scopes with a limit or a published status, ``global`` first."""
        scopes = set(self.limits) | set(self.statuses)
        return sorted(scopes, key=lambda s: (s != "global", s))


__all__ = [
    "PROJECTION_METHOD",
    "BudgetReport",
    "CostBook",
    "CostProjection",
    "CostSummary",
    "DailyCost",
    "ModelUsage",
    "UserUsage",
    "WindowReport",
]
