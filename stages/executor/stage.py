"""executor: call the providers in the router's order, with skips, retries and fallback (DESIGN A8).

Input ``ai.stage.execute`` (envelope with candidates). Each candidate in turn
is first checked without a call: a circuit that is not ``CLOSED``, a context
window that cannot hold the prompt's real token count plus ``max_tokens``
(``stages.rules.tokens``), or a provider budget with no room for the call's
worst case (held per attempt, ``stages.executor.budgets``) skip it; a skip is
listed in ``attempts`` (``outcome: "skipped"``, ``reason``) and publishes no
health event. Otherwise up to ``retry.max_attempts`` calls (the first
included), each bounded by the provider's ``timeout_ms``, by the request's
deadline and by a reserve for the next untried candidate
(``stages.executor.chain``); the decision after a failure is
``stages.executor.retry.decide``, and an attempt that hung is retried only
when no other candidate is left. Every call publishes one ``health`` event on
``ai.control`` at once and is listed in ``attempts``. Every HTTP call is first
charged to the provider's RPM/TPM limits (``stages.rules.rate_limits.admit``;
a call refused before sending gives its charge back); a provider with no
room is tried again after the others, and when every candidate left is at its
limit the request waits for the first room within its deadline (else a
``rate_limit`` error). The chain's error follows ``stages.executor.chain``.
Output: the outcome to ``ai.stage.record``.

A request with ``stream: true`` is called through each adapter's streaming
API and its answer is published as ``StreamChunk``s while it arrives
(``stages.executor.streaming``, DESIGN A9): failures before the first chunk
fall back as above; after it the request ends ``stream_interrupted`` with the
partial content, or, with ``stream_resume``, the next call continues the
partial text. A ``cancel_request`` on ``ai.control`` stops the call; the
request ends ``cancelled`` with the cost of what was generated.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Literal, cast

import anyio
import httpx
import msgspec
from cachetools import TTLCache

from pipeline.bus.topics import Topics
from pipeline.errors import AIProviderError, InvalidResponseError, ProviderTimeoutError, UntranslatableRequestError
from pipeline.runtime import telemetry
from pipeline.runtime.config import PipelineConfig, ProviderConfig
from pipeline.runtime.messages import ENVELOPE_DECODER, error_envelope, new_generation, now_ms, to_record
from pipeline.runtime.runner import Emit, MessageContext, decode_or_invalid, now_utc
from pipeline.stores.blob_store import BlobStore, MissingBlobError, resolve_images
from schemas.envelope import Candidate, Envelope, Outcome, OutcomePart
from schemas.events import CancelRequest, Health
from schemas.request import AIRequest, Message, ToolCall
from schemas.response import Attempt, ErrorInfo, FinishReason, Usage
from stages.executor.budgets import Hold, ProviderBudgets
from stages.executor.chain import LatencyWindow, attempt_timeout_s, final_error, reserve_s
from stages.executor.retry import Decision, decide
from stages.executor.streaming import StreamRun, part_usage, read_stream, timeout_error, total_usage
from stages.providers import ProviderAdapter, ProviderCall
from stages.providers.classify import redact
from stages.providers.sse import stream_cut
from stages.rules.catalog import capability_reason, deployment_lacks, deployment_model_info
from stages.rules.circuit_view import CircuitView
from stages.rules.images import ImageError
from stages.rules.pricing import PriceTable
from stages.rules.rate_limits import Charge, MemoryRateLimiter, RateLimiter, admit, describe_limit
from stages.rules.structured import answer_problem, schema_problems, tool_choice_problem
from stages.rules.tokens import PromptTokens, estimate_messages_tokens, prompt_messages

log = logging.getLogger("aipipe.executor")

#: A ``timeout`` attempt that used at least this share of its time limit hung (is not retried while
#: another candidate is left); a faster one (connection refused) is a fast failure, retried as usual.
HUNG_FRACTION = 0.5


#: How long (s) a ``cancel_request`` for a request not (yet) running here is remembered, and how many.
CANCEL_MEMORY_S = 600.0
#: Longest wait (s) of a streamed request for the control feed's replay after a (re)start.
CONTROL_REPLAY_WAIT_S = 5.0
CANCEL_MEMORY_IDS = 10_000


def provider_call(
    request: AIRequest, model: str, continuation: str | None = None, messages: list[Message] | None = None
) -> ProviderCall:
    """The provider-neutral call for ``request`` on concrete ``model``, continuing ``continuation`` if given.

    ``messages`` replaces the request's turns (its images resolved from the blob store).
    """
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    return ProviderCall(
        model=model,
        messages=messages if messages is not None else request.chat_messages(),
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=stop,
        user=request.user,
        continuation=continuation or None,
        tools=request.tools,
        tool_choice=request.tool_choice,
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=request.response_format,
    )


_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})


def finish_reason(raw: str | None, tool_calls: list[ToolCall] | None) -> FinishReason:
    """The answer's ``finish_reason`` in OpenAI's words (DESIGN A4).

    ``tool_calls`` when it has tool calls, else the provider's when it is one of
    the four, and ``stop`` for any other ending, or when it named none (Workers
    AI's answers carry no finish reason).
    """
    if tool_calls:
        return "tool_calls"
    return cast(FinishReason, raw) if raw in _FINISH_REASONS else "stop"


def fits_context(config: PipelineConfig, candidate: Candidate, prompt_tokens: int, max_tokens: int) -> bool:
    """Whether the estimated prompt plus ``max_tokens`` fits the model's context window (unknown: yes).

    The window is the deployment's ``context_window``, else the catalog's (``deployment_model_info``).
    """
    info = deployment_model_info(config, candidate.provider, candidate.model)
    return info is None or prompt_tokens + max_tokens <= info.context_window


def _skipped(candidate: Candidate, error_type: str, reason: str) -> Attempt:
    """The attempt that records a skip: no call, no health event, no breaker or latency sample."""
    return Attempt(
        provider=candidate.provider, model=candidate.model, outcome="skipped", error_type=error_type, reason=reason
    )


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
        budgets: ProviderBudgets | None = None,
        secrets: tuple[str, ...] = (),
        control_ready: anyio.Event | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.topics = topics
        self.blobs = blobs  # the image claim check's store (DESIGN A4); None: references cannot be resolved
        self._messages: dict[str, list[Message]] = {}  # request id -> its turns with images resolved, while it runs
        self._invalid_parts: dict[str, list[OutcomePart]] = {}  # request id -> answers that broke its format
        # set once the control feed has replayed ai.control: cancel_request events sent while no executor ran
        self.control_ready = control_ready
        self.budgets = budgets  # provider budgets, held per attempt (``stages.executor.budgets``)
        self.latencies = LatencyWindow()
        self._last_errors: dict[str, str] = {}  # request id -> its last failure's message, while it runs
        # every credential of every deployment: a provider may echo any of them in an error text
        self._secrets = (*secrets, *(s for a in adapters.values() for s in getattr(a, "secret_values", tuple)()))
        self.prices = prices  # for the cost (USD) on an attempt's trace span only; the recorder prices the answer
        self.circuits = circuits or CircuitView()
        self.rate_limiter: RateLimiter = rate_limiter or MemoryRateLimiter()
        self.config = config
        self.adapters = adapters
        self.client = client
        self.rng = rng or random.Random()
        self.input_topic = topics.stage_execute
        self._streams: dict[str, StreamRun] = {}  # request id -> its running stream (for cancel_request)
        self._cancelled: TTLCache[str, bool] = TTLCache(maxsize=CANCEL_MEMORY_IDS, ttl=CANCEL_MEMORY_S)

    def on_control(self, event: object) -> None:
        """Follow ``ai.control``: a ``cancel_request`` stops the stream of its request (now, or when it starts)."""
        if isinstance(event, CancelRequest):
            self._cancelled[event.request_id] = True
            run = self._streams.get(event.request_id)
            if run is not None:
                run.cancelled.set()

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
        """Run the skip/retry/fallback chain for one request and return its outcome (module docstring)."""
        run = self._stream_run(envelope)
        if run is not None and self.control_ready is not None and not self.control_ready.is_set():
            with anyio.move_on_after(CONTROL_REPLAY_WAIT_S):  # a cancel sent while no executor ran applies
                await self.control_ready.wait()
            if self._cancelled.get(envelope.id):
                run.cancelled.set()
        try:
            outcome = await self._chain(envelope, ctx, run)
            if run is None:
                return outcome
            outcome = self._stream_outcome(run, outcome)
            ended = outcome.error.type if outcome.error is not None else None
            kind = {"stream_interrupted": "interrupted", "cancelled": "cancelled"}.get(ended or "", None)
            if kind is None:
                kind = "resumed" if any(a.resumed for a in outcome.attempts) else "completed"
            if outcome.status == "ok" or kind in ("interrupted", "cancelled"):
                telemetry.current().record_stream(outcome.provider, kind, run.seq)
            return outcome
        finally:
            self._last_errors.pop(envelope.id, None)
            self._messages.pop(envelope.id, None)
            self._invalid_parts.pop(envelope.id, None)
            if run is not None:
                self._streams.pop(envelope.id, None)

    def _stream_run(self, envelope: Envelope) -> StreamRun | None:
        """A new generation for a streamed request (``None`` for a plain one)."""
        request = envelope.request
        if request is None or not request.stream:
            return None
        cfg = self.config.stream
        topic = request.stream_topic if request.stream_topic else self.topics.stream
        if not self.topics.is_stream_topic(topic):
            topic = self.topics.stream
        left_s = (envelope.deadline_at_ms - now_ms()) / 1000
        max_s = cfg.max_duration_ms / 1000 if cfg.max_duration_ms is not None else None
        by_max = max_s is not None and max_s < left_s
        run = StreamRun(
            request_id=envelope.id,
            topic=topic,
            generation=new_generation(),
            flush_s=cfg.flush_ms / 1000,
            idle_timeout_s=cfg.idle_timeout_ms / 1000,
            resume=request.stream_resume if request.stream_resume is not None else cfg.resume,
            ends_at=time.monotonic() + (max_s if by_max and max_s is not None else left_s),
            ends_by="max_duration" if by_max else "deadline",
        )
        if self._cancelled.get(envelope.id):
            run.cancelled.set()
        self._streams[envelope.id] = run
        return run

    def _stream_outcome(self, run: StreamRun, outcome: Outcome) -> Outcome:
        """Stamp a streamed request's outcome; an error after chunks were published is ``stream_interrupted``."""
        outcome.generation = run.generation
        outcome.stream_chunks = run.seq
        if run.parts and not outcome.parts:
            outcome.parts = list(run.parts)
        if outcome.status == "error" and run.started:
            error = outcome.error
            if error is None or error.type not in ("stream_interrupted", "cancelled", "invalid_response"):
                reason = error.type if error is not None else "provider_error"
                outcome.error = ErrorInfo(
                    type="stream_interrupted",
                    message=f"the stream was interrupted after {run.seq} chunks and no candidate could continue it"
                    + (f": {error.message}" if error is not None else ""),
                    provider=error.provider if error is not None else None,
                    reason=reason,
                )
            outcome.content = run.text
            outcome.usage = total_usage(run.parts)
            if run.parts:
                outcome.provider = outcome.provider or run.parts[-1].provider
                outcome.model = outcome.model or run.parts[-1].model
                if any(p.usage_source == "estimated" for p in run.parts):
                    outcome.usage_source = "estimated"
        return outcome

    async def _chain(self, envelope: Envelope, ctx: MessageContext, run: StreamRun | None = None) -> Outcome:
        request = envelope.request
        assert request is not None  # checked by handle
        attempts: list[Attempt] = []
        refused = await self._prepare(envelope)
        if refused is not None:
            return refused
        counted = prompt_messages(request)
        prompt = PromptTokens(counted)
        prompt_estimate = estimate_messages_tokens(counted)  # RPM/TPM charges, corrected after
        remaining = list(envelope.candidates)
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
            if adapter is None or provider_cfg is None:
                continue
            skip = self._skip_reason(candidate, request, prompt)
            if skip is not None:
                attempts.append(_skipped(candidate, *skip))
                continue
            hold = await self._hold(envelope, candidate, prompt)
            if hold is not None and hold.refused:
                kind = "service_unavailable" if hold.unavailable else "budget_exceeded"
                attempts.append(_skipped(candidate, kind, hold.reason or ""))
                continue
            try:
                turn = await self._candidate_turn(
                    envelope,
                    candidate,
                    provider_cfg,
                    hold,
                    prompt_estimate,
                    attempts,
                    calls,
                    remaining,
                    saturated,
                    ctx,
                    run,
                )
            except BaseException:
                if hold is not None:
                    with anyio.CancelScope(shield=True):
                        await self.budgets_release(hold)
                raise
            if turn is not None:
                return turn
        outcome = Outcome(
            status="error", attempts=attempts, error=final_error(attempts, self._last_errors.pop(envelope.id, None))
        )
        return self._with_invalid_parts(envelope, outcome)

    async def _prepare(self, envelope: Envelope) -> Outcome | None:
        """Check what only the executor can and resolve the request's images; an error outcome, or ``None`` to go on.

        A JSON Schema that is not a valid schema, and stored image bytes that
        are not the type their reference names, are ``invalid_request``; an
        image reference missing from the blob store (or not matching its hash)
        and a blob store that cannot be read are ``service_unavailable``.
        """
        request = envelope.request
        assert request is not None
        problem = schema_problems(request.response_format, request.tools)
        if problem is None:
            try:
                self._messages[envelope.id] = await resolve_images(
                    request.chat_messages(), self.blobs, max_bytes=self.config.images.max_bytes
                )
                return None
            except ImageError as exc:  # bytes a producer stored that are no image of the type named
                problem = str(exc)
            except MissingBlobError as exc:  # lost or unshared state: the pipeline's, and a retry may work
                return Outcome(status="error", error=ErrorInfo(type="service_unavailable", message=str(exc)))
            except Exception as exc:  # the store is down: the request cannot be sent with its images
                log.warning("request %s: blob store unreadable: %s", envelope.id, type(exc).__name__)
                return Outcome(
                    status="error",
                    error=ErrorInfo(
                        type="service_unavailable",
                        message=f"the image blob store could not be read ({type(exc).__name__}); try again",
                    ),
                )
        return Outcome(status="error", error=ErrorInfo(type="invalid_request", message=problem))

    def _with_invalid_parts(self, envelope: Envelope, outcome: Outcome) -> Outcome:
        """Bill answers that broke the response format (one cost line each, DESIGN A4) with the outcome's own."""
        invalid = self._invalid_parts.get(envelope.id)
        if not invalid or outcome.parts:
            return outcome
        parts = list(invalid)
        if outcome.status == "ok" and outcome.provider and outcome.model:
            parts.append(
                OutcomePart(
                    provider=outcome.provider,
                    model=outcome.model,
                    usage=outcome.usage,
                    usage_source=outcome.usage_source,
                )
            )
        outcome.parts = parts
        if outcome.status == "error":  # no answer: what was generated is the invalid answers' (tokens)
            outcome.usage = total_usage(parts)
        return outcome

    async def _candidate_turn(
        self,
        envelope: Envelope,
        candidate: Candidate,
        provider_cfg: ProviderConfig,
        hold: Hold | None,
        prompt_estimate: int,
        attempts: list[Attempt],
        calls: dict[str, int],
        remaining: list[Candidate],
        saturated: list[tuple[Candidate, float]],
        ctx: MessageContext,
        run: StreamRun | None = None,
    ) -> Outcome | None:
        """Calls to one candidate, retried per DESIGN A8; the request's outcome, or ``None`` to fall back.

        A held provider budget is settled with the answer's usage, or released
        when the turn ends without an answer.
        """
        request = envelope.request
        assert request is not None
        attempt_number = calls.get(candidate.provider, 0)
        while True:
            attempt_number += 1
            left_s = (envelope.deadline_at_ms - now_ms()) / 1000
            if left_s <= 0:
                await self.budgets_release(hold)
                return self._deadline_outcome(attempts, request)
            following = remaining[0].provider if remaining else saturated[0][0].provider if saturated else None
            reserve = reserve_s(following, self.latencies, provider_cfg.retry.fallback_reserve_ms)
            limit_ms = provider_cfg.first_chunk_timeout_ms if run is not None else provider_cfg.timeout_ms
            timeout_s = attempt_timeout_s(limit_ms / 1000, left_s, reserve)
            charge = await admit(
                self.rate_limiter, candidate.provider, provider_cfg.rate_limit, prompt_estimate, request.max_tokens
            )
            if not charge.admitted:  # no room now: the next candidate first, this one later
                if charge.wait_s != float("inf"):
                    saturated.append((candidate, charge.wait_s))
                await self.budgets_release(hold)
                return None
            calls[candidate.provider] = attempt_number
            if run is not None:
                result = await self._stream_attempt(
                    envelope, candidate, timeout_s, attempts, ctx, charge, run, attempt_number=attempt_number
                )
            else:
                result = await self._attempt(
                    envelope, candidate, timeout_s, attempts, ctx, charge, attempt_number=attempt_number
                )
            if isinstance(result, Outcome):
                result = self._with_invalid_parts(envelope, result)
                if hold is not None and self.budgets is not None:
                    usage = result.usage if run is None else total_usage(run.attempt_parts(candidate.provider))
                    await self.budgets.settle(hold, result.model or candidate.model, usage)
                return result
            if run is not None and run.unsettled is not None:  # a part generated, then the stream broke
                if hold is not None and self.budgets is not None:
                    await self.budgets.settle(hold, run.unsettled.model, run.unsettled.usage)
                    hold = None
                run.unsettled = None
            error = result
            if isinstance(error, UntranslatableRequestError):  # skipped: the next candidate, no retry
                await self.budgets_release(hold)
                return None
            invalid = self._invalid_parts.get(envelope.id)
            if isinstance(error, InvalidResponseError) and invalid and hold is not None and self.budgets is not None:
                await self.budgets.settle(hold, invalid[-1].model, invalid[-1].usage)  # generated, so spent
                hold = None
            left_s = (envelope.deadline_at_ms - now_ms()) / 1000
            if left_s <= 0:
                await self.budgets_release(hold)
                return self._deadline_outcome(attempts, request)
            decision = decide(
                error_type=error.error_type,
                attempt_number=attempt_number,
                policy=provider_cfg.retry,
                remaining_s=left_s,
                retry_after_s=error.retry_after_s,
                allow_content_filter_fallback=self.config.allow_content_filter_fallback,
                rng=self.rng,
            )
            hung = error.error_type == "timeout" and attempts[-1].latency_ms >= HUNG_FRACTION * timeout_s * 1000
            if decision.action == "retry" and (hung or (run is not None and run.started)) and (remaining or saturated):
                # a hanging provider, or one that broke a stream mid-answer, is retried only when no other is left
                decision = Decision("fallback")
            if decision.action == "retry":
                await anyio.sleep(decision.delay_s)
                if not self.circuits.allows_traffic(candidate.provider):
                    await self.budgets_release(hold)
                    return None  # its circuit opened meanwhile: leave it alone, fall back
                continue
            await self.budgets_release(hold)
            if decision.action == "fail":
                return Outcome(
                    status="error",
                    attempts=attempts,
                    error=ErrorInfo(
                        type=error.error_type,
                        message=redact(error.message, self._secrets),  # type: ignore[arg-type]
                        provider=candidate.provider,
                    ),
                )
            return None

    def _skip_reason(self, candidate: Candidate, request: AIRequest, prompt: PromptTokens) -> tuple[str, str] | None:
        """Why ``candidate`` cannot serve ``request`` without a call (``(error type, reason)``), or ``None``.

        Its circuit is not ``CLOSED``, its model lacks a capability the request
        needs (``invalid_request``, DESIGN A4), or its context window cannot
        hold the prompt's token count plus ``max_tokens`` (DESIGN A8).
        """
        if not self.circuits.allows_traffic(candidate.provider):
            return "all_providers_failed", f"circuit {self.circuits.state(candidate.provider)}"
        lacking = deployment_lacks(self.config, candidate.provider, candidate.model, request)
        if lacking is not None:
            return "invalid_request", capability_reason(candidate.model, lacking)
        info = deployment_model_info(self.config, candidate.provider, candidate.model)
        if info is not None and not prompt.fits(info.context_window, request.max_tokens):
            return (
                "context_length_exceeded",
                f"prompt of {prompt.count} tokens + max_tokens {request.max_tokens} > context window "
                f"{info.context_window} of {candidate.model}",
            )
        return None

    async def _hold(self, envelope: Envelope, candidate: Candidate, prompt: PromptTokens) -> Hold | None:
        """Hold the call's worst case on the provider's budget, when it has one (``None``: no budgets here)."""
        request = envelope.request
        if self.budgets is None or request is None or not self.budgets.limited(candidate.provider):
            return None
        return await self.budgets.hold(
            envelope.id, candidate.provider, candidate.model, prompt.count, request.max_tokens, envelope.deadline_at_ms
        )

    async def budgets_release(self, hold: Hold | None) -> None:
        """Release a held provider budget (nothing when none is held)."""
        if hold is not None and self.budgets is not None:
            await self.budgets.release(hold)

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

    def _deadline_outcome(self, attempts: list[Attempt], request: AIRequest) -> Outcome:
        """A passed deadline is always ``timeout`` (DESIGN A8), naming the last real failure."""
        failures = [a for a in attempts if a.outcome == "error"]
        detail = f"; last error: {failures[-1].error_type}" if failures else ""
        return Outcome(
            status="error",
            attempts=attempts,
            error=ErrorInfo(
                type="timeout",
                message=f"request deadline of {request.timeout_ms} ms passed after {len(failures)} attempts{detail}",
                provider=failures[-1].provider if failures else None,
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
        span = tel.start_attempt(
            candidate.provider, candidate.model, request, attempt_number, getattr(adapter, "type", None)
        )
        started = time.perf_counter()
        call = provider_call(request, candidate.model, messages=self._messages.get(envelope.id))
        try:
            result = await adapter.complete(self.client, call, timeout_s)
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
            if isinstance(exc, UntranslatableRequestError):  # nothing was sent: a skip, like a missing capability
                attempts.append(_skipped(candidate, "invalid_request", redact(exc.message, self._secrets)))
                return exc
            log.info(
                "request %s: %s/%s failed: %s (%s)",
                envelope.id,
                candidate.provider,
                candidate.model,
                exc.error_type,
                exc.status_code,
            )
            await self._failed(envelope, candidate, exc, attempts, latency_ms, ctx)
            return exc
        latency_ms = (time.perf_counter() - started) * 1000
        self.latencies.add(candidate.provider, latency_ms)
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
        await self._health(
            envelope,
            candidate,
            True,
            None,
            result.status_code,
            latency_ms,
            ctx,
            None,
            usage=result.usage,
            cost_usd=self._cost_usd(candidate.provider, answered_model, result.usage),
        )
        source: Literal["provider", "estimated"] = "estimated" if result.usage_estimated else "provider"
        problem = tool_choice_problem(request, result.tool_calls) or (
            answer_problem(request.response_format, result.content) if not result.tool_calls else None
        )
        if problem is not None:  # the provider is healthy (its health event says so); the answer is unusable
            attempts[-1] = msgspec.structs.replace(
                attempts[-1], outcome="error", error_type="invalid_response", reason=problem
            )
            self._invalid_parts.setdefault(envelope.id, []).append(
                OutcomePart(provider=candidate.provider, model=answered_model, usage=result.usage, usage_source=source)
            )
            message = (
                f"{candidate.provider}/{answered_model}: the answer does not hold to the response format: {problem}"
            )
            self._last_errors[envelope.id] = message
            return InvalidResponseError(message, provider=candidate.provider, status_code=result.status_code)
        return Outcome(
            status="ok",
            content=result.content if result.content or not result.tool_calls else None,
            provider=candidate.provider,
            model=answered_model,
            usage=result.usage,
            usage_source=source,
            attempts=attempts,
            tool_calls=result.tool_calls,
            finish_reason=finish_reason(result.finish_reason, result.tool_calls),
        )

    async def _stream_attempt(
        self,
        envelope: Envelope,
        candidate: Candidate,
        first_chunk_timeout_s: float,
        attempts: list[Attempt],
        ctx: MessageContext,
        charge: Charge | None,
        run: StreamRun,
        *,
        attempt_number: int = 1,
    ) -> Outcome | AIProviderError:
        """One streamed call (module docstring): the ok outcome, an interrupted or cancelled one, or the error.

        The error is returned (for the chain to retry or fall back) when no
        chunk was published yet, or when ``run.resume`` lets the next call
        continue the text; a part this attempt generated is added to
        ``run.parts`` either way (and left in ``run.unsettled`` for the
        provider budget when the attempt failed).
        """
        request = envelope.request
        assert request is not None
        adapter = self.adapters[candidate.provider]
        tel = telemetry.current()
        span = tel.start_attempt(
            candidate.provider, candidate.model, request, attempt_number, getattr(adapter, "type", None)
        )
        resumed = run.started
        call = provider_call(request, candidate.model, run.text if resumed else None, self._messages.get(envelope.id))
        if resumed:  # the continuation may only generate what is left of max_tokens (tokens)
            generated = sum(p.usage.completion_tokens for p in run.parts)
            call = msgspec.structs.replace(call, max_tokens=max(1, request.max_tokens - generated))
        index = len(attempts)
        started = time.perf_counter()
        client_timeout_s = max(1.0, run.ends_at - time.monotonic())
        if run.cancelled.is_set():
            got = None
        else:
            got = await read_stream(
                run,
                adapter.stream(self.client, call, client_timeout_s),
                provider=candidate.provider,
                model=candidate.model,
                attempt=index,
                first_chunk_timeout_s=first_chunk_timeout_s,
                publish=lambda chunk: ctx.emit_now(Emit(run.topic, envelope.id, chunk)),
                now=now_utc,
            )
        latency_ms = (time.perf_counter() - started) * 1000
        if got is not None and got.first_chunk_ms is not None:
            tel.record_first_chunk(candidate.provider, candidate.model, got.first_chunk_ms)
        # counted only for a part whose provider reported no usage (tokenizing is not free)
        prompt_tokens = functools.partial(estimate_messages_tokens, call.messages)
        if got is None or got.stop == "cancelled":
            part = self._add_part(run, candidate, got.end if got else None, prompt_tokens, got.text if got else "")
            if charge is not None:
                await charge.settle_answer(part.usage if part else Usage())
            attempts.append(
                Attempt(
                    provider=candidate.provider,
                    model=candidate.model,
                    outcome="error",
                    error_type="cancelled",
                    latency_ms=round(latency_ms, 3),
                    first_chunk_ms=got.first_chunk_ms if got else None,
                    chunks=got.chunks if got else 0,
                    resumed=resumed,
                )
            )
            tel.finish_attempt(
                span,
                candidate.provider,
                candidate.model,
                ok=False,
                status_code=None,
                error_type="cancelled",
                latency_ms=latency_ms,
            )
            return Outcome(
                status="error",
                content=run.text,
                provider=candidate.provider,
                model=candidate.model,
                attempts=attempts,
                error=ErrorInfo(
                    type="cancelled",
                    message=f"the reader went away; the stream was stopped after {run.seq} chunks",
                    provider=candidate.provider,
                ),
            )
        if got.stop == "complete" and got.end is not None and (got.produced or resumed):
            answered_model = got.end.model or candidate.model
            part = self._add_part(run, candidate, got.end, prompt_tokens, got.text, model=answered_model)
            usage = part.usage if part else Usage()
            self.latencies.add(candidate.provider, latency_ms)
            tel.finish_attempt(
                span,
                candidate.provider,
                candidate.model,
                ok=True,
                status_code=200,
                error_type=None,
                latency_ms=latency_ms,
                usage=usage,
                response_model=answered_model,
                cost_usd=lambda: self._cost_usd(candidate.provider, answered_model, usage),
            )
            if charge is not None:
                await charge.settle_answer(usage)
            attempts.append(
                Attempt(
                    provider=candidate.provider,
                    model=answered_model,
                    outcome="ok",
                    status_code=200,
                    latency_ms=round(latency_ms, 3),
                    first_chunk_ms=got.first_chunk_ms,
                    chunks=got.chunks,
                    resumed=resumed,
                )
            )
            await self._health(
                envelope,
                candidate,
                True,
                None,
                200,
                latency_ms,
                ctx,
                None,
                usage=usage,
                cost_usd=self._cost_usd(candidate.provider, answered_model, usage),
            )
            tool_calls = run.tool_calls()
            outcome = Outcome(
                status="ok",
                content=run.text if run.text or not tool_calls else None,
                provider=candidate.provider,
                model=answered_model,
                usage=total_usage(run.parts),
                usage_source="estimated" if any(p.usage_source == "estimated" for p in run.parts) else "provider",
                attempts=attempts,
                parts=list(run.parts),
                tool_calls=tool_calls,
                finish_reason=finish_reason(got.end.finish_reason, tool_calls),
            )
            problem = tool_choice_problem(request, tool_calls) or (
                answer_problem(request.response_format, run.text) if not tool_calls else None
            )
            if problem is not None:  # shown already, so not sent elsewhere: the request ends invalid (DESIGN A4)
                attempts[-1] = msgspec.structs.replace(
                    attempts[-1], outcome="error", error_type="invalid_response", reason=problem
                )
                outcome.status = "error"
                outcome.error = ErrorInfo(
                    type="invalid_response",
                    message=f"{candidate.provider}/{answered_model}: the streamed answer breaks the response "
                    f"format: {problem}",
                    provider=candidate.provider,
                )
            return outcome
        # a failure: a provider error, a time limit, or a stream that ended without text
        if isinstance(got.error, UntranslatableRequestError) and not got.produced:
            if charge is not None:
                await charge.settle_failure(got.error)
            tel.finish_attempt(
                span,
                candidate.provider,
                candidate.model,
                ok=False,
                status_code=None,
                error_type="invalid_request",
                latency_ms=latency_ms,
            )
            attempts.append(_skipped(candidate, "invalid_request", redact(got.error.message, self._secrets)))
            return got.error
        if got.error is not None:
            error: AIProviderError = got.error
        elif got.stop in ("first_chunk_timeout", "idle_timeout"):
            limit = first_chunk_timeout_s if got.stop == "first_chunk_timeout" else run.idle_timeout_s
            error = timeout_error(candidate.provider, got.stop, limit)
        elif got.stop in ("deadline", "max_duration"):
            what = (
                "the request's deadline"
                if got.stop == "deadline"
                else "the longest stream allowed ([stream] max_duration_ms)"
            )
            error = ProviderTimeoutError(
                f"{candidate.provider}: the stream reached {what} "
                f"after {got.chunks} chunks ({latency_ms / 1000:.1f} s)",
                provider=candidate.provider,
            )
        elif got.stop == "complete":
            error = stream_cut(candidate.provider, "an answer without text")
        else:
            error = stream_cut(candidate.provider, "the stream stopped")
        part = self._add_part(run, candidate, got.end, prompt_tokens, got.text) if got.text else None
        run.unsettled = part
        if charge is not None:
            if part is not None:
                await charge.settle_answer(part.usage)
            else:
                await charge.settle_failure(error)
        tel.finish_attempt(
            span,
            candidate.provider,
            candidate.model,
            ok=False,
            status_code=error.status_code,
            error_type=error.error_type,
            latency_ms=latency_ms,
        )
        log.info(
            "request %s: %s/%s stream failed after %d chunks: %s (%s)",
            envelope.id,
            candidate.provider,
            candidate.model,
            got.chunks,
            error.error_type,
            got.stop,
        )
        ends = got.stop in ("deadline", "max_duration")
        await self._failed(
            envelope,
            candidate,
            error,
            attempts,
            latency_ms,
            ctx,
            reason=got.stop if got.stop not in ("provider_error", "complete") else None,
            first_chunk_ms=got.first_chunk_ms,
            chunks=got.chunks,
            resumed=resumed,
            # a caller's limit on a flowing stream is no provider fault: nothing for its breaker
            health=not (ends and got.first_chunk_ms is not None),
        )
        if run.started and (not run.resume or ends or run.calls):  # a tool call is never continued: a restart
            # by another provider would be spliced onto this one's partial call
            return Outcome(
                status="error",
                content=run.text,
                provider=candidate.provider,
                model=candidate.model,
                attempts=attempts,
                error=ErrorInfo(
                    type="stream_interrupted",
                    message=f"{candidate.provider} stream interrupted after {run.seq} chunks: "
                    f"{redact(error.message, self._secrets)}",
                    provider=candidate.provider,
                    reason=got.stop,
                ),
            )
        return error

    async def _failed(
        self,
        envelope: Envelope,
        candidate: Candidate,
        error: AIProviderError,
        attempts: list[Attempt],
        latency_ms: float,
        ctx: MessageContext,
        *,
        reason: str | None = None,
        first_chunk_ms: float | None = None,
        chunks: int | None = None,
        resumed: bool = False,
        health: bool = True,
    ) -> None:
        """Record a failed call: its attempt (with a stream's fields), its message, its health event (``health``)."""
        self._last_errors[envelope.id] = redact(error.message, self._secrets)
        attempts.append(
            Attempt(
                provider=candidate.provider,
                model=candidate.model,
                outcome="error",
                error_type=error.error_type,
                status_code=error.status_code,
                latency_ms=round(latency_ms, 3),
                reason=reason,
                first_chunk_ms=first_chunk_ms,
                chunks=chunks,
                resumed=resumed,
            )
        )
        if health:
            await self._health(
                envelope, candidate, False, error.error_type, error.status_code, latency_ms, ctx, error.retry_after_s
            )

    @staticmethod
    def _add_part(
        run: StreamRun,
        candidate: Candidate,
        end: Any,
        prompt_tokens: Callable[[], int],
        text: str,
        *,
        model: str | None = None,
    ) -> OutcomePart | None:
        """Record what one attempt generated (``None`` when it generated nothing billable)."""
        if not text and (end is None or end.usage is None):
            return None
        usage, estimated = part_usage(end, prompt_tokens, text)
        part = OutcomePart(
            provider=candidate.provider,
            model=model or candidate.model,
            usage=usage,
            usage_source="estimated" if estimated else "provider",
        )
        run.parts.append(part)
        return part

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
        *,
        usage: Usage | None = None,
        cost_usd: Decimal | None = None,
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
            usage=usage,
            cost_usd=float(round(cost_usd, 10)) if cost_usd is not None else None,
        )
        # Not awaited: the acknowledgement is off the request's path, but the runner still waits for it
        # before the message counts as done (at-least-once).
        ctx.emit_soon(Emit(self.topics.control, candidate.provider, event))
