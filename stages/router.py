"""router: choose who answers and the fallback chain (DESIGN B1).

Input ``ai.stage.route`` (envelope). Candidates are the enabled providers that
serve the model (model groups map a logical model to each provider's model),
within the request's allow-list and ``max_tokens_per_request``, whose circuit
is ``CLOSED`` (``stages.circuits.CircuitView``, folded from ``ai.control``); they are
ordered by the request's allow-list when it gives one, else by ``priority``.
Output: the envelope with its ``candidates`` to ``ai.stage.execute``, or a
``model_not_found``/``invalid_request`` outcome to the recorder.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pipeline.config import PipelineConfig
from pipeline.runner import Emit, MessageContext, decode_or_invalid
from pipeline.topics import Topics
from schemas.envelope import Envelope
from schemas.response import ErrorInfo
from stages.circuits import CircuitView
from stages.common import ENVELOPE_DECODER, error_envelope, to_record
from stages.routing import order_by_priority, resolve


class RouterStage:
    """Orders the candidate providers of each request."""

    name = "router"

    def __init__(self, topics: Topics, config: PipelineConfig, circuits: CircuitView | None = None) -> None:
        self.topics = topics
        self.config = config
        self.circuits = circuits or CircuitView()
        self.input_topic = topics.stage_route

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
        candidates = [c for c in resolution.candidates if self.circuits.allows_traffic(c.provider)]
        if not candidates:
            blocked = ", ".join(f"{c.provider} ({self.circuits.state(c.provider)})" for c in resolution.candidates)
            error = ErrorInfo(
                type="all_providers_failed",
                message=f"every provider serving {envelope.request.model!r} has an open circuit: {blocked}",
            )
            return [to_record(self.topics.stage_record, error_envelope(envelope.id, error, template=envelope))]
        if envelope.request.providers is None:
            candidates = order_by_priority(candidates, self.config.providers)
        routed = msgspec.structs.replace(envelope, candidates=candidates)
        return [Emit(self.topics.stage_execute, envelope.id, routed)]

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """An error outcome for ``request_id`` to the recorder."""
        return [to_record(self.topics.stage_record, error_envelope(request_id, error))]
