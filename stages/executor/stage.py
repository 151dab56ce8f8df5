"""executor: call the providers in the router's order, with retries and fallback (DESIGN A8).

Input ``ai.stage.execute`` (envelope with candidates). For each candidate in
turn, up to ``retry.max_attempts`` calls (the first included), each bounded by
the provider's ``timeout_ms`` and by the request's deadline; the decision
after a failure is ``stages.executor.retry.decide``. Every call publishes one
``health`` event on ``ai.control`` at once and is listed in the outcome's
``attempts``. Every HTTP call is first charged to the provider's RPM/TPM
limits (``stages.rules.rate_limits.admit``); a provider with no room is skipped for
now and tried again after the others, and when every candidate left is at
its limit the request waits for the first room within its deadline (else a
``rate_limit`` error). Output: the outcome to ``ai.stage.record``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import anyio
import httpx

from pipeline.bus.topics import Topics
from pipeline.errors import AIProviderError
from pipeline.runtime import telemetry
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.messages import ENVELOPE_DECODER, error_envelope, now_ms, to_record
from pipeline.runtime.runner import Emit, MessageContext, decode_or_invalid, now_utc
from schemas.envelope import Candidate, Envelope, Outcome
from schemas.events import Health
from schemas.request import AIRequest
from schemas.response import Attempt, ErrorInfo, Usage
from stages.executor.retry import decide
from stages.providers import ProviderAdapter, ProviderCall
from stages.rules.catalog import deployment_model_info
from stages.rules.circuit_view import CircuitView
from stages.rules.pricing import PriceTable
from stages.rules.rate_limits import Charge, MemoryRateLimiter, RateLimiter, admit, describe_limit
from stages.rules.tokens import estimate_messages_tokens

log = logging.getLogger("aipipe.executor")


def provider_call(request: AIRequest, model: str) -> ProviderCall:
    """The provider-neutral call for ``request`` on concrete ``model``."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return ProviderCall(
        model=model,
        messages=request.chat_messages(),
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=stop,
        user=request.user,
    )


def fits_context(config: PipelineConfig, candidate: Candidate, prompt_tokens: int, max_tokens: int) -> bool:
    """Whether the estimated prompt plus ``max_tokens`` fits the model's context window (unknown: yes).

    The window is the deployment's ``context_window``, else the catalog's (``deployment_model_info``).
    """
    info = deployment_model_info(config, candidate.provider, candidate.model)
    return info is None or prompt_tokens + max_tokens <= info.context_window


