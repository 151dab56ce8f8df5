"""cost-recorder: the single finalizer (DESIGN A3).

Input ``ai.stage.record`` (envelope with an outcome). For each request id it:
prices the provider's reported usage (``stages.rules.pricing``, Decimal USD),
writes one ``CostEvent`` to ``ai.costs`` for a ``status: ok`` outcome (cache
hits too, with ``cost_usd`` 0 and ``saved_usd``), releases the budget
reservation of an outcome without cost (``reservation_release`` on
``ai.control``), stores complete successful answers in the response cache
(then ends the request's coalescing claim, so identical requests waiting in
the cache stage are answered from it or go on), and publishes the final
``AIResponse`` to ``ai.responses``. A streamed answer (DESIGN A9) is priced per
part: one ``CostLine`` per attempt that generated tokens, so an answer begun
by one provider and continued by another charges each its own share; an
interrupted or cancelled stream that generated tokens gets a ``CostEvent``
too (``status`` names the outcome) and is never cached. A redelivered record gets the very same
response again (it is built from the record alone: the latency is the
envelope's ``finished_at_ms - received_at_ms``) and no second cost event; a
request executed twice (an executor that died after publishing its outcome but
before committing) is answered with the response already sent.

Memory: two ``stages.rules.recent_ids.RecentIds`` (``AIPIPE_DEDUP_WINDOW_S`` of
stream time, at most ``AIPIPE_DEDUP_MAX_IDS`` each): the responses this replica
sent (their JSON), and the ids with a cost event, fed by this recorder's own
writes and by its read-back of ``ai.costs`` (also after a restart, before it
writes any cost). A record can only come
back while its offset is uncommitted, i.e. among the records in flight when
a replica stopped: their cost events lie seconds apart in stream time
however late the restart. A record redelivered later than the window gets a
second cost event with the same id; readers of the whole topic (``aipipe
costs``, ``audit``) count an id once, and a budget gate that has forgotten
the id counts it twice, which refuses early rather than overspends.
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import anyio
import msgspec

from pipeline.bus.topics import Topics
from pipeline.runtime import telemetry
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.messages import ENVELOPE_DECODER, now_ms
from pipeline.runtime.runner import Emit, MessageContext, decode_or_invalid, encode, now_utc
from pipeline.stores.cache_store import CacheStore
from schemas.cache import CachedAnswer
from schemas.envelope import Envelope, Outcome, OutcomePart
from schemas.events import CostEvent, CostLine, ReservationRelease
from schemas.response import AIResponse, ErrorInfo
from stages.rules.pricing import PriceTable, round_usd
from stages.rules.recent_ids import RecentIds

#: Error outcomes whose parts generated billable tokens (DESIGN A9 streams, A4 invalid answers).
BILLED_ERRORS: frozenset[str] = frozenset({"stream_interrupted", "cancelled", "invalid_response"})
log = logging.getLogger("aipipe.recorder")

_RESPONSE_DECODER = msgspec.json.Decoder(AIResponse)


class RecorderStage:
    """Prices, records and answers each outcome exactly once per request id.

    Args:
        topics: topic names.
        config: the pipeline configuration (a deployment's ``cost_per_token`` fallback).
        prices: the price table (USD per million tokens).
        cache: the response cache to store answers in (``None``: none).
        costed: the memory of ids with a cost event (default: ``RecentIds()`` with
            the default window and count).
        answered: the memory of responses sent, by id (same default).
    """

    name = "recorder"

    def __init__(
        self,
        topics: Topics,
        config: PipelineConfig,
        prices: PriceTable,
        cache: CacheStore | None,
        *,
        costed: RecentIds | None = None,
        answered: RecentIds | None = None,
    ) -> None:
        self.topics = topics
        self.config = config
        self.prices = prices
        self.cache = cache
        self.input_topic = topics.stage_record
        # Ids with a CostEvent on ai.costs (written here or read back from the topic, also after a restart).
        self._costed = costed if costed is not None else RecentIds()
        # Ids answered by this replica -> the response sent (JSON), so a request executed twice (an
        # executor that died after its outcome was published but before its offset was committed)
        # is answered with the first response again.
        self._answered = answered if answered is not None else RecentIds()
        self._synced: list[anyio.Event] = []

    def on_cost(self, event: CostEvent) -> None:
        """Remember that ``event.id`` has its ``CostEvent`` (fed from ``ai.costs``), so none is written again."""
        self._costed.add(event.id, event.at.timestamp())

    def follow(self, *caught_up: anyio.Event) -> None:
        """Write no cost event before these are set (the ``ai.costs`` feed replayed what was written before)."""
        self._synced.extend(caught_up)

    def decode(self, raw: bytes) -> Envelope:
        """Decode an envelope.

        Raises:
            InvalidInput: when the value is not an envelope.
        """
        envelope: Envelope = decode_or_invalid(ENVELOPE_DECODER, raw)
        return envelope

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """Answer ``request_id`` with ``error`` directly (the recorder is the finalizer)."""
        response = AIResponse(id=request_id, status="error", error=error)
        return [Emit(self.topics.responses, request_id, response)]

    def _price(self, outcome: Outcome) -> tuple[Decimal, str]:
        return self._price_usage(outcome.provider or "", outcome.model or "", outcome)

    def _price_usage(self, provider: str, model: str, priced: Outcome | OutcomePart) -> tuple[Decimal, str]:
        """What ``priced.usage`` cost on ``provider``/``model`` (USD) and the price's source."""
        cfg = self.config.providers.get(provider)
        default = Decimal(str(cfg.cost_per_token)) if cfg is not None else None
        costing = self.prices.cost(provider, model, priced.usage, default_cost_per_token=default)
        return costing.cost_usd, costing.price_source

    def _billed(self, request_id: str, user: str | None, outcome: Outcome) -> tuple[CostEvent, Decimal]:
        """The cost event of an outcome that generated billable tokens, and its cost (USD).

        A streamed outcome is priced per part (one line each; its provider and
        model are the last part's, the one that answered last); any other
        from its provider, model and usage. ``status`` names how it ended.
        """
        lines: list[CostLine] = []
        if outcome.parts:
            lines, cost, source = self._lines(outcome)
            provider, model = outcome.parts[-1].provider, outcome.parts[-1].model
        else:
            cost, source = self._price(outcome)
            provider, model = outcome.provider or "", outcome.model or ""
        event = CostEvent(
            id=request_id,
            user=user,
            provider=provider,
            model=model,
            usage=outcome.usage,
            cost_usd=round_usd(cost),
            price_source=source,  # type: ignore[arg-type]
            usage_source=outcome.usage_source,
            at=now_utc(),
            lines=lines,
            status=outcome.error.type if outcome.error is not None else "ok",  # type: ignore[arg-type]
        )
        return event, cost

    def _lines(self, outcome: Outcome) -> tuple[list[CostLine], Decimal, str]:
        """One cost line per part of a streamed outcome: the lines, their total (USD) and the last price source."""
        lines: list[CostLine] = []
        total = Decimal(0)
        source = "none"
        for part in outcome.parts:
            cost, source = self._price_usage(part.provider, part.model, part)
            total += cost
            lines.append(
                CostLine(
                    provider=part.provider,
                    model=part.model,
                    usage=part.usage,
                    cost_usd=round_usd(cost),
                    usage_source=part.usage_source,
                )
            )
        return lines, total, source

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Finalize one outcome: response, cost event, cache write, reservation release."""
        envelope: Envelope = value
        sent = self._answered.get(envelope.id)
        if sent is not None:
            return [Emit(self.topics.responses, envelope.id, _RESPONSE_DECODER.decode(sent))]
        for synced in self._synced:
            if synced.is_set():  # the usual case: no cancel scope, no checkpoint per message
                continue
            with anyio.move_on_after(30.0):  # then go on: readers of ai.costs count an id once anyway
                await synced.wait()
        outcome = envelope.outcome or Outcome(
            status="error", error=ErrorInfo(type="server_error", message="no outcome reached the recorder")
        )
        finished = envelope.finished_at_ms if envelope.finished_at_ms is not None else now_ms()
        latency_ms = float(max(finished - envelope.received_at_ms, 0))
        user = envelope.request.user if envelope.request else None
        outputs: list[Emit] = []
        cost_usd = Decimal(0)
        event: CostEvent | None = None
        if outcome.status == "ok" and outcome.provider and outcome.model:
            if outcome.cached:
                priced, source = self._price(outcome)
                # what the call would cost now, at the price table; the stored cost when the model has no price
                saved = priced if source != "none" or not outcome.saved_usd else Decimal(str(outcome.saved_usd))
                event = CostEvent(
                    id=envelope.id,
                    user=user,
                    provider=outcome.provider,
                    model=outcome.model,
                    usage=outcome.usage,
                    cost_usd=0.0,
                    saved_usd=round_usd(saved),
                    cached=True,
                    price_source=source,  # type: ignore[arg-type]
                    at=now_utc(),
                )
            else:
                event, cost_usd = self._billed(envelope.id, user, outcome)
                await self._store(envelope, outcome, cost_usd)
        elif outcome.parts and outcome.error is not None and outcome.error.type in BILLED_ERRORS:
            # a stream that ended early, or answers that broke the response format, still generated tokens
            # someone is billed for (DESIGN A9, A4)
            event, cost_usd = self._billed(envelope.id, user, outcome)
        if event is not None:
            if envelope.id not in self._costed:  # one CostEvent per id, also for a redelivered record
                self._costed.add(envelope.id, event.at.timestamp())
                outputs.append(Emit(self.topics.costs, envelope.id, event))
        elif envelope.reserved_usd > 0:  # an outcome with no cost event gives its reservation back
            release = ReservationRelease(
                request_id=envelope.id,
                scope=",".join(envelope.reservation_scopes) or "global",
                amount_usd=envelope.reserved_usd,
                at=now_utc(),
            )
            outputs.append(Emit(self.topics.control, "*", release))
        if envelope.cache_key is not None and not outcome.cached:
            await self._finish_claim(envelope)
        response = AIResponse(
            id=envelope.id,
            status=outcome.status,
            content=outcome.content,
            provider=outcome.provider,
            model=outcome.model,
            usage=outcome.usage,
            cost_usd=round_usd(cost_usd),
            latency_ms=latency_ms,
            cached=outcome.cached,
            attempts=outcome.attempts,
            error=outcome.error,
            generation=outcome.generation,
            stream_chunks=outcome.stream_chunks,
            tool_calls=outcome.tool_calls,
            finish_reason=outcome.finish_reason,
        )
        telemetry.current().record_outcome(
            provider=outcome.provider,
            model=outcome.model,
            status=outcome.status,
            cached=outcome.cached,
            error_type=outcome.error.type if outcome.error is not None else None,
            latency_ms=latency_ms,
            usage=outcome.usage,
            cost_usd=cost_usd,
        )
        self._answered.add(envelope.id, finished / 1000, encode(response))
        outputs.append(Emit(self.topics.responses, envelope.id, response))
        return outputs

    async def _finish_claim(self, envelope: Envelope) -> None:
        """End the request's coalescing claim on its cache key (after any cache write), waking its waiters."""
        if self.cache is None or envelope.cache_key is None:
            return
        try:
            await self.cache.finish(envelope.cache_key, envelope.id)
        except Exception as exc:  # waiters then go on at the claim's expiry
            log.warning("cache claim release failed for %s: %s", envelope.id, type(exc).__name__)

    async def _store(self, envelope: Envelope, outcome: Outcome, cost_usd: Decimal) -> None:
        """Cache a complete successful answer: status ok, non-blank content or tool calls, usage with completion tokens.

        Errors, empty or whitespace-only answers (without tool calls) and answers
        without usage are never stored, nor are requests with ``cache.bypass`` or
        ``cache.ttl_s`` 0.
        """
        request = envelope.request
        if self.cache is None or envelope.cache_key is None or request is None:
            return
        if request.cache is not None and request.cache.bypass:
            return
        if outcome.status != "ok" or outcome.cached or not outcome.provider or not outcome.model:
            return
        has_text = bool(outcome.content and outcome.content.strip())
        if not (has_text or outcome.tool_calls) or outcome.usage.completion_tokens <= 0:
            return
        ttl = request.cache.ttl_s if request.cache and request.cache.ttl_s is not None else None
        ttl_s = self.config.cache.default_ttl_s if ttl is None else ttl
        answer = CachedAnswer(
            content=outcome.content or "",
            provider=outcome.provider or "",
            model=outcome.model or "",
            usage=outcome.usage,
            cost_usd=round_usd(cost_usd),
            stored_at_ms=now_ms(),
            tool_calls=outcome.tool_calls,
            finish_reason=outcome.finish_reason,
        )
        try:
            await self.cache.set(envelope.cache_key, answer, ttl_s)
        except Exception as exc:  # a cache outage must not lose the answer
            log.warning("cache write failed for %s: %s", envelope.id, type(exc).__name__)
