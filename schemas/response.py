"""The answer the cost-recorder publishes to ``ai.responses`` (DESIGN A4)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from schemas.request import ToolCall

NonNeg = Annotated[int, Meta(ge=0)]

#: Every ``error.type`` a response may carry (DESIGN A4).
ErrorType = Literal[
    "invalid_request",
    "authentication",
    "rate_limit",
    "model_not_found",
    "context_length_exceeded",
    "content_filter",
    "timeout",
    "server_error",
    "budget_exceeded",
    "all_providers_failed",
    "service_unavailable",
    "stream_interrupted",
    "cancelled",
    "invalid_response",
]
#: Why an answer ended, in OpenAI's words (DESIGN A4).
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
ERROR_TYPES: tuple[str, ...] = ErrorType.__args__  # type: ignore[attr-defined]


class Usage(Struct, kw_only=True, frozen=True):
    """Token counts of one answer (tokens). ``prompt_tokens`` includes the cached ones."""

    prompt_tokens: NonNeg = 0
    completion_tokens: NonNeg = 0
    total_tokens: NonNeg = 0
    cached_prompt_tokens: NonNeg = 0
    cache_creation_prompt_tokens: NonNeg = 0


class Attempt(Struct, kw_only=True):
    """One candidate's turn: an HTTP call (``ok``/``error``) or a skip without one (``skipped``).

    ``error_type`` is the call's error, or for a skip the error it stands for
    (``context_length_exceeded``, ``budget_exceeded``, ...); ``reason`` says why a
    candidate was skipped (DESIGN A8); ``latency_ms`` is the call's (0 for a skip).
    """

    provider: str
    model: str
    outcome: Literal["ok", "error", "skipped"]
    error_type: str | None = None
    status_code: int | None = None
    latency_ms: float = 0.0
    reason: str | None = None
    first_chunk_ms: float | None = None
    chunks: int | None = None
    resumed: bool = False


class ErrorInfo(Struct, kw_only=True):
    """Why a request failed: ``type`` (one of ``ERROR_TYPES``), a message, the provider if one.

    ``reason`` details a ``stream_interrupted`` error: ``deadline``,
    ``idle_timeout``, ``max_duration``, ``provider_error`` (DESIGN A9).
    """

    type: ErrorType
    message: str
    provider: str | None = None
    reason: str | None = None


class AIResponse(Struct, kw_only=True):
    """The final answer for one request id (DESIGN A4).

    ``cost_usd`` is USD rounded to 10 decimal places, ``latency_ms`` is end to
    end (ms, from the pipeline taking the request in). ``attempts`` lists every
    provider call in order. The seed's read-only names ``cost`` and
    ``tokens_used`` are offered as properties.
    """

    id: str
    status: Literal["ok", "error"]
    content: str | None = None
    provider: str | None = None
    model: str | None = None
    usage: Usage = Usage()
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    cached: bool = False
    attempts: list[Attempt] = []
    error: ErrorInfo | None = None
    generation: str | None = None
    stream_chunks: int | None = None
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None

    @property
    def cost(self) -> float:
        """The seed's name for ``cost_usd`` (USD)."""
        return self.cost_usd

    @property
    def tokens_used(self) -> int:
        """The seed's name for ``usage.total_tokens`` (tokens)."""
        return self.usage.total_tokens
