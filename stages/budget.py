"""budget-gate: refuse requests whose budget is spent; reserve the worst case of the rest.

Input ``ai.stage.budget`` (envelope). Admitted requests go to
``ai.stage.route`` with ``reserved_usd`` (the worst-case cost, USD: estimated
prompt tokens plus ``max_tokens`` at the most expensive provider serving the
model); refused ones go to the recorder with ``budget_exceeded``. The gate
learns spend from ``ai.costs`` (``on_cost``) and limits, releases from
``ai.control`` (``on_control``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from pipeline.config import PipelineConfig
from pipeline.runner import Emit, MessageContext, decode_or_invalid
from pipeline.topics import Topics
from schemas.envelope import Envelope
from schemas.events import ControlEvent, CostEvent, ReservationRelease, SetBudget
from schemas.response import ErrorInfo, Usage
from stages.common import ENVELOPE_DECODER, error_envelope, to_record
from stages.ledger import BudgetLedger, Limits, scopes_for
from stages.pricing import PriceTable
from stages.providers.tokens import estimate_messages_tokens
from stages.routing import serving_providers

log = logging.getLogger("aipipe.budget")


def _dec(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(str(value))


class BudgetGateStage:
    """Admits requests within every budget window of their scopes (``global``, ``user:NAME``)."""

    name = "budget"

    def __init__(self, topics: Topics, config: PipelineConfig, prices: PriceTable, ledger: BudgetLedger) -> None:
        self.topics = topics
        self.config = config
        self.prices = prices
        self.ledger = ledger
        self.input_topic = topics.stage_budget
        if config.budget.global_daily_usd is not None:
            ledger.set_limits("global", Limits(daily=_dec(config.budget.global_daily_usd)))

    def decode(self, raw: bytes) -> Envelope:
        """Decode an envelope.

        Raises:
            InvalidInput: when the value is not an envelope.
        """
        envelope: Envelope = decode_or_invalid(ENVELOPE_DECODER, raw)
        return envelope

    def worst_case_usd(self, envelope: Envelope) -> Decimal:
        """Worst-case cost (USD) of the request: estimated prompt and ``max_tokens`` at the dearest provider."""
        request = envelope.request
        if request is None:
            return Decimal(0)
        prompt_tokens = estimate_messages_tokens(request.chat_messages())
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=request.max_tokens,
            total_tokens=prompt_tokens + request.max_tokens,
        )
        worst = Decimal(0)
        for cand in serving_providers(self.config, request.model):
            provider = self.config.providers[cand.provider]
            cost = self.prices.cost(
                cand.provider, cand.model, usage, default_cost_per_token=Decimal(str(provider.cost_per_token))
            ).cost_usd
            worst = max(worst, cost)
        return worst

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Reserve and pass on, or refuse with ``budget_exceeded``."""
        envelope: Envelope = value
        if envelope.request is None:
            return [to_record(self.topics.stage_record, envelope)]
        scopes = scopes_for(envelope.request.user)
        amount = self.worst_case_usd(envelope)
        now = datetime.now(UTC)
        expires = datetime.fromtimestamp(envelope.deadline_at_ms / 1000, UTC)
        verdict = self.ledger.reserve(envelope.id, scopes, amount, now, expires)
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

    def on_cost(self, event: CostEvent) -> None:
        """Settle a request's reservation with its real cost (idempotent per id)."""
        if event.cached:
            self.ledger.release(event.id)
            return
        scopes = scopes_for(event.user, event.provider)
        self.ledger.settle(event.id, scopes, Decimal(str(event.cost_usd)), event.at)

    def on_control(self, event: ControlEvent) -> None:
        """Apply ``set_budget`` commands and ``reservation_release`` events."""
        if isinstance(event, ReservationRelease):
            self.ledger.release(event.request_id)
        elif isinstance(event, SetBudget):
            self.ledger.set_limits(
                event.scope,
                Limits(daily=_dec(event.daily_usd), weekly=_dec(event.weekly_usd), monthly=_dec(event.monthly_usd)),
            )
            log.info(
                "budget for %s set: daily=%s weekly=%s monthly=%s",
                event.scope,
                event.daily_usd,
                event.weekly_usd,
                event.monthly_usd,
            )
