"""Wire formats the emulator speaks: bodies, headers and error shapes of the three provider APIs.

Sources (read 2026-11-29):

* OpenAI chat completion object and errors:
  https://platform.openai.com/docs/api-reference/chat/object ,
  https://platform.openai.com/docs/guides/error-codes ; rate-limit headers
  ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` and ``x-request-id``:
  https://platform.openai.com/docs/guides/rate-limits ,
  https://platform.openai.com/docs/api-reference/debugging-requests .
* Anthropic message object: https://docs.anthropic.com/en/api/messages ;
  error shape ``{"type": "error", "error": {"type", "message"}, "request_id"}``
  and the ``request-id`` header: https://docs.anthropic.com/en/api/errors ;
  ``anthropic-ratelimit-*`` headers and ``retry-after``:
  https://docs.anthropic.com/en/api/rate-limits .
* Cloudflare envelope ``{"result", "success", "errors", "messages"}``:
  https://developers.cloudflare.com/api/ ; Workers AI error codes:
  https://developers.cloudflare.com/workers-ai/platform/errors/ . Where the
  docs give no code (a 5xx, a content refusal, context overflow), the code
  below is the emulator's own and is marked so.

Token rule (deterministic, documented so tests can assert exact numbers):
``text_tokens(s) = ceil(len(s) / 4)`` (0 for ``""``); a request's prompt tokens
are ``sum(text_tokens(content) + 4 for each message) + 3``, counting the
Anthropic ``system`` prompt (or a Workers AI ``prompt``) as one more message;
the answer's completion tokens are ``text_tokens(answer)``.

Tools, images and structured output (``pipeline.emulator.tools``) add to the
prompt: each offered tool ``text_tokens(name) + text_tokens(description) +
text_tokens(canonical JSON of its schema)`` (the same under every wire
format), each image ``IMAGE_TOKENS`` (85, OpenAI's price of a low-detail
image), and the text of earlier tool calls and tool results. A tool call
answer's completion tokens are ``text_tokens(name) + text_tokens(arguments
JSON)`` per call.

Answer text: ``"<Provider> emulator reply from <model>: "`` followed by eight
words chosen by the SHA-256 of the last user message, ended with ``.``; it is
cut to ``4 * max_tokens`` characters (so ``completion_tokens <= max_tokens``),
in which case the finish reason says the length limit was hit. A request with
images or ending with tool results puts a deterministic prefix before the
words (``"I see 2 image(s). "``, ``"Based on the tool result: <content>. "``).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.emulator.spec import ErrorKind, Wire


class Problem(Exception):
    """A request the emulator answers with an error body of ``kind`` and HTTP ``status``.

    ``message`` replaces the provider's default text; ``param`` and ``code``
    fill the OpenAI error's fields of those names (other providers have none).
    """

    def __init__(
        self,
        kind: ErrorKind,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message or kind)
        self.kind = kind
        self.status = status
        self.message = message
        self.param = param
        self.code = code


#: Characters per token of the emulator's token rule.
CHARS_PER_TOKEN = 4
#: Tokens each message adds to the prompt count.
MESSAGE_OVERHEAD_TOKENS = 4
#: Tokens added once per request for the reply header.
REPLY_PRIMING_TOKENS = 3

#: Rate limits the emulator advertises in its headers (requests and tokens per minute).
ADVERTISED_REQUESTS_PER_MIN = 10_000
ADVERTISED_TOKENS_PER_MIN = 2_000_000

_TITLES: dict[str, str] = {"openai": "OpenAI", "anthropic": "Anthropic", "cloudflare": "Cloudflare"}
_VOCABULARY: tuple[str, ...] = (
    "amber", "bridge", "cinder", "delta", "ember", "fjord", "granite", "harbor",
    "island", "juniper", "kestrel", "lantern", "meadow", "nebula", "orchard", "pebble",
    "quartz", "river", "saffron", "tundra", "umber", "valley", "willow", "xenon",
    "yarrow", "zephyr", "aurora", "basalt", "cobalt", "dune", "estuary", "falcon",
    "glacier", "heron", "indigo", "jasper", "kelp", "lagoon", "marble", "nectar",
    "opal", "prairie", "quill", "reef", "sierra", "thistle", "upland", "vortex",
    "walnut", "yonder", "zenith", "atlas", "beacon", "canyon", "dawn", "echo",
    "fern", "grove", "horizon", "iris", "jade", "knoll", "lumen", "mesa",
)  # fmt: skip


def text_tokens(text: str) -> int:
    """Tokens of ``text`` under the emulator's rule: ``ceil(len(text) / 4)`` (tokens)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def prompt_tokens(texts: list[str]) -> int:
    """Prompt tokens of a request whose messages (system included) have these texts (tokens)."""
    if not texts:
        return 0
    return sum(text_tokens(t) + MESSAGE_OVERHEAD_TOKENS for t in texts) + REPLY_PRIMING_TOKENS


