"""router: choose who answers and the fallback chain (DESIGN B1).

Input ``ai.stage.route`` (envelope). Candidates are the enabled providers that
serve the model (model groups map a logical model to each provider's model),
within the request's allow-list and ``max_tokens_per_request``; they are
ordered by the request's allow-list when it gives one, else by the current
load-balancing strategy (``stages.rules.strategies.StrategyState``, switched by
``set_strategy`` on ``ai.control``). Providers with no room under their
RPM/TPM limits right now (``stages.rules.rate_limits``) are left out, unless every
candidate is saturated: then all of them go on and the executor waits for
room within the request's deadline (``with_room``). A candidate whose circuit
is not ``CLOSED``, whose budget has no room or whose context window is too
small stays in the chain: the executor skips it without a call and lists it
in ``attempts`` with the reason (DESIGN A8).
Output: the envelope with its ``candidates`` to ``ai.stage.execute``, or a
``model_not_found``/``invalid_request`` outcome to the recorder.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pipeline.bus.topics import Topics
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.messages import ENVELOPE_DECODER, error_envelope, to_record
from pipeline.runtime.runner import Emit, MessageContext, decode_or_invalid
from schemas.envelope import Candidate, Envelope
from schemas.response import ErrorInfo
from stages.rules.rate_limits import MemoryRateLimiter, RateLimiter, describe_limit, has_limits
from stages.rules.routing import resolve
from stages.rules.strategies import RouteInfo, StrategyState
from stages.rules.tokens import estimate_messages_tokens, prompt_messages


class RouterStage:
    """Orders the candidate providers of each request."""

    name = "router"

    def __init__(
        self,
        topics: Topics,
        config: PipelineConfig,
        *,
        strategy: StrategyState | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.topics = topics
        self.config = config
        self.strategy = strategy or StrategyState.from_config(config)
        self.rate_limiter: RateLimiter = rate_limiter or MemoryRateLimiter()
        self.input_topic = topics.stage_route

    async def with_room(self, candidates: list[Candidate], info: RouteInfo) -> tuple[list[Candidate], list[Candidate]]:
        """Split ``candidates`` (order kept) by room under their RPM/TPM limits now.

        Returns:
            ``(usable, never)``: ``usable`` holds the candidates with room, or
            every candidate that could ever fit when none has room now (the
            executor waits for the first room); ``never`` those whose
            ``tokens_per_minute`` is below the request's estimated tokens.
        """
        tokens = info.prompt_tokens + info.max_tokens
        roomy: list[Candidate] = []
        saturated: list[Candidate] = []
        never: list[Candidate] = []
        for cand in candidates:
            cfg = self.config.providers.get(cand.provider)
            if cfg is None or not has_limits(cfg.rate_limit):
                roomy.append(cand)
                continue
            wait = await self.rate_limiter.wait_s(cand.provider, cfg.rate_limit, tokens)
            if wait == 0:
                roomy.append(cand)
            elif wait == float("inf"):
                never.append(cand)
            else:
                saturated.append(cand)
        return (roomy or saturated), never

    def decode(self, raw: bytes) -> Envelope:
        """Decode an envelope.

        Raises:
            InvalidInput: when the value is not an envelope.
        """
        envelope: Envelope = decode_or_invalid(ENVELOPE_DECODER, raw)
        return envelope

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """The envelope with its ordered candidates, or the reason no provider can take it."""
        envelope: Envelope = value
        if envelope.request is None:
            return [to_record(self.topics.stage_record, envelope)]
        resolution = resolve(self.config, envelope.request)
        if resolution.error_type is not None:
            error = ErrorInfo(type=resolution.error_type, message=resolution.message)  # type: ignore[arg-type]
            return [to_record(self.topics.stage_record, error_envelope(envelope.id, error, template=envelope))]
        candidates = resolution.candidates
        request = envelope.request
        info = RouteInfo(estimate_messages_tokens(prompt_messages(request)), request.max_tokens)
        if request.providers is None:  # an allow-list keeps its own order
            ordered = self.strategy.order(candidates, self.config.providers, info)
            if not ordered:
                error = ErrorInfo(
                    type="all_providers_failed",
                    message=f"every provider serving {request.model!r} has weight 0 under the weighted strategy "
                    f"({', '.join(c.provider for c in candidates)})",
                )
                return [to_record(self.topics.stage_record, error_envelope(envelope.id, error, template=envelope))]
            candidates = ordered
        candidates, never = await self.with_room(candidates, info)
        if not candidates:
            limits = ", ".join(
                f"{c.provider} ({describe_limit(self.config.providers[c.provider].rate_limit)})" for c in never
            )
            error = ErrorInfo(
                type="invalid_request",
                message=f"the request needs about {info.prompt_tokens + info.max_tokens} tokens "
                f"(prompt estimate + max_tokens), more than tokens_per_minute allows at {limits}",
            )
            return [to_record(self.topics.stage_record, error_envelope(envelope.id, error, template=envelope))]
        routed = msgspec.structs.replace(envelope, candidates=candidates)
        return [Emit(self.topics.stage_execute, envelope.id, routed)]

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """An error outcome for ``request_id`` to the recorder."""
        return [to_record(self.topics.stage_record, error_envelope(request_id, error))]
