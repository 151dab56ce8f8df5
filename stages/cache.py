"""cache-lookup: answer from the response cache, or pass the request on (DESIGN B1).

Input ``ai.requests`` (``AIRequest``). A hit goes to ``ai.stage.record`` as a
``cached`` outcome; a miss (or ``cache.bypass``) goes to ``ai.stage.budget``.
The key is ``stages.cache_key.cache_key``; entries are written by the
cost-recorder on success only.
"""

from __future__ import annotations

from typing import Any

from pipeline.cache_store import CacheStore
from pipeline.runner import Emit, MessageContext, decode_or_invalid
from pipeline.topics import Topics
from schemas.envelope import Envelope, Outcome
from schemas.request import AIRequest
from schemas.response import ErrorInfo
from stages.cache_key import cache_key
from stages.common import REQUEST_DECODER, error_envelope, now_ms, to_record


class CacheLookupStage:
    """Looks each request up in ``store``; ``enabled=False`` passes every request on."""

    name = "cache"

    def __init__(self, topics: Topics, store: CacheStore, *, enabled: bool = True) -> None:
        self.topics = topics
        self.store = store
        self.enabled = enabled
        self.input_topic = topics.requests

    def decode(self, raw: bytes) -> AIRequest:
        """Decode and validate an ``AIRequest``.

        Raises:
            InvalidInput: naming the bad field.
        """
        request: AIRequest = decode_or_invalid(REQUEST_DECODER, raw)
        return request

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Hit: a cached outcome to the recorder; miss: the envelope to the budget gate."""
        request: AIRequest = value
        received = now_ms()
        envelope = Envelope(
            id=request.id,
            request=request,
            received_at_ms=received,
            deadline_at_ms=received + request.timeout_ms,
        )
        bypass = request.cache is not None and request.cache.bypass
        if not self.enabled or bypass:
            return [Emit(self.topics.stage_budget, request.id, envelope)]
        key = cache_key(request)
        envelope.cache_key = key
        answer = await self.store.get(key)
        if answer is None:
            return [Emit(self.topics.stage_budget, request.id, envelope)]
        envelope.outcome = Outcome(
            status="ok",
            content=answer.content,
            provider=answer.provider,
            model=answer.model,
            usage=answer.usage,
            cached=True,
            saved_usd=answer.cost_usd,
        )
        return [to_record(self.topics.stage_record, envelope)]

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """An error outcome for ``request_id`` to the recorder."""
        return [to_record(self.topics.stage_record, error_envelope(request_id, error))]
