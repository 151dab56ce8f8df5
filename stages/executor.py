"""executor: call the providers in the router's order, with retries and fallback (DESIGN A8).

Input ``ai.stage.execute`` (envelope with candidates). For each candidate in
turn, up to ``retry.max_attempts`` calls (the first included), each bounded by
the provider's ``timeout_ms`` and by the request's deadline; the decision
after a failure is ``stages.retry.decide``. Every call publishes one
``health`` event on ``ai.control`` at once and is listed in the outcome's
``attempts``. Output: the outcome to ``ai.stage.record``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from pipeline.config import PipelineConfig
from pipeline.errors import AIProviderError
from pipeline.runner import Emit, MessageContext, decode_or_invalid, now_utc
from pipeline.topics import Topics
from schemas.envelope import Candidate, Envelope, Outcome
from schemas.events import Health
from schemas.request import AIRequest
from schemas.response import Attempt, ErrorInfo
from stages.circuits import CircuitView
from stages.common import ENVELOPE_DECODER, error_envelope, now_ms, to_record
from stages.providers import ProviderAdapter, ProviderCall, model_info
from stages.providers.tokens import estimate_messages_tokens
from stages.retry import decide

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


def fits_context(candidate: Candidate, prompt_tokens: int, max_tokens: int) -> bool:
    """Whether the estimated prompt plus ``max_tokens`` fits the model's context window (unknown: yes)."""
    info = model_info(candidate.provider, candidate.model)
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
    ) -> None:
        self.topics = topics
        self.circuits = circuits or CircuitView()
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
        while remaining:
            candidate = remaining.pop(0)
            adapter = self.adapters.get(candidate.provider)
            provider_cfg = self.config.providers.get(candidate.provider)
            if adapter is None or provider_cfg is None or not self.circuits.allows_traffic(candidate.provider):
                continue
            attempt_number = 0
            while True:
                attempt_number += 1
                left_s = (envelope.deadline_at_ms - now_ms()) / 1000
                if left_s <= 0:
                    return self._deadline_outcome(attempts, request, last_error)
                timeout_s = min(provider_cfg.timeout_ms / 1000, left_s)
                result = await self._attempt(envelope, candidate, timeout_s, attempts, ctx)
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
                    remaining = [c for c in remaining if fits_context(c, prompt_estimate, request.max_tokens)]
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
    ) -> Outcome | AIProviderError:
        """One HTTP call; appends the attempt and publishes its health event; the ok outcome or the error."""
        request = envelope.request
        assert request is not None
        adapter = self.adapters[candidate.provider]
        started = time.perf_counter()
        try:
            result = await adapter.complete(self.client, provider_call(request, candidate.model), timeout_s)
        except AIProviderError as exc:
            latency_ms = (time.perf_counter() - started) * 1000
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
            attempts=attempts,
        )

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
