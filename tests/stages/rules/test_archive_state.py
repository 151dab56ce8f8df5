"""What a restore republishes: budget windows keep their spend, commands merge, circuits keep their state."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from msgspec import UNSET

from schemas.events import CircuitSnapshot, CircuitTransition, CostEvent, CostLine, SetBudget, SetStrategy
from schemas.response import Usage
from stages.rules.archive_state import (
    ControlFold,
    CostRollup,
    is_restored_id,
    open_windows_start,
    restored_cost_events,
)
from stages.rules.ledger import BudgetLedger, Limits, provider_shares, scopes_for, zone


def _ledger_of(events: list[CostEvent], tz_name: str) -> BudgetLedger:
    ledger = BudgetLedger(tz=zone(tz_name))
    for scope in ("global", "user:a", "user:b", "openai", "anthropic"):
        ledger.set_limits(scope, Limits(daily=Decimal(1000)))
    for e in events:
        ledger.settle(e.id, scopes_for(e.user), Decimal(str(e.cost_usd)), e.at)
        for provider, share in provider_shares(e):
            ledger.settle(f"{e.id}@{provider}", (provider,), share, e.at)
    return ledger


@pytest.mark.parametrize("tz_name", ["UTC", "Asia/Tokyo", "America/New_York"])
def test_every_open_window_of_every_scope_keeps_its_spend(tz_name: str) -> None:
    rng = random.Random(7)
    now = datetime(2026, 12, 9, 15, 30, tzinfo=UTC)  # a Wednesday: the week began in this month
    events = []
    for i in range(400):
        at = now - timedelta(minutes=rng.randrange(0, 60 * 24 * 45))  # also before the open windows
        cost = round(rng.uniform(0.0001, 0.02), 10)
        lines = [CostLine(provider="openai", model="gpt-4o", usage=Usage(total_tokens=10), cost_usd=cost)]
        if i % 5 == 0:  # an answer begun by one provider and continued by another
            lines = [
                CostLine(
                    provider="anthropic", model="claude", usage=Usage(total_tokens=4), cost_usd=round(cost / 4, 10)
                ),
                CostLine(
                    provider="openai", model="gpt-4o", usage=Usage(total_tokens=6), cost_usd=round(cost * 3 / 4, 10)
                ),
            ]
            cost = round(sum(line.cost_usd for line in lines), 10)
        events.append(
            CostEvent(
                id=f"r{i}",
                user=rng.choice(["a", "b", None]),
                provider="openai",
                model="gpt-4o",
                usage=Usage(total_tokens=10),
                cost_usd=cost,
                at=at,
                lines=lines,
            )
        )
    rollup = CostRollup()
    for e in events:
        rollup.add(e)
    restored = restored_cost_events(rollup.to_buckets(), now, zone(tz_name))
    assert len(restored) < 60 and all(is_restored_id(e.id) for e in restored)
    before, after = _ledger_of(events, tz_name), _ledger_of(restored, tz_name)
    for scope in ("global", "user:a", "user:b", "openai", "anthropic"):
        for window in ("daily", "weekly", "monthly"):
            assert after.spent(scope, window, now) == pytest.approx(
                before.spent(scope, window, now), abs=Decimal("1e-8")
            ), (
                scope,
                window,
            )
    oldest = open_windows_start(now, zone(tz_name))
    in_open_windows = sum(1 for e in events if e.at.replace(minute=0, second=0, microsecond=0) >= oldest)
    assert sum(e.requests for e in restored) == in_open_windows  # each request counted once, with its last line


def test_restoring_the_same_spend_twice_gives_the_same_ids() -> None:
    now = datetime(2026, 12, 9, 15, tzinfo=UTC)
    rollup = CostRollup()
    rollup.add(CostEvent(id="x", user="a", provider="openai", model="m", usage=Usage(), cost_usd=0.5, at=now))
    first = restored_cost_events(rollup.to_buckets(), now, zone("UTC"))
    assert [e.id for e in first] == [e.id for e in restored_cost_events(rollup.to_buckets(), now, zone("UTC"))]


def test_budget_commands_merge_per_window_and_the_latest_strategy_and_circuits_win() -> None:
    t = datetime(2026, 12, 1, tzinfo=UTC)
    fold = ControlFold()
    fold.add(SetBudget(scope="user:a", daily_usd=5.0, weekly_usd=20.0, at=t))
    fold.add(SetBudget(scope="user:a", weekly_usd=None, at=t + timedelta(minutes=1)))  # null: no limit
    fold.add(SetBudget(scope="user:a", daily_usd=1.0, at=t - timedelta(minutes=1)))  # older: loses
    fold.add(SetStrategy(name="round_robin", at=t))
    fold.add(SetStrategy(name="cost_optimized", at=t + timedelta(minutes=2)))
    fold.add(CircuitSnapshot(states={"openai": "CLOSED", "anthropic": "CLOSED"}, at=t))
    fold.add(CircuitTransition(provider="openai", from_state="CLOSED", to_state="OPEN", reason="5 failures", at=t))
    events = fold.events()
    budget = next(e for e in events if isinstance(e, SetBudget))
    assert (budget.daily_usd, budget.weekly_usd, budget.monthly_usd) == (5.0, None, UNSET)
    assert next(e for e in events if isinstance(e, SetStrategy)).name == "cost_optimized"
    assert next(e for e in events if isinstance(e, CircuitSnapshot)).states == {"openai": "OPEN", "anthropic": "CLOSED"}
    again = ControlFold(fold.summary("2026-12-01", 7))  # a day summary carries the fold on
    assert [type(e) for e in again.events()] == [type(e) for e in events]
