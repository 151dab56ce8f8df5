"""Events on ``ai.control``, ``ai.costs`` and ``ai.deadletter`` (DESIGN A3).

Control events are a tagged union on the ``type`` field; times are ``at``, an
RFC 3339 UTC timestamp (msgspec encodes an aware ``datetime`` that way).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from msgspec import UNSET, Struct, UnsetType

from schemas.response import Usage

CircuitState = Literal["CLOSED", "OPEN", "HALF_OPEN"]


class Health(Struct, tag="health", tag_field="type", kw_only=True):
    """Outcome of one provider call (``source`` ``attempt``) or probe (``probe``); latency in ms.

    ``usage`` (tokens) and ``cost_usd`` (USD, at the price table) are what an
    attempt that returned usage will be billed by its provider, published as
    the call ends (DESIGN A11): a call made again after a redelivery has its
    own event, so an audit can set the calls providers invoice against the
    requests answered. ``None`` for failed calls and probes.
    """

    provider: str
    model: str
    ok: bool
    error_type: str | None = None
    status_code: int | None = None
    latency_ms: float = 0.0
    source: Literal["attempt", "probe"] = "attempt"
    request_id: str | None = None
    retry_after_s: float | None = None
    at: datetime
    usage: Usage | None = None
    cost_usd: float | None = None


class CircuitTransition(Struct, tag="circuit_transition", tag_field="type", kw_only=True):
    """A circuit breaker changed state; ``cool_off_s`` is the OPEN time before HALF_OPEN (s)."""

    provider: str
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    cool_off_s: float | None = None
    at: datetime


class CircuitSnapshot(Struct, tag="circuit_snapshot", tag_field="type", kw_only=True):
    """Every provider's circuit state at ``at``, published periodically by the breaker."""

    states: dict[str, CircuitState]
    at: datetime


class BudgetAlert(Struct, tag="budget_alert", tag_field="type", kw_only=True):
    """A budget scope crossed ``threshold_pct`` percent of a window's limit (USD)."""

    scope: str
    window: Literal["daily", "weekly", "monthly"]
    threshold_pct: int
    spent_usd: float
    limit_usd: float
    at: datetime


class BudgetWindow(Struct, kw_only=True):
    """One budget window: limit, spent and reserved (USD), and when it resets."""

    limit_usd: float | None
    spent_usd: float
    reserved_usd: float
    resets_at: datetime


class BudgetStatus(Struct, tag="budget_status", tag_field="type", kw_only=True):
    """A budget scope's windows (``daily``/``weekly``/``monthly``) at ``at``."""

    scope: str
    windows: dict[str, BudgetWindow]
    at: datetime


class CacheStats(Struct, tag="cache_stats", tag_field="type", kw_only=True):
    """Response cache counters of one cache-lookup replica; ``bytes`` is stored value size.

    ``store`` is ``memory`` (this replica's own) or ``redis`` (shared: the same
    entries, bytes and evictions for every replica); ``in_reply_to`` is the
    ``request_id`` of the ``cache_stats_request``/``cache_clear`` it answers
    (``None`` for the periodic ones).
    """

    hits: int
    misses: int
    entries: int
    evictions: int
    bytes: int
    replica: str | None = None
    store: Literal["memory", "redis"] | None = None
    in_reply_to: str | None = None
    at: datetime


class ReservationRelease(Struct, tag="reservation_release", tag_field="type", kw_only=True):
    """The recorder releases a budget reservation (USD) of an outcome that has no cost event."""

    request_id: str
    scope: str
    amount_usd: float
    at: datetime


class SetStrategy(Struct, tag="set_strategy", tag_field="type", kw_only=True):
    """Command: switch every router replica to a load-balancing strategy."""

    name: str
    weights: dict[str, float] | None = None
    at: datetime | None = None


