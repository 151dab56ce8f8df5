"""`aipipe audit` sets provider calls (what providers invoice) against the ledger (DESIGN A11)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from pipeline.client.replay import AuditReport, reconcile_calls
from schemas.events import CostEvent, CostLine, Health
from schemas.response import Usage

AT = datetime(2026, 12, 6, tzinfo=UTC)
U = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)


def _call(rid: str, provider: str, usd: float | None, *, ok: bool = True) -> Health:
    return Health(
        provider=provider,
        model="m",
        ok=ok,
        request_id=rid,
        at=AT,
        usage=U if ok else None,
        cost_usd=usd if ok else None,
    )


def _cost(rid: str, *lines: tuple[str, float]) -> CostEvent:
    return CostEvent(
        id=rid,
        user=None,
        provider=lines[-1][0],
        model="m",
        usage=U,
        cost_usd=sum(c for _, c in lines),
        at=AT,
        lines=[CostLine(provider=p, model="m", usage=U, cost_usd=c) for p, c in lines],
    )


def test_a_call_made_again_after_a_redelivery_is_a_repeated_call_with_its_cost() -> None:
    health = [
        _call("a", "openai", 0.002),
        _call("a", "openai", 0.002),  # the executor died before its commit: called twice
        _call("b", "openai", 0.003),
        _call("c", "openai", None, ok=False),
        _call("c", "anthropic", 0.004),  # a failure bills nothing
        _call("d", "anthropic", 0.001),  # answered, but its answer never reached the ledger
        Health(provider="openai", model="m", ok=True, source="probe", at=AT),  # probes are not calls for requests
    ]
    costs = [
        _cost("a", ("openai", 0.002)),
        _cost("b", ("openai", 0.003)),
        _cost("c", ("anthropic", 0.004)),
        _cost("a", ("openai", 0.002)),
    ]  # a duplicate cost event counts once
    report = AuditReport()
    reconcile_calls(report, health, costs)
    openai, anthropic = report.calls["openai"], report.calls["anthropic"]
    assert (openai.calls, openai.answered, openai.repeated_calls) == (3, 2, 1)
    assert openai.billed_usd == Decimal("0.007") and openai.ledger_usd == Decimal("0.005")
    assert openai.repeated_usd == Decimal("0.002")
    assert (anthropic.calls, anthropic.answered, anthropic.repeated_calls) == (2, 1, 1)
    assert anthropic.repeated_usd == Decimal("0.001")
    assert report.repeated_call_ids == ["a", "d"]
    assert report.to_dict()["calls"]["openai"]["repeated_usd"] == 0.002


def test_an_answer_continued_by_a_second_provider_is_no_repeat() -> None:
    health = [_call("s", "openai", 0.001), _call("s", "anthropic", 0.002)]
    report = AuditReport()
    reconcile_calls(report, health, [_cost("s", ("openai", 0.001), ("anthropic", 0.002))])
    assert report.repeated_call_ids == [] and report.calls["openai"].answered == 1
