"""Map every provider failure to one ``pipeline.errors`` class (DESIGN A4, A8).

The adapters send their single HTTP call through :func:`post_json`, which turns
transport failures and non-2xx answers into typed errors, and they turn a bad
2xx body into :func:`malformed_response`. Nothing else escapes ``complete``.

HTTP status and body (``classify_response``), in this order:

1. Context-window overflow in any wording -> ``ContextLengthExceededError``:
   OpenAI ``code: context_length_exceeded`` / "This model's maximum context
   length is ..." (https://platform.openai.com/docs/guides/error-codes),
   Anthropic "prompt is too long: N tokens > M maximum" and "input length and
   `max_tokens` exceed context limit" (https://docs.anthropic.com/en/api/errors),
   Workers AI "... exceeded this model context window limit", and generic
   "maximum context length" / "context window" / "too many tokens" wordings.
2. Content-policy refusal -> ``ContentFilterError``: OpenAI codes
   ``content_policy_violation`` and (Azure) ``content_filter``; Anthropic
   "Output blocked by content filtering policy"; "content policy", "content
   management policy", "safety system", "usage policies" wordings.
3. Status: 401/403 -> ``AuthenticationError``; 404 -> ``ModelNotFoundError``;
   408 -> ``ProviderTimeoutError``; 429 -> ``RateLimitError``; 5xx including
   Anthropic's 529 ``overloaded_error`` -> ``ProviderServerError``; other 4xx ->
   ``InvalidRequestError`` unless the wording names an unknown model (OpenAI
   ``model_not_found``, Workers AI code 5007 "No such model", 3042 "Invalid model
   ID", see https://developers.cloudflare.com/workers-ai/platform/errors/),
   which is ``ModelNotFoundError``.
4. Workers AI ``{"success": false, "errors": [{"code", "message"}]}`` in a 2xx
   answer is classified by its codes: 10000/10001 authentication, 5007/3042
   model not found, 3036/3040 rate limit, 3007/3008 timeout, 3003/3006/5004/
   5006 invalid request, anything else server error
   (https://developers.cloudflare.com/api/ documents the envelope).

``Retry-After`` (delta seconds or HTTP-date, RFC 9110 section 10.2.3) and
``retry-after-ms`` (the OpenAI and Anthropic SDKs honour it) set
``retry_after_s`` on every classified error that carries them.

Transport failures (``classify_transport_error``): a connection that could not
be made (refused, DNS, connect timeout) and every read/write/pool timeout, or
the ``timeout_s`` deadline, are ``ProviderTimeoutError`` (the provider was not
reachable in time; ``pipeline.errors`` defines timeout as "ran out, or the
connection failed"). A connection that was made and then dropped before a
complete answer (reset, server disconnect, truncated body) is
``ProviderServerError``: the provider took the call and failed it, as with a
502. Both are retryable and count toward the breaker (DESIGN A8), so the choice
only changes the ``error.type`` users see.

Secrets: messages are built from the provider's error text, passed through
:func:`redact`, which removes the API key itself and anything shaped like a
key (``sk-...``, ``Bearer ...``, masked ``abcd****wxyz`` echoes, long opaque
tokens). Request headers are never part of a message.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import httpx
import msgspec

from pipeline.errors import (
    AIProviderError,
    AuthenticationError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderServerError,
    ProviderTimeoutError,
    RateLimitError,
)

#: Longest provider error text kept in a message (characters).
MAX_DETAIL_CHARS = 400

_REDACTED = "[redacted]"
_KEY_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?i)\bbearer\s+\S+"),
    re.compile(r"(?i)\b(x-api-key|api[_-]?key|authorization|token)\b(\s*[:=]\s*)\S+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}"),
    re.compile(r"\S*\*{4,}\S*"),
    re.compile(r"\b[A-Za-z0-9_\-]{32,}\b"),
)

_CONTEXT_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"context_length_exceeded"),
    re.compile(r"maximum context length"),
    re.compile(r"prompt is too long"),
    re.compile(r"exceeds? (the )?(model'?s? )?context (window|limit|length)"),
    re.compile(r"context (window|length) (limit )?(exceeded|is exceeded)"),
    re.compile(r"exceeded this model context window"),
    re.compile(r"input length and .?max_tokens.? exceed context limit"),
    re.compile(r"too many (input )?tokens"),
    re.compile(r"input is too long"),
)
_FILTER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"content_policy_violation"),
    re.compile(r"\bcontent_filter\b"),
    re.compile(r"content filtering policy"),
    re.compile(r"content management policy"),
    re.compile(r"content policy"),
    re.compile(r"safety system"),
    re.compile(r"usage polic(y|ies)"),
    re.compile(r"flagged (as|by|for)"),
)
_MODEL_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"model_not_found"),
    re.compile(r"no such model"),
    re.compile(r"invalid model"),
    re.compile(r"unknown model"),
    re.compile(r"model\b.{0,80}\b(does not exist|not found|is not supported|unknown)"),
)

# Workers AI internal codes (https://developers.cloudflare.com/workers-ai/platform/errors/)
# and the Cloudflare API's authentication codes.
_CF_AUTH_CODES = frozenset({"10000", "10001", "5016", "5018", "3023", "3041"})
_CF_MODEL_CODES = frozenset({"5007", "3042"})
_CF_RATE_CODES = frozenset({"3036", "3040"})
_CF_TIMEOUT_CODES = frozenset({"3007", "3008"})
_CF_INVALID_CODES = frozenset({"3003", "3006", "3039", "5004", "5005", "5006", "5019"})


class ErrorDetail(msgspec.Struct, kw_only=True, frozen=True):
    """What a provider error body says: ``type``, ``code`` and ``message`` (any may be empty).

    ``codes`` lists every Workers AI ``errors[].code`` as strings.
    """

    type: str = ""
    code: str = ""
    message: str = ""
    codes: tuple[str, ...] = ()


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove secrets and anything key-shaped from ``text``.

    Args:
        text: a message that may echo credentials (e.g. OpenAI's 401 text shows
            a masked key).
        secrets: the actual keys/tokens in use; each is removed verbatim
            (``None`` and strings under 4 characters are ignored).

    Returns:
        ``text`` with each secret and key-shaped token replaced by ``[redacted]``.
    """
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, _REDACTED)
    for pattern in _KEY_PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{_REDACTED}", text)
        else:
            text = pattern.sub(_REDACTED, text)
    return text