class SetBudget(Struct, tag="set_budget", tag_field="type", kw_only=True):
    """Command: change a budget scope's limits (USD) (DESIGN A6).

    A window left out of the event (``UNSET``, absent in JSON) keeps its
    current limit; ``null`` (``None``) removes its limit; a number sets it.
    Readers fold the commands per scope and window, the latest ``at`` winning.
    """

    scope: str
    daily_usd: float | UnsetType | None = UNSET
    weekly_usd: float | UnsetType | None = UNSET
    monthly_usd: float | UnsetType | None = UNSET
    at: datetime | None = None


class CacheClear(Struct, tag="cache_clear", tag_field="type", kw_only=True):
    """Command: every cache replica empties its store (and answers with a ``cache_stats``).

    A replica ignores a command whose ``at`` is older than its own start, so a
    restart never replays an old clear; ``request_id`` lets the sender find its command.
    """

    request_id: str | None = None
    at: datetime | None = None


class CacheStatsRequest(Struct, tag="cache_stats_request", tag_field="type", kw_only=True):
    """Command: every cache replica publishes its ``cache_stats`` now (on demand, besides periodically)."""

    request_id: str | None = None
    at: datetime | None = None


class CancelRequest(Struct, tag="cancel_request", tag_field="type", kw_only=True):
    """Command: the reader of a streamed request went away; the executor holding it stops the call (DESIGN A9)."""

    request_id: str
    at: datetime | None = None


ControlEvent = (
    Health
    | CircuitTransition
    | CircuitSnapshot
    | BudgetAlert
    | BudgetStatus
    | CacheStats
    | ReservationRelease
    | SetStrategy
    | SetBudget
    | CacheClear
    | CacheStatsRequest
    | CancelRequest
)


class CostLine(Struct, kw_only=True):
    """One attempt's share of a request's cost: its provider, model, usage (tokens) and cost (USD)."""

    provider: str
    model: str
    usage: Usage
    cost_usd: float
    usage_source: Literal["provider", "estimated"] = "provider"


class CostEvent(Struct, kw_only=True):
    """What one request cost (USD, 10 decimal places), written once per id.

    Written for every ``status: ok`` answer and for any other outcome that
    generated billable tokens (an interrupted or cancelled stream, answers that
    broke the response format; ``status`` names the outcome). ``lines`` holds one entry per attempt that cost
    something, so an answer begun by one provider and continued by another
    charges each its own share; ``provider`` is the one that answered last and
    ``usage``/``cost_usd`` are the totals.

    ``saved_usd`` is what a cache hit would have cost; ``price_source`` is
    ``table`` (the price table), ``deployment`` (the deployment's own
    ``prices``) or ``default`` (its ``cost_per_token``); ``usage_source`` is
    ``estimated`` when the provider reported no usage and the tokens were
    counted (an ``openai_compatible`` server that sends none).

    ``requests`` is how many requests the event stands for: 1, except for the
    roll-ups a restore writes (ids ``restored-...``, DESIGN A11), which sum
    the spend of many older requests per user, provider and model.
    """

    id: str
    user: str | None
    provider: str
    model: str
    usage: Usage
    cost_usd: float
    saved_usd: float = 0.0
    cached: bool = False
    price_source: Literal["table", "deployment", "default", "none"] = "table"
    usage_source: Literal["provider", "estimated"] = "provider"
    at: datetime
    lines: list[CostLine] = []
    status: Literal["ok", "stream_interrupted", "cancelled", "invalid_response"] = "ok"
    requests: int = 1


class DeadLetter(Struct, kw_only=True):
    """A value no stage could decode or validate (or an output no broker took), kept with its origin.

    ``raw`` is base64 in JSON; when the whole value would not fit one message
    it is cut (``truncated``), and ``raw_size`` (bytes) and ``raw_sha256``
    (hex) describe the whole original. ``partition`` and ``offset`` are -1 for
    an output that was never published. ``key`` is the record's key as text;
    when those bytes are not UTF-8, ``raw_key`` holds them exactly (base64 in JSON).
    """

    source_topic: str
    partition: int
    offset: int
    key: str | None
    reason: str
    stage: str
    raw: bytes
    raw_size: int | None = None
    raw_sha256: str | None = None
    truncated: bool = False
    at: datetime
    raw_key: bytes | None = None
