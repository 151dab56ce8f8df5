"""Memory bounded by configuration, not by traffic (issue 17, item 9): the de-duplication memories."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anyio
import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.runtime.messages import to_record
from pipeline.runtime.runner import MessageContext
from pipeline.runtime.settings import Settings
from pipeline.stores.budget_store import MemoryBudgetStore
from schemas import AIRequest, AIResponse, CostEvent, Envelope, Outcome, Usage
from stages.recorder.stage import RecorderStage
from stages.rules.ledger import AlertKey, BudgetLedger
from stages.rules.pricing import PriceTable
from stages.rules.recent_ids import RecentIds

T = Topics("t.")
START = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SCOPES = ("global", "user:alice")


def test_recent_ids_remember_for_a_window_of_stream_time_then_forget() -> None:
    ids = RecentIds(window_s=60, max_ids=1000)
    ids.add("a", 1_000.0)
    ids.add("b", 1_030.0)
    ids.add("c", 1_061.0)  # a new generation; a and b are still remembered (at least 60 s)
    assert "a" in ids and "b" in ids and "c" in ids
    ids.add("late", 900.0)  # an older time does not move the clock back
    assert ids.clock == 1_061.0 and "late" in ids
    ids.add("d", 1_125.0)  # 64 s after c's generation began: a and b (over 60 s old) are gone
    assert "a" not in ids and "b" not in ids and "c" in ids and "d" in ids
    ids.add("e", 1_400.0)  # two windows later: everything before is gone
    assert "c" not in ids and "d" not in ids and "e" in ids


def test_wall_time_does_not_matter_only_the_streams() -> None:
    ids = RecentIds(window_s=1, max_ids=1000)
    ids.add("a", 5_000.0)
    assert "a" in ids  # however long we wait: only a newer event moves the clock


def test_recent_ids_hold_at_most_max_ids_and_at_least_the_last_half() -> None:
    ids = RecentIds(window_s=3600, max_ids=100)
    for i in range(1_000):
        ids.add(f"r{i}", 1_000.0 + i * 0.001)
        assert len(ids) <= 100
    assert all(f"r{i}" in ids for i in range(950, 1_000))
    assert "r0" not in ids and "r800" not in ids


def test_recent_ids_refuse_a_window_or_count_out_of_range() -> None:
    with pytest.raises(ValueError, match="window_s must be > 0"):
        RecentIds(window_s=0, max_ids=10)
    with pytest.raises(ValueError, match="max_ids >= 2"):
        RecentIds(window_s=10, max_ids=1)


def test_the_settings_take_the_window_and_count_from_the_environment() -> None:
    with pytest.raises(ValueError, match="AIPIPE_DEDUP_MAX_IDS must be an integer >= 2"):
        Settings.from_env({"AIPIPE_DEDUP_MAX_IDS": "1"})
    s = Settings.from_env({"AIPIPE_DEDUP_WINDOW_S": "30", "AIPIPE_DEDUP_MAX_IDS": "5000"})
    assert (s.dedup_window_s, s.dedup_max_ids) == (30.0, 5000)
    assert (Settings.from_env({}).dedup_window_s, Settings.from_env({}).dedup_max_ids) == (60.0, 100_000)
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="AIPIPE_DEDUP_WINDOW_S must be a number > 0"):
            Settings.from_env({"AIPIPE_DEDUP_WINDOW_S": bad})


# --- the budget ledger ---------------------------------------------------------------------------


def test_the_ledger_settles_an_id_once_within_the_window_and_its_memory_stays_bounded() -> None:
    ledger = BudgetLedger(settled=RecentIds(window_s=120, max_ids=1_000))
    now = START + timedelta(hours=1)
    for i in range(20_000):  # 20,000 requests, one every 10 ms of stream time
        at = START + timedelta(milliseconds=10 * i)
        assert ledger.settle(f"r{i}", SCOPES, Decimal("0.001"), at, now=now)
    assert len(ledger.settled) <= 1_000  # bounded, whatever the traffic
    spent = ledger.spent("global", "daily", now)
    assert spent == Decimal("20.000")
    # a redelivered cost event within the window counts once
    assert not ledger.settle("r19999", SCOPES, Decimal("0.001"), now, now=now)
    assert ledger.spent("global", "daily", now) == spent


def test_a_cost_repeated_after_the_window_is_over_counted_never_under_counted() -> None:
    ledger = BudgetLedger(settled=RecentIds(window_s=60, max_ids=1_000))
    now = START + timedelta(hours=2)
    assert ledger.settle("old", SCOPES, Decimal("1"), START, now=now)
    assert ledger.settle("newer", SCOPES, Decimal("1"), START + timedelta(minutes=5), now=now)
    assert ledger.settle("old", SCOPES, Decimal("1"), START + timedelta(minutes=5), now=now)  # forgotten: counted
    assert ledger.spent("global", "daily", now) == Decimal("3")  # over, on the safe side of a limit


def test_alerts_of_ended_windows_are_forgotten() -> None:
    store = MemoryBudgetStore(BudgetLedger())
    day1 = datetime(2026, 12, 6, 10, tzinfo=UTC)
    key = AlertKey("global", "daily", datetime(2026, 12, 6, tzinfo=UTC), 80)
    monthly = AlertKey("global", "monthly", datetime(2026, 12, 1, tzinfo=UTC), 80)

    async def run() -> None:
        assert await store.claim_alert(key) and await store.claim_alert(monthly)
        assert not await store.claim_alert(key)
        await store.expire(day1 + timedelta(days=1))
        assert store._alerts == {monthly}  # the day ended; the month has not

    anyio.run(run)


# --- the cost-recorder ---------------------------------------------------------------------------


def _finished(rid: str, received_ms: int) -> Envelope:
    request = msgspec.convert({"id": rid, "model": "gpt-4o-mini", "prompt": "hello", "max_tokens": 10}, AIRequest)
    envelope = Envelope(
        id=rid,
        request=request,
        received_at_ms=received_ms,
        deadline_at_ms=received_ms + 60_000,
        outcome=Outcome(status="ok", content="hi", provider="openai", model="gpt-4o-mini",
                        usage=Usage(prompt_tokens=5, completion_tokens=10, total_tokens=15)),
    )
    emitted = to_record(T.stage_record, envelope)  # stamps finished_at_ms, as the stages do
    out: Envelope = emitted.value
    return out


def _ctx() -> MessageContext:
    return MessageContext(record=Record("t.stage.record", 0, 0, None, b""), stage="recorder")


def _recorder(window_s: float = 120, max_ids: int = 1_000) -> RecorderStage:
    config = config_from_mapping({}, base=preset("production"))
    return RecorderStage(T, config, PriceTable.load(), None, costed=RecentIds(window_s, max_ids))


async def test_a_redelivered_record_gets_the_same_response_byte_for_byte_and_no_second_cost() -> None:
    recorder = _recorder()
    envelope = _finished("same", 1_765_000_000_000)
    raw = msgspec.json.encode(envelope)  # what the broker would redeliver
    first = await recorder.handle(msgspec.json.decode(raw, type=Envelope), _ctx())
    again = await recorder.handle(msgspec.json.decode(raw, type=Envelope), _ctx())

    def response(outputs: list) -> bytes:  # type: ignore[type-arg]
        (r,) = [o.value for o in outputs if isinstance(o.value, AIResponse)]
        return msgspec.json.encode(r)

    assert response(first) == response(again)
    assert [o.value for o in first if isinstance(o.value, CostEvent)]
    assert not [o.value for o in again if isinstance(o.value, CostEvent)]


async def test_the_recorders_memory_is_bounded_and_a_restart_reads_back_the_last_window() -> None:
    recorder = _recorder(window_s=60, max_ids=500)
    costs: list[CostEvent] = []
    base_ms = 1_765_000_000_000
    for i in range(5_000):  # 5,000 requests finished 20 ms apart (100 s of stream time)
        outputs = await recorder.handle(_finished(f"r{i}", base_ms + 20 * i), _ctx())
        costs += [o.value for o in outputs if isinstance(o.value, CostEvent)]
    assert len(costs) == 5_000
    assert len(recorder._costed) <= 500

    # restarted much later: it reads ai.costs back (event times are the original ones), then gets the
    # records that were in flight when the old one stopped: the last few, seconds before its end
    restarted = _recorder(window_s=60, max_ids=500)
    for event in costs:
        restarted.on_cost(event)
    for i in range(4_990, 5_000):
        outputs = await restarted.handle(_finished(f"r{i}", base_ms + 20 * i), _ctx())
        assert not [o for o in outputs if isinstance(o.value, CostEvent)], i
