"""Budgets and cost accounting without a broker: windows on a fixed clock, the gate's decisions,
its status and alert events, the provider-budget view, the recorder's one cost event per id,
and the reports folded from cost events."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.client.cost_book import CostBook
from pipeline.client.report_reader import set_budget_event
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.runtime.runner import Emit, MessageContext
from schemas import AIRequest, CostEvent, Envelope, Outcome, Usage
from schemas.events import BudgetAlert, BudgetStatus, BudgetWindow, ReservationRelease, SetBudget
from stages.budget.stage import BudgetGateStage
from stages.recorder.stage import RecorderStage
from stages.rules.budget_view import ProviderBudgetView
from stages.rules.ledger import (
    BudgetLedger,
    Limits,
    WindowState,
    crossed_thresholds,
    validate_scope,
    window_end,
    window_start,
)
from stages.rules.pricing import PriceTable

UTC_Z = ZoneInfo("UTC")
TOKYO = ZoneInfo("Asia/Tokyo")  # UTC+9, no DST
SCOPES = ("global", "user:alice")
D = Decimal

# One model whose worst case is exactly $0.05 at max_tokens=10: input free, output $5,000 per million tokens.
RACE_PRICES = PriceTable.from_mapping(
    {
        "openai": {
            "gpt-4o-mini": {
                "usd_per_mtok_input": "0",
                "usd_per_mtok_output": "5000",
                "source": "https://example.test/race-prices",
                "as_of": "2026-01-01",
            }
        }
    },
    origin="test",
)


def _ledger(tz: ZoneInfo = UTC_Z, **limits: str) -> BudgetLedger:
    ledger = BudgetLedger(tz=tz)
    ledger.set_limits("user:alice", Limits(**{k: D(v) for k, v in limits.items()}))
    return ledger


def _fits(ledger: BudgetLedger, rid: str, amount: str, at: datetime) -> bool:
    return ledger.reserve(rid, SCOPES, D(amount), at, at + timedelta(minutes=1)).admitted


# --- windows on a fixed clock ------------------------------------------------------------------


def test_daily_window_resets_at_midnight_utc() -> None:
    ledger = _ledger(daily="1.00")
    before = datetime(2026, 3, 4, 23, 59, 59, tzinfo=UTC)
    midnight = datetime(2026, 3, 5, 0, 0, 0, tzinfo=UTC)
    ledger.settle("spent", SCOPES, D("0.90"), before)
    assert not _fits(ledger, "a", "0.20", before)
    assert _fits(ledger, "b", "0.20", midnight)  # a new day: spend 0
    assert ledger.spent("user:alice", "daily", midnight) == 0
    assert ledger.spent("user:alice", "daily", before) == D("0.90")
    assert ledger.window_state("user:alice", "daily", before).resets_at == midnight


def test_daily_window_resets_at_local_midnight_in_utc_plus_9() -> None:
    ledger = _ledger(TOKYO, daily="1.00")
    # 14:59:59 UTC is 23:59:59 in Tokyo; 15:00 UTC is midnight there (and still the same UTC day).
    before = datetime(2026, 3, 4, 14, 59, 59, tzinfo=UTC)
    midnight = datetime(2026, 3, 4, 15, 0, 0, tzinfo=UTC)
    ledger.settle("spent", SCOPES, D("0.90"), before)
    assert not _fits(ledger, "a", "0.20", before)
    assert _fits(ledger, "b", "0.20", midnight)
    assert ledger.window_state("user:alice", "daily", before).resets_at == midnight
    assert window_start("daily", midnight, TOKYO) == datetime(2026, 3, 5, tzinfo=TOKYO)
    # in UTC the two instants share one day: the same spend still counts there
    utc_ledger = _ledger(daily="1.00")
    utc_ledger.settle("spent", SCOPES, D("0.90"), before)
    assert not _fits(utc_ledger, "b", "0.20", midnight)


def test_weekly_window_starts_on_monday() -> None:
    ledger = _ledger(weekly="5.00")
    sunday = datetime(2026, 3, 8, 23, 59, 59, tzinfo=UTC)  # 2026-03-08 is a Sunday
    monday = datetime(2026, 3, 9, 0, 0, 0, tzinfo=UTC)
    assert sunday.weekday() == 6 and monday.weekday() == 0
    ledger.settle("mon", SCOPES, D("2.00"), datetime(2026, 3, 2, 9, tzinfo=UTC))  # the previous Monday
    ledger.settle("sun", SCOPES, D("2.90"), sunday)
    assert ledger.spent("user:alice", "weekly", sunday) == D("4.90")
    assert not _fits(ledger, "a", "0.20", sunday)
    assert _fits(ledger, "b", "0.20", monday)
    assert window_start("weekly", sunday, UTC_Z) == datetime(2026, 3, 2, tzinfo=UTC_Z)
    assert window_end("weekly", sunday, UTC_Z) == monday
    # the week of a Tokyo Monday morning starts at that Monday's local midnight
    assert window_start("weekly", datetime(2026, 3, 8, 16, tzinfo=UTC), TOKYO) == datetime(2026, 3, 9, tzinfo=TOKYO)


def test_monthly_window_starts_on_the_first() -> None:
    ledger = _ledger(monthly="10.00")
    last = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)
    first = datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC)
    ledger.settle("jan-2", SCOPES, D("5.00"), datetime(2026, 1, 2, tzinfo=UTC))
    ledger.settle("jan-31", SCOPES, D("4.90"), last)
    assert not _fits(ledger, "a", "0.20", last)
    assert _fits(ledger, "b", "0.20", first)
    assert window_end("monthly", datetime(2026, 12, 31, 12, tzinfo=UTC), UTC_Z) == datetime(2027, 1, 1, tzinfo=UTC_Z)
    assert window_end("monthly", datetime(2026, 2, 10, tzinfo=UTC), TOKYO) == datetime(2026, 3, 1, tzinfo=TOKYO)


def test_replayed_spend_lands_in_the_window_of_its_own_time() -> None:
    ledger = _ledger(daily="1.00")
    now = datetime(2026, 3, 5, 12, tzinfo=UTC)
    # a replay of yesterday's events (read today) does not count toward today
    assert ledger.settle("yesterday", SCOPES, D("0.90"), now - timedelta(days=1), now=now)
    assert ledger.spent("user:alice", "daily", now) == 0
    assert _fits(ledger, "a", "0.50", now)
    # an event of last month adds nothing to any current window, and a replay counts it once
    old = datetime(2026, 2, 1, tzinfo=UTC)
    assert ledger.settle("last-month", SCOPES, D("3"), old, now=now)
    assert not ledger.settle("last-month", SCOPES, D("3"), old, now=now)
    assert ledger.spent("user:alice", "monthly", now) == D("0.90")
    ledger.settle("live", SCOPES, D("1"), old)  # settled when it happened (no replay): pruned once over
    assert ledger.prune(now) == 2 * 3  # its three ended windows on both scopes; ids are kept 40 days
    assert ledger.spent("user:alice", "monthly", now) == D("0.90")
    assert all(window_end(w, s, UTC_Z) > now for (_, w, s) in ledger.spend)


def test_thresholds_and_percentages() -> None:
    start = datetime(2026, 3, 5, tzinfo=UTC)
    state = WindowState(D("1"), D("0.8"), D("0.1"), start, start + timedelta(days=1))
    assert state.percentage == D(80)
    assert crossed_thresholds(state) == [50, 80]
    assert crossed_thresholds(WindowState(D("1"), D("1"), D(0), start, start)) == [50, 80, 100]
    assert crossed_thresholds(WindowState(None, D("9"), D(0), start, start)) == []
    assert crossed_thresholds(WindowState(D(0), D("0.01"), D(0), start, start)) == [50, 80, 100]


def test_scope_and_command_validation() -> None:
    providers = ("openai", "anthropic", "cloudflare")
    assert validate_scope("user:alice", providers) == "user:alice"
    assert validate_scope("openai", providers) == "openai"
    for bad in ("user:", "users:alice", "gpt-4o", ""):
        with pytest.raises(ValueError, match="budget scope"):
            validate_scope(bad, providers)
    with pytest.raises(ValueError, match="daily"):
        set_budget_event("global", daily=-1)
    with pytest.raises(ValueError, match="weekly"):
        set_budget_event("global", weekly=float("nan"))
    event = set_budget_event("openai", daily=10, weekly=50, monthly=200)
    assert (event.scope, event.daily_usd, event.weekly_usd, event.monthly_usd) == ("openai", 10, 50, 200)


# --- the gate ----------------------------------------------------------------------------------


class _Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _config() -> Any:
    return config_from_mapping({}, base=preset("production"))


def _envelope(
    rid: str, *, user: str | None = "alice", max_tokens: int = 10, deadline_ms: int | None = None
) -> Envelope:
    req = msgspec.convert(
        {"id": rid, "model": "gpt-4o-mini", "prompt": "hello there", "max_tokens": max_tokens, "user": user},
        AIRequest,
    )
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return Envelope(id=rid, request=req, received_at_ms=now_ms, deadline_at_ms=deadline_ms or now_ms + 60_000)


def _ctx() -> MessageContext:
    return MessageContext(record=Record("t", 0, 0, None, b""), stage="budget")


def _cost(rid: str, usd: str, at: datetime, *, user: str | None = "alice", cached: bool = False) -> CostEvent:
    return CostEvent(
        id=rid,
        user=user,
        provider="openai",
        model="gpt-4o-mini",
        usage=Usage(prompt_tokens=5, completion_tokens=10, total_tokens=15),
        cost_usd=float(usd),
        saved_usd=0.05 if cached else 0.0,
        cached=cached,
        at=at,
    )


def _gate(clock: _Clock, tz: str = "UTC") -> BudgetGateStage:
    config = config_from_mapping({"budget": {"timezone": tz}}, base=preset("production"))
    return BudgetGateStage(Topics("t."), config, RACE_PRICES, BudgetLedger(), status_min_interval_s=0.0, clock=clock)


def test_worst_case_is_max_tokens_at_the_dearest_serving_provider() -> None:
    gate = _gate(_Clock(datetime.now(UTC)))
    assert gate.worst_case_usd(_envelope("w", max_tokens=10)) == D("0.05")
    # an unlisted model is reserved at its provider's cost_per_token (never 0)
    table = BudgetGateStage(Topics("t."), _config(), PriceTable.from_mapping({}), BudgetLedger())
    assert table.worst_case_usd(_envelope("w", max_tokens=10)) > 0


async def test_a_request_no_candidate_can_take_passes_unreserved_for_the_router_to_answer() -> None:
    clock = _Clock(datetime.now(UTC))
    gate = _gate(clock)
    gate.on_control(SetBudget(scope="global", daily_usd=1.00, at=clock.at))
    await gate.apply_pending()
    [out] = await gate.handle(_envelope("huge", max_tokens=10_000_000), _ctx())
    assert out.topic == "t.stage.route" and out.value.reserved_usd == 0  # not budget_exceeded: invalid_request
    assert gate.ledger.reservations == {}


async def test_gate_admits_reserves_refuses_settles_and_releases() -> None:
    clock = _Clock(datetime.now(UTC))
    gate = _gate(clock)
    gate.on_control(SetBudget(scope="user:alice", daily_usd=1.00, at=clock.at))
    gate.on_cost(_cost("seed", "0.90", clock.at))
    assert await gate.apply_pending() == 1
    outs = [await gate.handle(_envelope(f"r{i}"), _ctx()) for i in range(4)]
    topics = [o[0].topic for o in outs]
    assert topics == ["t.stage.route", "t.stage.route", "t.stage.record", "t.stage.record"]
    routed = outs[0][0].value
    assert routed.reserved_usd == 0.05 and routed.reservation_scopes == ["global", "user:alice"]
    refused = outs[2][0].value.outcome
    assert refused.error.type == "budget_exceeded" and "user:alice daily limit $1" in refused.error.message
    # the same request id again (a redelivery) holds nothing more
    assert (await gate.handle(_envelope("r0"), _ctx()))[0].topic == "t.stage.route"
    # r0 costs less than reserved; r1 fails (released): room for more again
    gate.on_cost(_cost("r0", "0.03", clock.at))
    gate.on_control(ReservationRelease(request_id="r1", scope="global,user:alice", amount_usd=0.05, at=clock.at))
    await gate.apply_pending()
    status = await gate.store.status("user:alice", clock.at)
    assert status["daily"].spent_usd == D("0.93") and status["daily"].reserved_usd == 0
    assert (await gate.handle(_envelope("r5"), _ctx()))[0].topic == "t.stage.route"
    assert (await gate.handle(_envelope("r6"), _ctx()))[0].topic == "t.stage.record"
    # a request without a user counts only toward global, which has no limit
    assert (await gate.handle(_envelope("anon", user=None), _ctx()))[0].topic == "t.stage.route"


async def test_reservation_expires_after_the_deadline() -> None:
    clock = _Clock(datetime.now(UTC))
    gate = _gate(clock)
    gate.on_control(SetBudget(scope="user:alice", daily_usd=0.05, at=clock.at))
    deadline_ms = int(clock.at.timestamp() * 1000) + 1_000
    assert (await gate.handle(_envelope("a", deadline_ms=deadline_ms), _ctx()))[0].topic == "t.stage.route"
    assert (await gate.handle(_envelope("b"), _ctx()))[0].topic == "t.stage.record"
    clock.at += timedelta(seconds=7)  # past the deadline and its 5 s grace
    assert (await gate.handle(_envelope("c"), _ctx()))[0].topic == "t.stage.route"


async def test_status_and_alerts_once_per_threshold_per_window() -> None:
    clock = _Clock(datetime(2026, 3, 4, 12, tzinfo=UTC))
    gate = _gate(clock)
    gate.ready.set()
    published: list[Emit] = []

    async def publish(out: Emit) -> None:
        published.append(out)

    gate.on_control(SetBudget(scope="user:alice", daily_usd=1.0, monthly_usd=10.0, at=clock.at))
    gate.on_control(SetBudget(scope="openai", daily_usd=2.0, at=clock.at))
    for rid, usd in (("a", "0.30"), ("b", "0.25"), ("c", "0.30"), ("d", "0.10"), ("e", "0.05")):
        gate.on_cost(_cost(rid, usd, clock.at))
        await gate.apply_pending()
        await gate.publish_changes(publish, clock.at)
    alerts = [o.value for o in published if isinstance(o.value, BudgetAlert)]
    assert [(a.scope, a.window, a.threshold_pct) for a in alerts] == [
        ("user:alice", "daily", 50),  # 0.55
        ("user:alice", "daily", 80),  # 0.85
        ("openai", "daily", 50),  # 1.00 of 2.00
        ("user:alice", "daily", 100),  # 1.00
    ]
    assert alerts[-1].spent_usd == 1.0 and alerts[-1].limit_usd == 1.0
    statuses = [o for o in published if isinstance(o.value, BudgetStatus)]
    assert {o.value.scope for o in statuses} == {"global", "user:alice", "openai"}
    assert all(o.key == ("openai" if o.value.scope == "openai" else "*") for o in statuses)
    last = [o.value for o in statuses if o.value.scope == "user:alice"][-1]
    assert last.windows["daily"].spent_usd == 1.0 and last.windows["monthly"].limit_usd == 10.0
    assert last.windows["daily"].resets_at == datetime(2026, 3, 5, tzinfo=UTC_Z)
    # the next day is a new window: its 50 % alert fires again
    clock.at += timedelta(days=1)
    gate.on_cost(_cost("f", "0.60", clock.at))
    await gate.apply_pending()
    await gate.publish_changes(publish, clock.at)
    alerts = [o.value for o in published if isinstance(o.value, BudgetAlert)]
    assert [(a.window, a.threshold_pct) for a in alerts[4:]] == [("daily", 50)]


async def test_alerts_already_on_the_control_topic_are_not_repeated_after_a_restart() -> None:
    at = datetime(2026, 3, 4, 12, tzinfo=UTC)
    gate = _gate(_Clock(at))
    gate.ready.set()
    published: list[Emit] = []

    async def publish(out: Emit) -> None:
        published.append(out)

    # replayed from ai.control and ai.costs after a restart
    gate.on_control(SetBudget(scope="user:alice", daily_usd=1.0, at=at))
    for pct in (50, 80):
        gate.on_control(
            BudgetAlert(scope="user:alice", window="daily", threshold_pct=pct, spent_usd=0.9, limit_usd=1.0, at=at)
        )
    gate.on_cost(_cost("a", "0.90", at))
    await gate.apply_pending()
    await gate.publish_changes(publish, at)
    assert not [o for o in published if isinstance(o.value, BudgetAlert)]


def test_set_budget_latest_command_wins() -> None:
    at = datetime(2026, 3, 4, 12, tzinfo=UTC)
    gate = _gate(_Clock(at))
    gate.on_control(SetBudget(scope="user:alice", daily_usd=2.0, at=at))
    gate.on_control(SetBudget(scope="user:alice", daily_usd=1.0, at=at - timedelta(seconds=1)))  # late, older
    assert gate.ledger.limits["user:alice"].daily == D("2.0")
    gate.on_control(SetBudget(scope="user:alice", daily_usd=-1.0, at=at + timedelta(seconds=1)))  # invalid: ignored
    assert gate.ledger.limits["user:alice"].daily == D("2.0")
    # DESIGN A6: a window the command leaves out keeps its limit; null removes it
    gate.on_control(SetBudget(scope="user:alice", weekly_usd=9.0, at=at + timedelta(seconds=2)))
    assert (gate.ledger.limits["user:alice"].daily, gate.ledger.limits["user:alice"].weekly) == (D("2.0"), D("9.0"))
    gate.on_control(SetBudget(scope="user:alice", daily_usd=None, weekly_usd=None, at=at + timedelta(seconds=3)))
    assert not gate.ledger.limits["user:alice"].any()  # every window unlimited
    # per window, the latest command wins even when commands arrive out of order
    gate.on_control(SetBudget(scope="user:alice", daily_usd=5.0, at=at + timedelta(seconds=5)))
    gate.on_control(SetBudget(scope="user:alice", daily_usd=4.0, weekly_usd=8.0, at=at + timedelta(seconds=4)))
    assert (gate.ledger.limits["user:alice"].daily, gate.ledger.limits["user:alice"].weekly) == (D("5.0"), D("8.0"))


def test_provider_budget_view_blocks_a_spent_provider_until_its_window_resets() -> None:
    view = ProviderBudgetView()
    now = datetime(2026, 3, 4, 12, tzinfo=UTC)
    resets = datetime(2026, 3, 5, tzinfo=UTC)

    def status(spent: float, at: datetime, scope: str = "openai") -> BudgetStatus:
        window = BudgetWindow(limit_usd=1.0, spent_usd=spent, reserved_usd=0.0, resets_at=resets)
        return BudgetStatus(scope=scope, windows={"daily": window}, at=at)

    assert view.allows("openai", now)
    view.apply(status(1.0, now))
    view.apply(status(1.0, now, scope="user:openai"))  # a user scope is not a provider budget
    assert view.exhausted("openai", now) == ["daily"] and not view.allows("openai", now)
    assert view.allows("cloudflare", now)
    assert view.allows("openai", resets)  # the window has reset
    view.apply(status(0.2, now - timedelta(seconds=1)))  # older status: ignored
    assert not view.allows("openai", now)
    view.apply(status(0.2, now + timedelta(seconds=1)))
    assert view.allows("openai", now)


# --- the recorder: one cost event per id, never a silent 0 --------------------------------------


def _record_envelope(rid: str, model: str = "gpt-4o-mini") -> Envelope:
    env = _envelope(rid)
    outcome = Outcome(
        status="ok",
        content="an answer",
        provider="openai",
        model=model,
        usage=Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500),
    )
    return msgspec.structs.replace(env, outcome=outcome, reserved_usd=0.05, reservation_scopes=["global"])


def _costs(outputs: list[Emit]) -> list[CostEvent]:
    return [o.value for o in outputs if isinstance(o.value, CostEvent)]


async def test_redelivered_record_writes_one_cost_event_also_after_a_restart() -> None:
    config = _config()
    recorder = RecorderStage(Topics("t."), config, PriceTable.load(), None)
    first = await recorder.handle(_record_envelope("dup"), _ctx())
    again = await recorder.handle(_record_envelope("dup"), _ctx())
    assert len(_costs(first)) == 1 and _costs(again) == []
    assert [o.value.id for o in again if o.topic == "t.responses"] == ["dup"]
    # a restarted recorder learns the id from ai.costs (its feed) and writes no second event
    restarted = RecorderStage(Topics("t."), config, PriceTable.load(), None)
    restarted.on_cost(_costs(first)[0])
    outputs = await restarted.handle(_record_envelope("dup"), _ctx())
    assert _costs(outputs) == []
    assert [o.value.status for o in outputs if o.topic == "t.responses"] == ["ok"]


async def test_model_missing_from_the_price_table_is_charged_at_cost_per_token_and_flagged() -> None:
    config = _config()  # openai cost_per_token = 0.000002 USD
    recorder = RecorderStage(Topics("t."), config, PriceTable.load(), None)
    [event] = _costs(await recorder.handle(_record_envelope("new-model", model="gpt-99-preview"), _ctx()))
    assert event.price_source == "default"
    assert event.cost_usd == pytest.approx(1500 * 0.000002) and event.cost_usd > 0
    [listed] = _costs(await recorder.handle(_record_envelope("listed"), _ctx()))
    assert listed.price_source == "table"
    assert listed.cost_usd == pytest.approx((1000 * 0.15 + 500 * 0.60) / 1e6)


# --- reports -------------------------------------------------------------------------------------


def _event(
    rid: str,
    usd: float,
    at: datetime,
    *,
    user: str | None,
    provider: str = "openai",
    model: str = "m",
    tokens: int = 100,
    cached: bool = False,
) -> CostEvent:
    return CostEvent(
        id=rid,
        user=user,
        provider=provider,
        model=model,
        usage=Usage(prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2, total_tokens=tokens),
        cost_usd=0.0 if cached else usd,
        saved_usd=usd if cached else 0.0,
        cached=cached,
        at=at,
    )


def test_cost_book_reports_are_sums_of_cost_events_counted_once() -> None:
    now = datetime(2026, 3, 4, 12, tzinfo=UTC)  # a Wednesday
    book = CostBook()
    events = [
        _event("1", 0.10, now - timedelta(hours=1), user="alice", tokens=1000),
        _event("2", 0.30, now - timedelta(days=1), user="bob", model="big", tokens=500),
        _event("3", 0.05, now - timedelta(days=3), user="alice", provider="cloudflare", model="llama", tokens=5000),
        _event("4", 0.10, now - timedelta(minutes=5), user="alice", cached=True),
        _event("5", 0.02, now - timedelta(minutes=1), user=None, tokens=200),
    ]
    for e in events:
        assert book.add_cost(e)
    assert not book.add_cost(events[0])  # a duplicate counts nothing
    summary = book.cost_summary()
    assert summary["openai"].request_count == 3 and summary["openai"].cache_hits == 1
    assert summary["openai"].total_cost_usd == pytest.approx(0.42)
    assert summary["openai"].total_tokens == 1700
    assert summary["openai"].average_cost_per_token_usd == pytest.approx(0.42 / 1700)
    assert summary["openai"].saved_usd == pytest.approx(0.10)
    assert summary["cloudflare"].total_cost_usd == pytest.approx(0.05)
    assert [(m.provider, m.model) for m in book.top_models(2)] == [("openai", "m"), ("openai", "big")]
    assert [(u.user, u.total_cost_usd) for u in book.top_users(5)] == [("bob", 0.3), ("alice", 0.15)]
    days = book.daily_costs(4, now)
    assert [d.date for d in days] == [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3), date(2026, 3, 4)]
    assert [d.total_cost_usd for d in days] == [pytest.approx(0.05), 0.0, pytest.approx(0.30), pytest.approx(0.12)]
    assert days[-1].cache_hits == 1
    # budgets: spend by the events' own time, limits from the commands and statuses
    book.add_control(SetBudget(scope="user:alice", daily_usd=0.2, weekly_usd=1.0, at=now))
    report = book.budget_status("user:alice", now)
    assert report.daily.spent_usd == pytest.approx(0.10) and report.daily.limit_usd == 0.2
    assert report.daily.percentage == pytest.approx(50.0)
    assert report.weekly.spent_usd == pytest.approx(0.10)  # Monday 2 March onward: Sunday the 1st is last week
    assert report.monthly.limit_usd is None and report.monthly.percentage is None
    assert report.daily.resets_at == datetime(2026, 3, 5, tzinfo=UTC_Z)
    window = BudgetWindow(limit_usd=0.3, spent_usd=0.1, reserved_usd=0.04, resets_at=report.daily.resets_at)
    book.add_control(BudgetStatus(scope="user:alice", windows={"daily": window}, at=now + timedelta(seconds=1)))
    report = book.budget_status("user:alice", now)
    assert report.daily.reserved_usd == 0.04 and report.daily.limit_usd == 0.3
    assert book.budget_scopes() == ["user:alice"]


def test_projection_method() -> None:
    now = datetime(2026, 3, 4, 12, tzinfo=UTC)  # half of Wednesday gone
    book = CostBook()
    book.add_cost(_event("a", 1.0, now - timedelta(hours=2), user="alice"))
    book.add_cost(_event("b", 2.0, now - timedelta(days=1), user="alice"))
    one = book.projection("user:alice", 1, now)
    assert one.rate_usd_per_day == pytest.approx(2.0)  # $1 in half a day
    assert one.daily == pytest.approx(1.0 + 2.0 * 0.5)
    assert one.weekly == pytest.approx(3.0 + 2.0 * 4.5)  # Mon-Wed spend + 4.5 days left
    two = book.projection("user:alice", 2, now)
    assert two.rate_usd_per_day == pytest.approx(3.0 / 1.5)
    assert two.monthly == pytest.approx(3.0 + 2.0 * 27.5)  # 27.5 days left in March
    with pytest.raises(ValueError):
        book.projection("global", 0, now)


def test_cost_book_days_follow_the_time_zone() -> None:
    book = CostBook(TOKYO)
    at = datetime(2026, 3, 4, 16, tzinfo=UTC)  # 01:00 on 5 March in Tokyo
    book.add_cost(_event("a", 1.0, at, user="alice"))
    assert [(d.date, d.total_cost_usd) for d in book.daily_costs(1, at)] == [(date(2026, 3, 5), 1.0)]
    assert book.budget_status("user:alice", at).daily.spent_usd == 1.0
    assert book.budget_status("user:alice", at + timedelta(hours=23)).daily.spent_usd == 0.0


def test_cost_book_charges_each_line_of_an_event_to_its_own_provider() -> None:
    from schemas.events import CostLine

    now = datetime(2026, 3, 4, 12, tzinfo=UTC)
    book = CostBook()
    line_usage = Usage(prompt_tokens=10, completion_tokens=6, total_tokens=16)
    event = msgspec.structs.replace(
        _event("fallback", 0.03, now, user=None, provider="openai", tokens=16),
        lines=[
            CostLine(provider="cloudflare", model="llama", usage=line_usage, cost_usd=0.01),
            CostLine(provider="openai", model="m", usage=line_usage, cost_usd=0.02),
        ],
    )
    assert book.add_cost(event)
    summary = book.cost_summary()
    assert summary["cloudflare"].total_cost_usd == pytest.approx(0.01) and summary["cloudflare"].request_count == 0
    assert summary["openai"].total_cost_usd == pytest.approx(0.02) and summary["openai"].request_count == 1
    assert summary["cloudflare"].total_tokens == summary["openai"].total_tokens == 16
    day_start = datetime(2026, 3, 4, tzinfo=UTC)
    assert book.spent("cloudflare", day_start, now) == Decimal("0.01")
    assert book.spent("global", day_start, now) == Decimal("0.03")