class ExecutorStage:
    """Calls providers through ``adapters`` on one shared HTTP ``client``."""

    name = "executor"

    def __init__(
        self,
        topics: Topics,
        config: PipelineConfig,
        adapters: Mapping[str, ProviderAdapter],
        client: httpx.AsyncClient,
        *,
        rng: random.Random | None = None,
        circuits: CircuitView | None = None,
        rate_limiter: RateLimiter | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        self.topics = topics
        self.prices = prices  # for the cost (USD) on an attempt's trace span only; the recorder prices the answer
        self.circuits = circuits or CircuitView()
        self.rate_limiter: RateLimiter = rate_limiter or MemoryRateLimiter()
        self.config = config
        self.adapters = adapters
        self.client = client
        self.rng = rng or random.Random()
        self.input_topic = topics.stage_execute

    def decode(self, raw: bytes) -> Envelope:
        """Decode an envelope.

        Raises:
            InvalidInput: when the value is not an envelope.
        """
        envelope: Envelope = decode_or_invalid(ENVELOPE_DECODER, raw)
        return envelope

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """An error outcome for ``request_id`` to the recorder."""
        return [to_record(self.topics.stage_record, error_envelope(request_id, error))]

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Try the candidates in order; the outcome goes to the recorder."""
        envelope: Envelope = value
        if envelope.request is None or envelope.outcome is not None:
            return [to_record(self.topics.stage_record, envelope)]
        outcome = await self.execute(envelope, ctx)
        envelope.outcome = outcome
        return [to_record(self.topics.stage_record, envelope)]

    async def execute(self, envelope: Envelope, ctx: MessageContext) -> Outcome:
        """Run the retry/fallback loop for one request and return its outcome."""
        request = envelope.request
        assert request is not None  # checked by handle
        attempts: list[Attempt] = []
        prompt_estimate = estimate_messages_tokens(request.chat_messages())
        remaining = list(envelope.candidates)
        last_error: AIProviderError | None = None
        calls: dict[str, int] = {}  # calls made per provider, kept across rate-limit waits
        saturated: list[tuple[Candidate, float]] = []  # no room yet: (candidate, wait s)
        while remaining or saturated:
            if not remaining:  # every candidate left is at its rate limit: wait for the first room
                if not await self._wait_for_room(envelope, saturated):
                    return self._saturated_outcome(attempts, saturated, envelope)
                remaining, saturated = [c for c, _ in saturated], []
            candidate = remaining.pop(0)
            adapter = self.adapters.get(candidate.provider)
            provider_cfg = self.config.providers.get(candidate.provider)
            if adapter is None or provider_cfg is None or not self.circuits.allows_traffic(candidate.provider):
                continue
            attempt_number = calls.get(candidate.provider, 0)
            while True:
                attempt_number += 1
                left_s = (envelope.deadline_at_ms - now_ms()) / 1000
                if left_s <= 0:
                    return self._deadline_outcome(attempts, request, last_error)
                timeout_s = min(provider_cfg.timeout_ms / 1000, left_s)
                charge = await admit(
                    self.rate_limiter, candidate.provider, provider_cfg.rate_limit, prompt_estimate, request.max_tokens
                )
                if not charge.admitted:  # no room now: the next candidate first, this one later
                    if charge.wait_s != float("inf"):
                        saturated.append((candidate, charge.wait_s))
                    break
                calls[candidate.provider] = attempt_number
                result = await self._attempt(
                    envelope, candidate, timeout_s, attempts, ctx, charge, attempt_number=attempt_number
                )
                if isinstance(result, Outcome):
                    return result
                error = last_error = result
                left_s = (envelope.deadline_at_ms - now_ms()) / 1000
                decision = decide(
                    error_type=error.error_type,
                    attempt_number=attempt_number,
                    policy=provider_cfg.retry,
                    remaining_s=left_s,
                    retry_after_s=error.retry_after_s,
                    allow_content_filter_fallback=self.config.allow_content_filter_fallback,
                    rng=self.rng,
                )
                if decision.action == "retry":
                    await anyio.sleep(decision.delay_s)
                    if not self.circuits.allows_traffic(candidate.provider):
                        break  # its circuit opened meanwhile: leave it alone, fall back
                    continue
                if decision.action == "fail":
                    return Outcome(
                        status="error",
                        attempts=attempts,
                        error=ErrorInfo(
                            type=error.error_type,
                            message=error.message,  # type: ignore[arg-type]
                            provider=candidate.provider,
                        ),
                    )
                if error.error_type == "context_length_exceeded":
                    remaining = [
                        c for c in remaining if fits_context(self.config, c, prompt_estimate, request.max_tokens)
                    ]
                    saturated = [
                        s for s in saturated if fits_context(self.config, s[0], prompt_estimate, request.max_tokens)
                    ]
                break
        if not attempts:
            return Outcome(
                status="error",
                error=ErrorInfo(type="all_providers_failed", message="no candidate provider could be called"),
            )
        summary = "; ".join(f"{a.provider}: {a.error_type} ({a.status_code or '-'})" for a in attempts)
        return Outcome(
            status="error",
            attempts=attempts,
            error=ErrorInfo(
                type="all_providers_failed",
                message=f"all providers failed after {len(attempts)} attempts: {summary}",
                provider=attempts[-1].provider,
            ),
        )

    async def _wait_for_room(self, envelope: Envelope, saturated: list[tuple[Candidate, float]]) -> bool:
        """Sleep until the first saturated candidate has room; False (no sleep) when that is past the deadline."""
        wait_s = min(w for _, w in saturated)
        left_s = (envelope.deadline_at_ms - now_ms()) / 1000
        if wait_s >= left_s:
            return False
        log.info("request %s: every candidate at its rate limit; waiting %.3f s for room", envelope.id, wait_s)
        await anyio.sleep(wait_s + 0.001)
        return True

    def _saturated_outcome(
        self, attempts: list[Attempt], saturated: list[tuple[Candidate, float]], envelope: Envelope
    ) -> Outcome:
        limits = ", ".join(
            f"{c.provider} ({describe_limit(self.config.providers[c.provider].rate_limit)}, room in {w:.1f} s)"
            for c, w in saturated
        )
        left_ms = max(0, envelope.deadline_at_ms - now_ms())
        return Outcome(
            status="error",
            attempts=attempts,
            error=ErrorInfo(
                type="rate_limit",
                message=f"every candidate is at its rate limit and none has room within the request's deadline "
                f"({left_ms} ms left): {limits}",
                provider=saturated[0][0].provider,
            ),
        )

    def _deadline_outcome(
        self, attempts: list[Attempt], request: AIRequest, last_error: AIProviderError | None
    ) -> Outcome:
        detail = f"; last error: {last_error.error_type}" if last_error else ""
        return Outcome(
            status="error",
            attempts=attempts,
            error=ErrorInfo(
                type="timeout",
                message=f"request deadline of {request.timeout_ms} ms passed after {len(attempts)} attempts{detail}",
                provider=attempts[-1].provider if attempts else None,
            ),
        )

    async def _attempt(
        self,
        envelope: Envelope,
        candidate: Candidate,
        timeout_s: float,
        attempts: list[Attempt],
        ctx: MessageContext,
        charge: Charge | None = None,
        *,
        attempt_number: int = 1,
    ) -> Outcome | AIProviderError:
        """One HTTP call; appends the attempt and publishes its health event; the ok outcome or the error.

        ``charge`` (the call's rate-limit charge) is corrected with the real
        usage after an answer, or settled as a failure (quota back when the
        call never left).
        """
        request = envelope.request
        assert request is not None
        adapter = self.adapters[candidate.provider]
        tel = telemetry.current()
        span = tel.start_attempt(candidate.provider, candidate.model, request, attempt_number, adapter.type)
        started = time.perf_counter()
        try:
            result = await adapter.complete(self.client, provider_call(request, candidate.model), timeout_s)
        except Exception as exc:
            latency_ms = (time.perf_counter() - started) * 1000
            tel.finish_attempt(
                span,
                candidate.provider,
                candidate.model,
                ok=False,
                status_code=exc.status_code if isinstance(exc, AIProviderError) else None,
                error_type=exc.error_type if isinstance(exc, AIProviderError) else type(exc).__name__,
                latency_ms=latency_ms,
            )
            if charge is not None:
                await charge.settle_failure(exc)
            if not isinstance(exc, AIProviderError):
                raise
            attempts.append(
                Attempt(
                    provider=candidate.provider,
                    model=candidate.model,
                    outcome="error",
                    error_type=exc.error_type,
                    status_code=exc.status_code,
                    latency_ms=round(latency_ms, 3),
                )
            )
            log.info(
                "request %s: %s/%s failed: %s (%s)",
                envelope.id,
                candidate.provider,
                candidate.model,
                exc.error_type,
                exc.status_code,
            )
            await self._health(
                envelope, candidate, False, exc.error_type, exc.status_code, latency_ms, ctx, exc.retry_after_s
            )
            return exc
        latency_ms = (time.perf_counter() - started) * 1000
        answered_model = result.model or candidate.model
        tel.finish_attempt(
            span,
            candidate.provider,
            candidate.model,
            ok=True,
            status_code=result.status_code,
            error_type=None,
            latency_ms=latency_ms,
            usage=result.usage,
            response_model=answered_model,
            cost_usd=lambda: self._cost_usd(candidate.provider, answered_model, result.usage),
        )
        if charge is not None:
            await charge.settle_answer(result.usage)
        attempts.append(
            Attempt(
                provider=candidate.provider,
                model=result.model or candidate.model,
                outcome="ok",
                status_code=result.status_code,
                latency_ms=round(latency_ms, 3),
            )
        )
        await self._health(envelope, candidate, True, None, result.status_code, latency_ms, ctx, None)
        return Outcome(
            status="ok",
            content=result.content,
            provider=candidate.provider,
            model=result.model or candidate.model,
            usage=result.usage,
            usage_source="estimated" if result.usage_estimated else "provider",
            attempts=attempts,
        )

    def _cost_usd(self, provider: str, model: str, usage: Usage) -> Decimal | None:
        """What ``usage`` cost (USD) at the price table, for the attempt's span; ``None`` without a price."""
        if self.prices is None:
            return None
        cfg = self.config.providers.get(provider)
        default = Decimal(str(cfg.cost_per_token)) if cfg is not None else None
        costing = self.prices.cost(provider, model, usage, default_cost_per_token=default)
        return None if costing.price_source == "none" else costing.cost_usd

    async def _health(
        self,
        envelope: Envelope,
        candidate: Candidate,
        ok: bool,
        error_type: str | None,
        status_code: int | None,
        latency_ms: float,
        ctx: MessageContext,
        retry_after_s: float | None,
    ) -> None:
        event = Health(
            provider=candidate.provider,
            model=candidate.model,
            ok=ok,
            error_type=error_type,
            status_code=status_code,
            latency_ms=round(latency_ms, 3),
            source="attempt",
            request_id=envelope.id,
            retry_after_s=retry_after_s,
            at=now_utc(),
        )
        await ctx.emit_now(Emit(self.topics.control, candidate.provider, event))