#: Words in an answer's body when the profile sets no ``reply_words``.
DEFAULT_REPLY_WORDS = 8


def words(text: str, count: int) -> str:
    """``count`` words drawn deterministically from ``text`` (the words of every answer's body)."""
    return _body_words(text, count)


def _body_words(last_user_text: str, count: int) -> str:
    """``count`` words drawn deterministically from the prompt (SHA-256 chained over the text)."""
    words: list[str] = []
    digest = hashlib.sha256(last_user_text.encode("utf-8")).digest()
    while len(words) < count:
        words.extend(_VOCABULARY[b % len(_VOCABULARY)] for b in digest[:8])
        digest = hashlib.sha256(digest).digest()
    return " ".join(words[:count])


def full_reply(
    provider: Wire, model: str, last_user_text: str, *, words: int = DEFAULT_REPLY_WORDS, prefix: str = ""
) -> str:
    """The whole deterministic answer to a prompt, before any ``max_tokens`` cut.

    ``"<Provider> emulator reply from <model>: <prefix><words>."``: the body
    depends on the request only (prompt, images, tool results), so a
    continuation on another provider can finish it.
    """
    return f"{_TITLES[provider]} emulator reply from {model}: {prefix}{_body_words(last_user_text, words)}."


def continuation_of(
    provider: Wire,
    model: str,
    last_user_text: str,
    partial: str,
    *,
    words: int = DEFAULT_REPLY_WORDS,
    prefix: str = "",
) -> str | None:
    """The rest of the answer that ``partial`` began, or ``None`` when ``partial`` began no answer to this prompt.

    The answer ``partial`` began keeps its own header (the provider and model
    that started it); its body is the prompt's. A partial cut inside the
    header is matched against this provider's own answer.
    """
    head, sep, _ = partial.partition(": ")
    full = (
        f"{head}: {prefix}{_body_words(last_user_text, words)}."
        if sep
        else full_reply(provider, model, last_user_text, words=words, prefix=prefix)
    )
    return full[len(partial) :] if full.startswith(partial) and len(full) > len(partial) else None


