"""budget-gate: refuse requests whose budget is spent; reserve the worst case of the rest.

Input ``ai.stage.budget`` (envelope). Admitted requests go to
``ai.stage.route`` with ``reserved_usd`` (the worst-case cost, USD: estimated
prompt tokens and ``max_tokens`` at the most expensive provider serving the
model) held on their ``global`` and ``user:NAME`` scopes; refused ones go to
the recorder with ``budget_exceeded``. Provider budgets are enforced by the
executor, which holds each attempt's worst case on the provider's scope
(``stages.executor.budgets``); the gate folds their limits and spend into the
same store and publishes their ``budget_status``.

The gate learns spend from ``ai.costs`` (``on_cost``: settles the
reservation with the real cost, once per request id) and limits and
releases from ``ai.control`` (``on_control``: ``set_budget``,
``reservation_release``, and the ``budget_alert`` events already raised).
State lives in a ``pipeline.stores.budget_store.BudgetStore``: in process, or in
Redis so several gate replicas share reservations and spend.

Its background task (run by the pipeline beside the runner) applies those
events in order, expires reservations at their deadline, and publishes on
``ai.control``: ``budget_status`` for each limited scope (and ``global``) on
change (at most every ``status_min_interval_s``) and every
``status_interval_s``, and a ``budget_alert`` the first time a scope's spend
reaches 50, 80 and 100 % of a window (once per threshold per window, across
replicas and restarts).

Start-up: after a restart the in-process spend is rebuilt by replaying
``ai.costs`` from the beginning (each event lands in the window of its own
``at``), so the gate admits nothing until its cost and control feeds have
caught up (or ``sync_timeout_s`` passed, with a warning).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio
import msgspec

from pipeline.bus.topics import Topics
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.messages import ENVELOPE_DECODER, error_envelope, to_record
from pipeline.runtime.runner import Emit, MessageContext, decode_or_invalid, now_utc
from pipeline.stores.budget_store import BudgetStore, BudgetStoreError, MemoryBudgetStore
from schemas.envelope import Envelope
from schemas.events import (
    BudgetAlert,
    BudgetStatus,
    BudgetWindow,
    ControlEvent,
    CostEvent,
    ReservationRelease,
    SetBudget,
)
from schemas.response import ErrorInfo
from stages.rules.ledger import (
    WINDOWS,
    AlertKey,
    BudgetLedger,
    Limits,
    WindowState,
    apply_set_budget,
    crossed_thresholds,
    is_provider_scope,
    provider_hold_id,
    provider_shares,
    scopes_for,
    window_start,
    zone,
)
from stages.rules.pricing import PriceTable, worst_case_cost
from stages.rules.routing import resolve, serving_providers
from stages.rules.tokens import estimate_messages_tokens, prompt_messages

log = logging.getLogger("aipipe.budget")

#: The prompt-token estimate is multiplied by this before pricing a reservation: the estimate's
#: measured range is 0.48x-1.75x of the real count (``stages.rules.tokens``), so doubling it
#: covers the under-counts seen on real prompts.
PROMPT_ESTIMATE_MARGIN = 2
#: A reservation is held this long past the request's deadline, so a cost that is recorded just
#: after the deadline still finds it (s).
RESERVATION_GRACE_S = 5.0


def _dec(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _float(value: Decimal | None) -> float | None:
    return None if value is None else float(value)


class BudgetGateStage:
    """Admits requests within every budget window of their scopes (``global``, ``user:NAME``).

    Args:
        topics: topic names.
        config: pipeline configuration (providers, model groups, ``budget.timezone``,
            ``budget.global_daily_usd``).
        prices: the price table used for worst-case reservations.
        ledger: the in-process ledger (limits and time zone; the whole state without Redis).
        store: where spend and reservations live (default: in process, over ``ledger``).
        status_interval_s: period of the full ``budget_status`` publication (s).
        status_min_interval_s: least time between two ``budget_status`` of one scope (s).
        sync_timeout_s: longest wait for the feeds to catch up at start before admitting anyway (s).
        clock: the current time (aware UTC); tests pass a fixed clock.

    Raises:
        ValueError: when ``config.budget.timezone`` is not an IANA time zone.
    """

    name = "budget"

    def __init__(
        self,
        topics: Topics,
        config: PipelineConfig,
        prices: PriceTable,
        ledger: BudgetLedger,
        *,
        store: BudgetStore | None = None,
        status_interval_s: float = 30.0,
        status_min_interval_s: float = 0.25,
        sync_timeout_s: float = 30.0,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.topics = topics
        self.config = config
        self.prices = prices
        self.store: BudgetStore = store if store is not None else MemoryBudgetStore(ledger)
        self.ledger = self.store.ledger
        self.ledger.tz = zone(config.budget.timezone)
        self.input_topic = topics.stage_budget
        self.status_interval_s = status_interval_s
        self.status_min_interval_s = status_min_interval_s
        self.sync_timeout_s = sync_timeout_s
        self.clock = clock
        if config.budget.global_daily_usd is not None:
            self.ledger.set_limits("global", Limits(daily=_dec(config.budget.global_daily_usd)))
        self._pending: deque[CostEvent | ControlEvent] = deque()
        self._wake = anyio.Event()
        self._dirty: set[str] = {"global", *self.ledger.limits}
        self._alerted: set[AlertKey] = set()
        self._last_status: dict[str, float] = {}
        self._feeds: list[anyio.Event] = []
        self.ready = anyio.Event()
        self.started_at = time.monotonic()

    # --- wiring ----------------------------------------------------------------------------

    def follow(self, *caught_up: anyio.Event) -> None:
        """Admit nothing until each of these events is set (the cost and control feeds caught up)."""
        self._feeds.extend(caught_up)

    async def aclose(self) -> None:
        """Close the store's connections."""
        await self.store.aclose()

    # --- the decision ----------------------------------------------------------------------

    def decode(self, raw: bytes) -> Envelope:
        """Decode an envelope.

        Raises:
            InvalidInput: when the value is not an envelope.
        """
        envelope: Envelope = decode_or_invalid(ENVELOPE_DECODER, raw)
        return envelope

    def worst_case_usd(self, envelope: Envelope) -> Decimal:
        """Worst-case cost (USD) of the request at the dearest of its candidates (``stages.rules.routing.resolve``).

        Prompt tokens are estimated (``stages.rules.tokens``) times
        ``PROMPT_ESTIMATE_MARGIN``; completion tokens are ``max_tokens``. A
        listed model is priced with ``stages.rules.pricing.worst_case_cost`` (prompt
        at the dearer of input and cache-write), an unlisted one at its
        provider's ``cost_per_token``.
        """
        request = envelope.request
        if request is None:
            return Decimal(0)
        prompt_tokens = estimate_messages_tokens(prompt_messages(request)) * PROMPT_ESTIMATE_MARGIN
        worst = Decimal(0)
        candidates = resolve(self.config, request).candidates or serving_providers(self.config, request.model)
        for cand in candidates:
            price = self.prices.lookup(cand.provider, cand.model)
            if price is not None:
                cost = worst_case_cost(price, prompt_tokens, request.max_tokens)
            else:
                rate = Decimal(str(self.config.providers[cand.provider].cost_per_token))
                cost = rate * (prompt_tokens + request.max_tokens)
            worst = max(worst, cost)
        return worst

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Reserve and pass on, or refuse with ``budget_exceeded``."""
        envelope: Envelope = value
        if envelope.request is None:
            return [to_record(self.topics.stage_record, envelope)]
        await self._wait_ready()
        if resolve(self.config, envelope.request).error_type is not None:
            # no candidate can take it (unknown model, max_tokens beyond every limit): the router answers
            # with that error; holding its (possibly huge) worst case would wrongly say budget_exceeded
            return [Emit(self.topics.stage_route, envelope.id, envelope)]
        scopes = scopes_for(envelope.request.user)
        amount = self.worst_case_usd(envelope)
        now = self.clock()
        expires = datetime.fromtimestamp(envelope.deadline_at_ms / 1000 + RESERVATION_GRACE_S, now.tzinfo)
        try:
            verdict = await self.store.reserve(envelope.id, scopes, amount, now, expires)
        except BudgetStoreError as exc:
            limited = [s for s in scopes if (lim := self.ledger.limits.get(s)) is not None and lim.any()]
            if not limited or self.config.budget.fail_mode == "open":
                log.warning("request %s admitted unreserved while the budget store is down (%s)", envelope.id, exc)
                return [Emit(self.topics.stage_route, envelope.id, envelope)]
            log.error(
                "request %s refused: budget store down (%s); scopes %s fail closed",
                envelope.id,
                exc,
                ", ".join(limited),
            )
            error = ErrorInfo(
                type="service_unavailable",
                message=f"budget store unavailable; scope {', '.join(limited)} fails closed until it is back",
            )
            return [to_record(self.topics.stage_record, error_envelope(envelope.id, error, template=envelope))]
        self._touch(scopes)
        if not verdict.admitted:
            message = (
                f"budget exceeded: scope {verdict.scope} {verdict.window} limit ${verdict.limit_usd} "
                f"(spent ${verdict.spent_usd:.6f}, reserved ${verdict.reserved_usd:.6f}, "
                f"this request up to ${amount:.6f})"
            )
            error = ErrorInfo(type="budget_exceeded", message=message)
            return [to_record(self.topics.stage_record, error_envelope(envelope.id, error, template=envelope))]
        routed = msgspec.structs.replace(envelope, reserved_usd=float(amount), reservation_scopes=list(scopes))
        return [Emit(self.topics.stage_route, envelope.id, routed)]

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """An error outcome for ``request_id`` to the recorder."""
        return [to_record(self.topics.stage_record, error_envelope(request_id, error))]

    async def _wait_ready(self) -> None:
        if self.ready.is_set():
            return
        if not self._feeds:  # nothing to replay (a gate fed by hand, as in unit tests)
            self.ready.set()
            return
        with anyio.move_on_after(self.sync_timeout_s) as scope:
            await self.ready.wait()
        if scope.cancelled_caught and not self.ready.is_set():
            log.warning(
                "budget gate: feeds did not catch up within %.0fs; admitting with the spend known so far",
                self.sync_timeout_s,
            )
            self.ready.set()

    # --- feeds (called by the broadcast readers; applied in order by the background task) --

    def on_cost(self, event: CostEvent) -> None:
        """Queue a cost event: its cost settles the reservation and counts toward its scopes' windows."""
        self._pending.append(event)
        self._wake.set()

    def on_control(self, event: ControlEvent) -> None:
        """Apply ``set_budget`` now; queue ``reservation_release``; remember ``budget_alert`` already raised."""
        if isinstance(event, SetBudget):
            self._apply_limits(event)
        elif isinstance(event, ReservationRelease):
            self._pending.append(event)
            self._wake.set()
        elif isinstance(event, BudgetAlert):
            start = window_start(event.window, event.at, self.ledger.tz)
            self._alerted.add(AlertKey(event.scope, event.window, start, event.threshold_pct))

    def _apply_limits(self, event: SetBudget) -> None:
        # a status is published for every command, changed or not: it is the command's acknowledgement
        # (``aipipe budget set`` waits for it, also when the limit was already that)
        self._touch((event.scope,))
        if apply_set_budget(self.ledger, event, self.clock()):
            limits = self.ledger.limits[event.scope]
            log.info(
                "budget for %s set: daily=%s weekly=%s monthly=%s",
                event.scope,
                limits.daily,
                limits.weekly,
                limits.monthly,
            )

    def _touch(self, scopes: Sequence[str]) -> None:
        self._dirty.update(scopes)
        self._wake.set()

    async def apply_pending(self) -> int:
        """Apply the queued cost and release events in arrival order; returns how many were applied.

        An event the store cannot take now (Redis down) stays queued and is retried.

        Raises:
            BudgetStoreError: when the store fails; the failed event stays first in the queue.
        """
        applied = 0
        while self._pending:
            event = self._pending[0]
            try:
                await self._apply(event)
            except BudgetStoreError:
                raise
            except Exception:  # a bad event must not block the ones behind it
                log.exception("budget gate: dropping an event it cannot apply: %r", event)
            self._pending.popleft()
            applied += 1
        return applied

    async def _apply(self, event: CostEvent | ControlEvent) -> None:
        if isinstance(event, CostEvent):
            if event.cached:
                await self.store.release(event.id)
                self._touch(scopes_for(event.user))
            else:
                cost = Decimal(str(event.cost_usd))
                scopes = scopes_for(event.user)
                await self.store.settle(event.id, scopes, cost, event.at, self.clock())
                # each provider's scope under the key the executor settles it with: counted once
                shares = provider_shares(event)
                for provider, share in shares:
                    hold_id = provider_hold_id(event.id, provider)
                    await self.store.settle(hold_id, (provider,), share, event.at, self.clock())
                self._touch((*scopes, *(p for p, _ in shares)))
        elif isinstance(event, ReservationRelease):
            await self.store.release(event.request_id)
            self._touch(tuple(s for s in event.scope.split(",") if s))

    # --- background: apply, expire, publish -----------------------------------------------

    def _feeds_caught_up(self) -> bool:
        return all(e.is_set() for e in self._feeds)

    def _published_scopes(self) -> set[str]:
        return {"global"} | {s for s, lim in self.ledger.limits.items() if lim.any() or s in self._last_status}

    async def background(self, publish: Callable[[Emit], Awaitable[None]]) -> None:
        """Apply feed events, expire reservations, publish ``budget_status`` and ``budget_alert`` until cancelled."""
        next_full = 0.0
        next_expire = 0.0
        delay = 0.1
        while True:
            with anyio.move_on_after(self.status_min_interval_s):
                await self._wake.wait()
            self._wake = anyio.Event()
            try:
                replayed = self._feeds_caught_up()  # then what is queued now holds the whole replay
                await self.apply_pending()
                now = self.clock()
                mono = time.monotonic()
                if mono >= next_expire:
                    self._dirty.update(await self.store.expire(now))
                    self._alerted = {k for k in self._alerted if k.current(now, self.ledger.tz)}
                    next_expire = mono + 1.0
                if not self.ready.is_set():
                    if not replayed:
                        continue
                    self.ready.set()
                    log.info("budget gate ready (feeds caught up after %.2fs)", mono - self.started_at)
                    self._dirty.update(self._published_scopes())
                if mono >= next_full:
                    self._dirty.update(self._published_scopes())
                    next_full = mono + self.status_interval_s
                await self.publish_changes(publish, now)
                delay = 0.1
            except BudgetStoreError as exc:
                log.warning("budget gate: %s; retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # never let the background task (and with it the process) die
                log.exception("budget gate: background round failed; retrying in %.1fs", delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def publish_changes(self, publish: Callable[[Emit], Awaitable[None]], now: datetime) -> None:
        """Publish ``budget_status`` for the changed scopes worth publishing and any newly crossed alert.

        Raises:
            BudgetStoreError: when the store cannot be read.
        """
        wanted = self._published_scopes()
        mono = time.monotonic()
        for scope in sorted(self._dirty):
            if scope not in wanted:
                self._dirty.discard(scope)
                continue
            last = self._last_status.get(scope)
            if last is not None and mono - last < self.status_min_interval_s:
                continue  # stays dirty; published on a later round
            states = await self.store.status(scope, now)
            self._dirty.discard(scope)
            self._last_status[scope] = mono
            key = scope if is_provider_scope(scope) else "*"
            await publish(Emit(self.topics.control, key, self.status_event(scope, states, now)))
            for alert in await self._new_alerts(scope, states):
                await publish(Emit(self.topics.control, key, alert))

    @staticmethod
    def status_event(scope: str, states: dict[str, WindowState], now: datetime) -> BudgetStatus:
        """The ``budget_status`` event of ``scope`` (USD, rounded to 10 places)."""
        return BudgetStatus(
            scope=scope,
            windows={
                w: BudgetWindow(
                    limit_usd=_float(s.limit_usd),
                    spent_usd=float(round(s.spent_usd, 10)),
                    reserved_usd=float(round(s.reserved_usd, 10)),
                    resets_at=s.resets_at,
                )
                for w, s in states.items()
            },
            at=now,
        )

    async def _new_alerts(self, scope: str, states: dict[str, WindowState]) -> list[BudgetAlert]:
        alerts: list[BudgetAlert] = []
        for window in WINDOWS:
            state = states[window]
            for pct in crossed_thresholds(state):
                key = AlertKey(scope, window, state.starts_at, pct)
                if key in self._alerted:
                    continue
                self._alerted.add(key)
                if not await self.store.claim_alert(key):
                    continue
                assert state.limit_usd is not None
                log.warning(
                    "budget alert: %s %s spend $%.6f reached %d%% of $%s",
                    scope,
                    window,
                    state.spent_usd,
                    pct,
                    state.limit_usd,
                )
                alerts.append(
                    BudgetAlert(
                        scope=scope,
                        window=window,  # type: ignore[arg-type]
                        threshold_pct=pct,
                        spent_usd=float(round(state.spent_usd, 10)),
                        limit_usd=float(state.limit_usd),
                        at=self.clock(),
                    )
                )
        return alerts


__all__ = ["PROMPT_ESTIMATE_MARGIN", "RESERVATION_GRACE_S", "BudgetGateStage"]
