"""Values of the internal ``ai.stage.*`` topics: the request and what stages learnt of it."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from schemas.request import AIRequest, ToolCall
from schemas.response import Attempt, ErrorInfo, FinishReason, Usage


class Candidate(Struct, kw_only=True, frozen=True):
    """One provider the router may call, with the concrete model to ask it for."""

    provider: str
    model: str


class OutcomePart(Struct, kw_only=True):
    """What one attempt generated that is billable: its provider, model and token ``usage``.

    A streamed answer that one candidate began and another continued
    (DESIGN A9) has one part per attempt; ``usage_source`` is ``estimated``
    when the provider reported no usage (a cut stream) and the tokens were counted.
    """

    provider: str
    model: str
    usage: Usage
    usage_source: Literal["provider", "estimated"] = "provider"


class Outcome(Struct, kw_only=True):
    """How a request ended, before pricing: an answer, a cache hit or an error.

    ``saved_usd`` is set on cache hits (what the call would have cost, USD);
    ``usage_source`` is ``estimated`` when the provider reported no usage and
    the tokens were counted. For a streamed request, ``parts`` lists what each
    attempt generated (charged one cost line each), ``generation`` names the
    execution and ``stream_chunks`` counts its published chunks.
    """

    status: Literal["ok", "error"]
    content: str | None = None
    provider: str | None = None
    model: str | None = None
    usage: Usage = Usage()
    attempts: list[Attempt] = []
    error: ErrorInfo | None = None
    cached: bool = False
    saved_usd: float = 0.0
    usage_source: Literal["provider", "estimated"] = "provider"
    parts: list[OutcomePart] = []
    generation: str | None = None
    stream_chunks: int | None = None
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None


class Envelope(Struct, kw_only=True):
    """A request on its way through the stages (``ai.stage.*`` topics).

    ``received_at_ms``, ``deadline_at_ms`` and ``finished_at_ms`` (when the
    outcome was handed to the cost-recorder; ``None`` before) are Unix epoch
    ms; the response's ``latency_ms`` is ``finished_at_ms - received_at_ms``,
    so a redelivered record gets the same response. ``request`` is ``None``
    only for an input that could not be decoded, whose ``outcome`` is then an
    ``invalid_request`` error.
    """

    id: str
    request: AIRequest | None = None
    received_at_ms: int
    deadline_at_ms: int
    cache_key: str | None = None
    reserved_usd: float = 0.0
    reservation_scopes: list[str] = []
    candidates: list[Candidate] = []
    outcome: Outcome | None = None
    finished_at_ms: int | None = None