def cut_to_tokens(text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut to ``max_tokens`` (tokens, at least 1) under the emulator's rule: ``(text, truncated)``."""
    limit = max(1, max_tokens) * CHARS_PER_TOKEN
    return (text, False) if len(text) <= limit else (text[:limit], True)


def reply_text(
    provider: Wire,
    model: str,
    last_user_text: str,
    max_tokens: int,
    *,
    words: int = DEFAULT_REPLY_WORDS,
    prefix: str = "",
) -> tuple[str, bool]:
    """The deterministic answer for a request, cut to ``max_tokens`` (tokens).

    Returns:
        ``(text, truncated)``; ``text`` is never empty for ``max_tokens >= 1``.
    """
    return cut_to_tokens(full_reply(provider, model, last_user_text, words=words, prefix=prefix), max_tokens)


def new_request_id(provider: Wire) -> str:
    """A fresh provider request id, shaped like the provider's own (``req_...``, or a ``cf-ray``)."""
    if provider == "openai":
        return "req_" + secrets.token_hex(16)
    if provider == "anthropic":
        return "req_011C" + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")[:20]
    return secrets.token_hex(8) + "-EMU"


def request_id_header(provider: Wire) -> str:
    """Name of the header carrying the request id: ``x-request-id``, ``request-id`` or ``cf-ray``."""
    return {"openai": "x-request-id", "anthropic": "request-id", "cloudflare": "cf-ray"}[provider]


def mask_key(key: str) -> str:
    """A key masked the way OpenAI's 401 text shows it: first 8 and last 4 characters kept."""
    if len(key) <= 12:
        return "*" * len(key)
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def _rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def success_headers(provider: Wire, request_id: str, *, calls_so_far: int, tokens: int) -> dict[str, str]:
    """Headers of a successful answer: request id and the provider's rate-limit headers.

    Args:
        provider: which API.
        request_id: the id to send.
        calls_so_far: calls this provider has received (drives ``remaining``).
        tokens: tokens this call is charged (prompt + max_tokens), for the token budget headers.
    """
    headers = {request_id_header(provider): request_id}
    used = calls_so_far % ADVERTISED_REQUESTS_PER_MIN
    remaining_requests = max(0, ADVERTISED_REQUESTS_PER_MIN - used)
    remaining_tokens = max(0, ADVERTISED_TOKENS_PER_MIN - tokens)
    if provider == "openai":
        headers.update(
            {
                "openai-version": "2020-10-01",
                "openai-organization": "emulator",
                "openai-processing-ms": "1",
                "x-ratelimit-limit-requests": str(ADVERTISED_REQUESTS_PER_MIN),
                "x-ratelimit-limit-tokens": str(ADVERTISED_TOKENS_PER_MIN),
                "x-ratelimit-remaining-requests": str(remaining_requests),
                "x-ratelimit-remaining-tokens": str(remaining_tokens),
                "x-ratelimit-reset-requests": "6ms",
                "x-ratelimit-reset-tokens": "0s",
            }
        )
    elif provider == "anthropic":
        reset = _rfc3339(datetime.now(UTC) + timedelta(seconds=60))
        headers.update(
            {
                "anthropic-ratelimit-requests-limit": str(ADVERTISED_REQUESTS_PER_MIN),
                "anthropic-ratelimit-requests-remaining": str(remaining_requests),
                "anthropic-ratelimit-requests-reset": reset,
                "anthropic-ratelimit-tokens-limit": str(ADVERTISED_TOKENS_PER_MIN),
                "anthropic-ratelimit-tokens-remaining": str(remaining_tokens),
                "anthropic-ratelimit-tokens-reset": reset,
            }
        )
    return headers


def openai_completion(
    model: str,
    text: str,
    *,
    prompt: int,
    completion: int,
    cached: int,
    truncated: bool,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object (https://platform.openai.com/docs/api-reference/chat/object).

    With ``tool_calls`` (``[{"id", "name", "arguments": <JSON text>}]``) the
    message has ``content: null`` and ``tool_calls``, and ``finish_reason`` is
    ``tool_calls`` (https://platform.openai.com/docs/guides/function-calling).
    """
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    finish = "length" if truncated else "stop"
    if tool_calls:
        message["content"] = None
        message["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in tool_calls
        ]
        finish = "tool_calls"
    return {
        "id": "chatcmpl-" + secrets.token_hex(12),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_emulator",
    }


def anthropic_message(
    model: str,
    text: str,
    *,
    prompt: int,
    completion: int,
    cached: int,
    truncated: bool,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A Messages API ``message`` object (https://docs.anthropic.com/en/api/messages).

    ``input_tokens`` excludes the ``cache_read_input_tokens`` (= ``cached``).
    An empty ``text`` gives an empty ``content`` list. With ``tool_calls``
    (``[{"id", "name", "input": <object>}]``) the content is their
    ``tool_use`` blocks and ``stop_reason`` is ``tool_use``.
    """
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    stop = "max_tokens" if truncated else "end_turn"
    if tool_calls:
        content = [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": c["input"]} for c in tool_calls]
        stop = "tool_use"
    return {
        "id": "msg_01" + secrets.token_hex(11),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": prompt - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": completion,
            "service_tier": "standard",
        },
    }


def cloudflare_result(
    text: str,
    *,
    prompt: int,
    completion: int,
    tool_calls: list[dict[str, Any]] | None = None,
    json_value: Any = None,
) -> dict[str, Any]:
    """A Workers AI text generation envelope with ``result.response`` and ``result.usage``.

    With ``tool_calls`` (``[{"name", "input": <object>}]``) ``result.response``
    is ``null`` and ``result.tool_calls`` holds ``[{"name", "arguments":
    <object>}]`` (https://developers.cloudflare.com/workers-ai/features/function-calling/traditional/);
    with ``json_value`` (JSON Mode) ``result.response`` is that value itself
    (https://developers.cloudflare.com/workers-ai/features/json-mode/).
    """
    response: Any = text if json_value is None else json_value
    calls = [{"name": c["name"], "arguments": c["input"]} for c in tool_calls or ()]
    return {
        "result": {
            "response": None if calls else response,
            "tool_calls": calls,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        },
        "success": True,
        "errors": [],
        "messages": [],
    }


def default_status(provider: Wire, kind: ErrorKind) -> int:
    """The HTTP status a provider uses for an error ``kind``."""
    if kind == "overloaded":
        return 529 if provider == "anthropic" else 503
    if kind == "not_found" and provider == "cloudflare":
        return 400  # Workers AI answers "No such model" (5007) with HTTP 400.
    return {
        "invalid_request": 400,
        "authentication": 401,
        "permission": 403,
        "not_found": 404,
        "timeout": 408,
        "rate_limit": 429,
        "server": 500,
        "unavailable": 503,
        "context_length": 400,
        "content_filter": 400,
    }[kind]


def default_kind(status: int) -> ErrorKind:
    """The error body kind that fits an HTTP ``status``."""
    if status == 401:
        return "authentication"
    if status == 403:
        return "permission"
    if status == 404:
        return "not_found"
    if status == 408:
        return "timeout"
    if status == 429:
        return "rate_limit"
    if status == 503:
        return "unavailable"
    if status == 529:
        return "overloaded"
    if status >= 500:
        return "server"
    return "invalid_request"


class ErrorContext:
    """Facts an error text may quote: model, prompt/max tokens, context window, the caller's key."""

    def __init__(
        self,
        *,
        model: str,
        prompt_tokens: int = 0,
        max_tokens: int = 0,
        context_window: int = 0,
        max_output_tokens: int = 0,
        api_key: str | None = None,
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_window = context_window
        self.max_output_tokens = max_output_tokens
        self.api_key = api_key


def _openai_error_fields(kind: ErrorKind, ctx: ErrorContext) -> tuple[str, str | None, str | None, str | None]:
    window = ctx.context_window or 128_000
    requested = max(ctx.prompt_tokens + ctx.max_tokens, window + 1)
    prompt_part = max(ctx.prompt_tokens, requested - ctx.max_tokens)
    return {
        "invalid_request": ("Invalid request.", "invalid_request_error", None, None),
        "authentication": (
            f"Incorrect API key provided: {mask_key(ctx.api_key or '')}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            "invalid_api_key",
        ),
        "permission": (
            "Country, region, or territory not supported",
            "request_forbidden",
            None,
            "unsupported_country_region_territory",
        ),
        "not_found": (
            f"The model `{ctx.model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            None,
            "model_not_found",
        ),
        "timeout": ("Request timed out.", "timeout_error", None, None),
        "rate_limit": (
            f"Rate limit reached for {ctx.model} in organization org-emulator on requests per min (RPM): "
            "Limit 500, Used 500, Requested 1. Please try again in 1s. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
            "requests",
            None,
            "rate_limit_exceeded",
        ),
        "server": (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
        ),
        "unavailable": ("The engine is currently overloaded, please try again later.", "server_error", None, None),
        "overloaded": ("The engine is currently overloaded, please try again later.", "server_error", None, None),
        "context_length": (
            f"This model's maximum context length is {window} tokens. However, you requested {requested} tokens "
            f"({prompt_part} in the messages, {ctx.max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            "invalid_request_error",
            "messages",
            "context_length_exceeded",
        ),
        "content_filter": (
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is "
            "not allowed by our safety system.",
            "invalid_request_error",
            None,
            "content_policy_violation",
        ),
    }[kind]


def _anthropic_error_fields(kind: ErrorKind, ctx: ErrorContext) -> tuple[str, str]:
    window = ctx.context_window or 200_000
    return {
        "invalid_request": ("invalid_request_error", "Invalid request."),
        "authentication": ("authentication_error", "invalid x-api-key"),
        "permission": (
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        "not_found": ("not_found_error", f"model: {ctx.model}"),
        "timeout": ("timeout_error", "Request timed out."),
        "rate_limit": (
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50 requests per minute. "
            "For details, refer to: https://docs.claude.com/en/api/rate-limits.",
        ),
        "server": ("api_error", "Internal server error"),
        "unavailable": ("api_error", "Service unavailable"),
        "overloaded": ("overloaded_error", "Overloaded"),
        "context_length": (
            "invalid_request_error",
            f"prompt is too long: {max(ctx.prompt_tokens, window + 1)} tokens > {window} maximum",
        ),
        "content_filter": ("invalid_request_error", "Output blocked by content filtering policy"),
    }[kind]


def _cloudflare_error_fields(kind: ErrorKind, ctx: ErrorContext) -> tuple[int, str]:
    window = ctx.context_window or 8_000
    requested = max(ctx.prompt_tokens + ctx.max_tokens, window + 1)
    return {
        "invalid_request": (5006, "AiError: Bad input: input validation failed"),
        "authentication": (10000, "Authentication error"),
        "permission": (10000, "Authentication error"),
        "not_found": (5007, f"No such model {ctx.model} or task"),
        "timeout": (3007, "Request timeout"),
        "rate_limit": (3040, "No more data centers to forward the request to"),
        "server": (5000, "AiError: Internal server error"),  # code: emulator's own
        "unavailable": (3040, "Capacity temporarily exceeded, please try again."),
        "overloaded": (3040, "Capacity temporarily exceeded, please try again."),
        "context_length": (  # code: emulator's own; wording as Workers AI reports overflow
            5021,
            f"AiError: AiError: The estimated number of input and maximum output tokens ({requested}) "
            f"exceeded this model context window limit ({window}).",
        ),
        "content_filter": (5022, "AiError: Input was flagged by the content policy"),  # code: emulator's own
    }[kind]


def error_body(
    provider: Wire,
    kind: ErrorKind,
    ctx: ErrorContext,
    *,
    request_id: str,
    message: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """An error body shaped exactly like ``provider``'s, for ``kind``.

    ``message`` replaces the text; ``param`` and ``code`` replace the OpenAI
    error's fields of those names (the other providers' bodies have none).
    """
    if provider == "openai":
        text, err_type, default_param, default_code = _openai_error_fields(kind, ctx)
        return {
            "error": {
                "message": message or text,
                "type": err_type,
                "param": param if param is not None else default_param,
                "code": code if code is not None else default_code,
            }
        }
    if provider == "anthropic":
        err_type, text = _anthropic_error_fields(kind, ctx)
        return {"type": "error", "error": {"type": err_type, "message": message or text}, "request_id": request_id}
    cf_code, text = _cloudflare_error_fields(kind, ctx)
    return {"result": None, "success": False, "errors": [{"code": cf_code, "message": message or text}], "messages": []}


def openai_models(models: list[str]) -> dict[str, Any]:
    """``GET /v1/models`` list body (https://platform.openai.com/docs/api-reference/models/list)."""
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "emulator"} for m in models],
    }


def anthropic_models(models: list[str]) -> dict[str, Any]:
    """Anthropic ``GET /v1/models`` list body (https://docs.anthropic.com/en/api/models-list)."""
    data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in models]
    return {
        "data": data,
        "has_more": False,
        "first_id": models[0] if models else None,
        "last_id": models[-1] if models else None,
    }