def parse_retry_after(headers: Mapping[str, str] | httpx.Headers, *, now_s: float | None = None) -> float | None:
    """The wait a response asks for (s), from ``retry-after-ms`` or ``Retry-After``.

    ``retry-after-ms`` (milliseconds, a non-standard header the OpenAI and
    Anthropic SDKs honour) wins when present and valid. ``Retry-After`` is
    either delta seconds or an HTTP-date (RFC 9110 section 10.2.3); a date in the
    past means 0.

    Args:
        headers: response headers (case-insensitive lookup is done here).
        now_s: current Unix time (s) for HTTP-dates; defaults to ``time.time()``.

    Returns:
        Seconds to wait (>= 0), or ``None`` when neither header is usable.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms.strip())
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000.0
    raw = lower.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


def _as_str(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def extract_error_detail(body: bytes) -> ErrorDetail:
    """Read the error ``type``/``code``/``message`` out of any provider's error body.

    Shapes understood: OpenAI ``{"error": {"message", "type", "code", "param"}}``
    (https://platform.openai.com/docs/guides/error-codes), Anthropic
    ``{"type": "error", "error": {"type", "message"}, "request_id"}``
    (https://docs.anthropic.com/en/api/errors), Cloudflare
    ``{"success": false, "errors": [{"code", "message"}], "messages", "result"}``
    (https://developers.cloudflare.com/api/), ``{"error": "text"}`` and plain
    text (its first ``MAX_DETAIL_CHARS`` characters).

    Returns:
        The detail; every field is ``""``/``()`` when the body says nothing.
    """
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return ErrorDetail(message=text[:MAX_DETAIL_CHARS])
    if not isinstance(data, dict):
        return ErrorDetail(message=_as_str(data)[:MAX_DETAIL_CHARS] if data is not None else "")
    err = data.get("error")
    if isinstance(err, dict):
        return ErrorDetail(
            type=_as_str(err.get("type")),
            code=_as_str(err.get("code")),
            message=_as_str(err.get("message")),
        )
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        codes = tuple(_as_str(e.get("code")) for e in errors if isinstance(e, dict))
        messages = [_as_str(e.get("message")) for e in errors if isinstance(e, dict)]
        return ErrorDetail(code=codes[0] if codes else "", message="; ".join(m for m in messages if m), codes=codes)
    if isinstance(err, str):
        return ErrorDetail(message=err)
    return ErrorDetail(message=_as_str(data.get("message")), type=_as_str(data.get("type")))


def _matches(patterns: Iterable[re.Pattern[str]], text: str) -> bool:
    return any(p.search(text) for p in patterns)


def _describe(
    provider: str, status: int, detail: ErrorDetail, request_id: str | None, secrets: list[str | None]
) -> str:
    label = detail.code or detail.type
    text = detail.message or "(no message)"
    if len(text) > MAX_DETAIL_CHARS:
        text = text[:MAX_DETAIL_CHARS] + "..."
    msg = redact(f"{provider} HTTP {status}" + (f" ({label})" if label else "") + f": {text}", secrets)
    if request_id:
        # Request ids are not secrets, and would look like opaque tokens to ``redact``.
        rid = request_id[:80]
        for secret in secrets:
            if secret and len(secret) >= 4 and secret in rid:
                rid = "?"
        msg += f" [provider request id {rid}]"
    return msg


def _provider_request_id(headers: Mapping[str, str] | httpx.Headers) -> str | None:
    lower = {k.lower(): v for k, v in headers.items()}
    for name in ("x-request-id", "request-id", "cf-ray"):
        if lower.get(name):
            return lower[name]
    return None


def _classify_cloudflare_codes(codes: tuple[str, ...]) -> type[AIProviderError] | None:
    code_set = set(codes)
    if code_set & _CF_AUTH_CODES:
        return AuthenticationError
    if code_set & _CF_MODEL_CODES:
        return ModelNotFoundError
    if code_set & _CF_RATE_CODES:
        return RateLimitError
    if code_set & _CF_TIMEOUT_CODES:
        return ProviderTimeoutError
    if code_set & _CF_INVALID_CODES:
        return InvalidRequestError
    return None


def _error_class(status: int, detail: ErrorDetail) -> type[AIProviderError]:
    text = " ".join((detail.type, detail.code, detail.message)).lower()
    is_4xx = 400 <= status < 500
    is_2xx = 200 <= status < 300
    if (is_4xx or is_2xx) and status not in (401, 403, 429):
        if _matches(_CONTEXT_PATTERNS, text):
            return ContextLengthExceededError
        if _matches(_FILTER_PATTERNS, text):
            return ContentFilterError
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return ModelNotFoundError
    if status == 408:
        return ProviderTimeoutError
    if status == 429:
        return RateLimitError
    if status >= 500:
        return ProviderServerError
    cf_class = _classify_cloudflare_codes(detail.codes)
    if cf_class is not None:
        return cf_class
    if _matches(_MODEL_PATTERNS, text):
        return ModelNotFoundError
    if is_4xx:
        return InvalidRequestError
    # A 2xx (Workers AI success:false), 1xx or 3xx that is an error: classify by the body's
    # error type where it names one, else the provider failed.
    by_type: dict[str, type[AIProviderError]] = {
        "authentication_error": AuthenticationError,
        "permission_error": AuthenticationError,
        "not_found_error": ModelNotFoundError,
        "rate_limit_error": RateLimitError,
        "invalid_request_error": InvalidRequestError,
    }
    return by_type.get(detail.type, ProviderServerError)


def classify_response(
    provider: str,
    status_code: int,
    headers: Mapping[str, str] | httpx.Headers,
    body: bytes,
    *,
    secrets: Iterable[str | None] = (),
) -> AIProviderError:
    """The typed error for a provider answer that is an error (non-2xx, or Workers AI ``success: false``).

    Args:
        provider: provider name put on the error (``"openai"`` ...).
        status_code: HTTP status of the answer.
        headers: response headers (for ``Retry-After``/``retry-after-ms`` and request ids).
        body: raw response body.
        secrets: credentials to scrub from the message (see :func:`redact`).

    Returns:
        A subclass of ``AIProviderError`` with ``provider``, ``status_code`` and
        ``retry_after_s`` (s, when the headers give one) set. It is returned, not raised.
    """
    secret_list = list(secrets)
    detail = extract_error_detail(body)
    cls = _error_class(status_code, detail)
    message = _describe(provider, status_code, detail, _provider_request_id(headers), secret_list)
    return cls(message, provider=provider, status_code=status_code, retry_after_s=parse_retry_after(headers))


def malformed_response(
    provider: str, reason: str, *, status_code: int = 200, secrets: Iterable[str | None] = ()
) -> ProviderServerError:
    """The error for a 2xx answer that is not a usable completion (bad JSON, missing fields, empty text).

    Returns:
        A ``ProviderServerError`` (retryable) with ``provider`` and ``status_code`` set.
    """
    text = reason if len(reason) <= MAX_DETAIL_CHARS else reason[:MAX_DETAIL_CHARS] + "..."
    return ProviderServerError(
        redact(f"{provider} HTTP {status_code}: malformed response: {text}", secrets),
        provider=provider,
        status_code=status_code,
    )


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


_DROPPED_NAMES = frozenset(
    {
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ClientOSError",
        "RemoteProtocolError",
        "ReadError",
        "WriteError",
        "ContentLengthError",
        "TransferEncodingError",
    }
)
_CONNECT_NAMES = frozenset({"ClientConnectorError", "ClientConnectorDNSError", "ConnectError", "ConnectTimeout"})


def classify_transport_error(
    provider: str, exc: BaseException, *, timeout_s: float, secrets: Iterable[str | None] = ()
) -> AIProviderError:
    """The typed error for a call that got no HTTP answer (see the module docstring for the rule).

    Works with plain ``httpx`` and with the ``httpx-aiohttp`` transport, which
    reports most aiohttp failures as ``httpx.ConnectTimeout`` and keeps the
    original in ``__cause__``: the cause chain is inspected, most specific first.

    Args:
        provider: provider name put on the error.
        exc: what the HTTP client raised.
        timeout_s: the call's time limit (s), quoted in timeout messages.
        secrets: credentials to scrub from the message.

    Returns:
        ``ProviderTimeoutError`` or ``ProviderServerError`` (``status_code`` ``None``).
    """
    chain = _cause_chain(exc)
    names = [type(e).__name__ for e in chain]
    inner = chain[-1]
    detail = redact(f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__, secrets)
    detail = " ".join(detail.split())  # one line: some client errors carry newlines

    # The most specific (innermost) cause decides.
    for err, name in zip(reversed(chain), reversed(names), strict=True):
        if isinstance(err, (ConnectionRefusedError,)) or name in _CONNECT_NAMES:
            return ProviderTimeoutError(f"{provider}: could not connect ({detail})", provider=provider)
        if isinstance(err, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)) or name in _DROPPED_NAMES:
            return ProviderServerError(
                f"{provider}: connection dropped before a complete answer ({detail})", provider=provider
            )
        if isinstance(err, (TimeoutError, httpx.TimeoutException)) or "Timeout" in name:
            return ProviderTimeoutError(f"{provider}: no answer within {timeout_s:g} s ({detail})", provider=provider)
    if isinstance(exc, httpx.TransportError):
        return ProviderServerError(f"{provider}: transport failure ({detail})", provider=provider)
    return ProviderServerError(f"{provider}: request failed ({detail})", provider=provider)


T = TypeVar("T")


def before_sending(prepare: Callable[[], T]) -> T:
    """Run an adapter's preparation of a call (URL, body); an error from it is marked not sent.

    A call that is refused before any byte leaves uses no quota: the
    executor gives its whole RPM/TPM charge and budget hold back
    (``AIProviderError.sent``).

    Raises:
        AIProviderError: what ``prepare`` raised, with ``sent = False``.
    """
    try:
        return prepare()
    except AIProviderError as exc:
        exc.sent = False
        raise


def parse_guarded(
    provider: str, status_code: int, parse: Callable[[], T], *, secrets: tuple[str | None, ...] = ()
) -> T:
    """Run an adapter's ``parse`` of a 200 body; any unexpected exception becomes a typed error.

    A parser bug must never escape as a bare exception: it is reported as
    ``malformed_response`` (``ProviderServerError``) with ``status_code``.

    Raises:
        AIProviderError: what ``parse`` raised, or ``ProviderServerError`` for anything else.
    """
    try:
        return parse()
    except AIProviderError:
        raise
    except Exception as exc:
        raise malformed_response(provider, repr(exc), status_code=status_code, secrets=secrets) from exc


async def post_json(
    client: httpx.AsyncClient,
    provider: str,
    url: str,
    *,
    headers: Mapping[str, str],
    payload: Mapping[str, Any],
    timeout_s: float,
    secrets: Iterable[str | None] = (),
) -> httpx.Response:
    """POST ``payload`` as JSON once and return the 2xx response (body read).

    ``timeout_s`` bounds the whole call (connect, send, wait, read) with
    ``asyncio.timeout``; it is also passed to the client as its per-phase timeout.

    Args:
        client: any ``httpx.AsyncClient`` (plain, or ``httpx_aiohttp.HttpxAiohttpClient``).
        provider: provider name for errors.
        url: absolute URL.
        headers: request headers (never copied into errors).
        payload: JSON-serialisable body.
        timeout_s: limit for the whole call (s), > 0.
        secrets: credentials to scrub from error messages.

    Returns:
        The response, status 2xx, content read.

    Raises:
        ProviderTimeoutError: deadline, read/connect timeouts, connection refused.
        ProviderServerError: connection dropped mid-call; HTTP 5xx/529.
        AIProviderError: any other class for a non-2xx answer, per :func:`classify_response`.
        ValueError: when ``timeout_s`` is not > 0.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 s, got {timeout_s!r}")
    secret_list = list(secrets)
    content = msgspec.json.encode(payload)
    send_headers = {"content-type": "application/json", "accept": "application/json", **headers}
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.post(url, content=content, headers=send_headers, timeout=timeout_s)
    except TimeoutError as exc:
        raise ProviderTimeoutError(f"{provider}: no answer within {timeout_s:g} s", provider=provider) from exc
    except Exception as exc:
        raise classify_transport_error(provider, exc, timeout_s=timeout_s, secrets=secret_list) from exc
    if not 200 <= response.status_code < 300:
        raise classify_response(provider, response.status_code, response.headers, response.content, secrets=secret_list)
    return response
