"""The demo's budget moment: three requests at once against a budget that fits one and a half.

A user's daily budget holds one request's worst case and a half; three
requests sent at once get one answer and ``budget_exceeded`` for the rest.

``budget_moment`` publishes ``set_budget user:demo-capped`` on ``ai.control``
(1.5 x the worst-case cost the gate reserves for one of the requests), waits
until the in-process gate has applied it, and sends three questions as that
user concurrently. The gate reserves the first one's worst case, so the
others do not fit while it is in flight, even though nothing has been spent
yet: that is what keeps concurrent requests from overspending.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

import anyio
import msgspec

from pipeline.assembly.build import Pipeline
from pipeline.bus.protocol import Bus
from pipeline.bus.topics import Topics
from pipeline.client.report_reader import publish_control, set_budget_event
from schemas.envelope import Envelope
from schemas.request import AIRequest, CacheOptions
from schemas.response import AIResponse
from stages.budget.stage import BudgetGateStage

#: The user whose budget the demo caps.
DEMO_BUDGET_USER: Final = "demo-capped"


@dataclass
class BudgetMoment:
    """What the budget moment showed: the limit (USD), one request's worst case (USD) and the answers."""

    limit_usd: Decimal = Decimal(0)
    worst_case_usd: Decimal = Decimal(0)
    responses: list[AIResponse] = field(default_factory=list)

    @property
    def refused(self) -> list[AIResponse]:
        """The answers refused with ``budget_exceeded``."""
        return [r for r in self.responses if r.error is not None and r.error.type == "budget_exceeded"]

    @property
    def shown(self) -> bool:
        """Whether at least one request was answered and at least one refused."""
        return any(r.status == "ok" for r in self.responses) and bool(self.refused)

    def line(self) -> str:
        """One summary line for the demo's output."""
        answered = sum(r.status == "ok" for r in self.responses)
        return (
            f"[bold]budget[/]: user:{DEMO_BUDGET_USER} daily ${self.limit_usd:.6f} (1.5 x a request's worst case "
            f"${self.worst_case_usd:.6f}); {len(self.responses)} sent at once: {answered} answered, "
            f"{len(self.refused)} budget_exceeded"
        )


async def budget_moment(
    bus: Bus,
    topics: Topics,
    pipeline: Pipeline,
    ask_one: Callable[[str, AIRequest], Awaitable[AIResponse]],
    first: Sequence[AIRequest],
) -> BudgetMoment:
    """Cap ``user:demo-capped`` and send three of ``first``'s questions as that user at once.

    Raises:
        TimeoutError: when the gate does not apply the budget within 10 s.
    """
    gate = pipeline.stages["budget"]
    assert isinstance(gate, BudgetGateStage)
    requests = [
        msgspec.structs.replace(
            r, id=f"{r.id}-capped", user=DEMO_BUDGET_USER, model="gpt-3.5-turbo", cache=CacheOptions(bypass=True)
        )
        for r in first[:3]
    ]
    worst = max(gate.worst_case_usd(Envelope(id=r.id, request=r, received_at_ms=0, deadline_at_ms=0)) for r in requests)
    moment = BudgetMoment(limit_usd=(worst * 3 / 2).quantize(Decimal("1e-9")), worst_case_usd=worst)
    event = set_budget_event(f"user:{DEMO_BUDGET_USER}", daily=float(moment.limit_usd))
    await publish_control(bus, topics, event)
    with anyio.fail_after(10):
        while gate.ledger.limits.get(event.scope) is None:
            await anyio.sleep(0.01)

    async def one(request: AIRequest) -> None:
        moment.responses.append(await ask_one("budget", request))

    async with anyio.create_task_group() as tg:
        for request in requests:
            tg.start_soon(one, request)
    return moment
