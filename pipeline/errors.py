"""Typed errors of aipipe (DESIGN A5): one root, one subclass per ``error.type``.

Each error carries what the pipeline acts on: ``error_type`` (the
``error.type`` string of DESIGN A4), ``retryable`` (DESIGN A8: retried on the
same provider), ``status_code`` (the provider's HTTP status, if any),
``retry_after_s`` (from ``Retry-After``/``retry-after-ms``, seconds) and the
``provider`` name. Messages never contain secrets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from schemas.response import ErrorType

if TYPE_CHECKING:
    from schemas.response import AIResponse, Attempt

#: Error types retried on the same provider by default (DESIGN A8).
RETRYABLE_TYPES: frozenset[str] = frozenset({"rate_limit", "server_error", "timeout"})
#: Error types that count toward a circuit breaker (DESIGN A8).
BREAKER_COUNTED_TYPES: frozenset[str] = frozenset({"server_error", "timeout", "rate_limit", "authentication"})


class AIProviderError(Exception):
    """Root of every aipipe error.

    Args:
        message: human-readable reason (no secrets).
        provider: provider name the error came from, if any.
        status_code: HTTP status of the provider's answer, if any.
        retry_after_s: wait the provider asked for (s), if any.
        attempts: every provider call made for the request, in order.
        request_id: the request's id, when known.
        sent: ``False`` when the error arose before any byte was sent to the provider
            (an adapter refusing to build the call), so no quota was used.
    """

    error_type: ClassVar[ErrorType] = "server_error"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        attempts: list[Attempt] | None = None,
        request_id: str | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.sent = sent
        self.message = message
        self.provider = provider
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.attempts: list[Attempt] = list(attempts or [])
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, provider={self.provider!r}, "
            f"status_code={self.status_code!r}, retry_after_s={self.retry_after_s!r})"
        )


class InvalidRequestError(AIProviderError):
    """The request is malformed or violates a limit; never retried, never falls back (HTTP 400)."""

    error_type = "invalid_request"


class UntranslatableRequestError(InvalidRequestError):
    """The request cannot be expressed in one provider's wire format (DESIGN A4).

    For example tool-call ``arguments`` that are not a JSON object, which
    Anthropic's ``tool_use.input`` must be, or an https image for an API that
    takes image bytes only. Raised before anything is sent; the executor skips
    that candidate (``outcome: "skipped"``, the message as ``reason``) and
    tries the next, so the same request never succeeds or fails by routing
    order alone.
    """


class AuthenticationError(AIProviderError):
    """The provider rejected the credentials (HTTP 401/403); falls back at once."""

    error_type = "authentication"


class RateLimitError(AIProviderError):
    """The provider is rate limiting (HTTP 429); retryable, honours ``retry_after_s``."""

    error_type = "rate_limit"
    retryable = True


class ModelNotFoundError(AIProviderError):
    """No enabled provider serves the model, or the provider does not know it (HTTP 404)."""

    error_type = "model_not_found"


class ContextLengthExceededError(AIProviderError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""

    error_type = "context_length_exceeded"


class ContentFilterError(AIProviderError):
    """The provider refused on content policy; not laundered through another provider."""

    error_type = "content_filter"


class ProviderTimeoutError(AIProviderError):
    """An attempt or the request's deadline ran out, or the connection failed; retryable."""

    error_type = "timeout"
    retryable = True


class ProviderServerError(AIProviderError):
    """The provider failed (HTTP 5xx, Anthropic 529, malformed 200 body); retryable."""

    error_type = "server_error"
    retryable = True


class BudgetExceededError(AIProviderError):
    """A user or global budget has no room for the request."""

    error_type = "budget_exceeded"


class AllProvidersFailedError(AIProviderError):
    """Every candidate provider failed; ``attempts`` holds every call in order."""

    error_type = "all_providers_failed"


class ServiceUnavailableError(AIProviderError):
    """A dependency of the pipeline (such as Redis) is down and the setting says fail closed."""

    error_type = "service_unavailable"


class StreamInterruptedError(AIProviderError):
    """A streamed answer stopped after text was shown and no candidate continued it (DESIGN A9).

    ``partial`` is the text received (the response's partial ``content``);
    ``response`` the final ``AIResponse`` when it is known.
    """

    error_type = "stream_interrupted"

    def __init__(self, message: str, *, partial: str = "", response: AIResponse | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.partial = partial
        self.response = response


class InvalidResponseError(AIProviderError):
    """An answer did not hold to the request's ``response_format`` (DESIGN A4).

    Not JSON, or not valid against its JSON Schema. The request falls back to
    the next candidate without counting toward any circuit breaker; when no
    candidate's answer validates, the request ends with this error.
    """

    error_type = "invalid_response"


class StreamCancelledError(AIProviderError):
    """The reader of a streamed request went away and the call was stopped (DESIGN A9)."""

    error_type = "cancelled"


ERROR_CLASSES: dict[str, type[AIProviderError]] = {
    cls.error_type: cls
    for cls in (
        InvalidRequestError,
        AuthenticationError,
        RateLimitError,
        ModelNotFoundError,
        ContextLengthExceededError,
        ContentFilterError,
        ProviderTimeoutError,
        ProviderServerError,
        BudgetExceededError,
        AllProvidersFailedError,
        ServiceUnavailableError,
        StreamInterruptedError,
        StreamCancelledError,
        InvalidResponseError,
    )
}


def error_for_type(error_type: str, message: str, **kwargs: object) -> AIProviderError:
    """Build the error class registered for ``error_type`` (falls back to ``AIProviderError``)."""
    cls = ERROR_CLASSES.get(error_type, AIProviderError)
    return cls(message, **kwargs)  # type: ignore[arg-type]


def error_from_response(response: AIResponse) -> AIProviderError:
    """The typed error for a ``status: error`` response, holding its attempts.

    Raises:
        ValueError: when the response is not an error.
    """
    if response.error is None:
        raise ValueError("response has no error")
    err = response.error
    last_status = next((a.status_code for a in reversed(response.attempts) if a.status_code), None)
    if err.type == "stream_interrupted":
        return StreamInterruptedError(
            err.message,
            partial=response.content or "",
            response=response,
            provider=err.provider,
            status_code=last_status,
            attempts=response.attempts,
            request_id=response.id,
        )
    return error_for_type(
        err.type,
        err.message,
        provider=err.provider,
        status_code=last_status,
        attempts=response.attempts,
        request_id=response.id,
    )
