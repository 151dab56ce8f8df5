"""OpenAI Chat Completions adapter: ``POST {base_url}/chat/completions``.

API reference: https://platform.openai.com/docs/api-reference/chat/create
(request) and https://platform.openai.com/docs/api-reference/chat/object
(response). ``base_url`` includes ``/v1`` like the SDK's ``OPENAI_BASE_URL``
(default ``https://api.openai.com/v1``).

Request mapping from ``ProviderCall``: ``messages`` as is (roles ``system``,
``user``, ``assistant``); ``max_tokens`` is sent as ``max_completion_tokens``
(the current name; ``max_tokens`` is deprecated and refused by reasoning
models); ``temperature``, ``top_p``, ``stop`` (list) and ``user`` when set.
Auth: ``Authorization: Bearer <key>``.

Response mapping: ``choices[0].message.content`` is the text; ``usage``
``prompt_tokens`` (includes cached), ``completion_tokens``, ``total_tokens``
and ``prompt_tokens_details.cached_tokens`` -> ``Usage.cached_prompt_tokens``
(https://platform.openai.com/docs/guides/prompt-caching). The provider request
id is the ``x-request-id`` header. ``finish_reason: content_filter`` or a
``refusal`` without content is a ``ContentFilterError``.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import msgspec
from msgspec import Meta, Struct

from pipeline.errors import ContentFilterError
from schemas.response import Usage
from stages.providers.base import ProviderCall, ProviderResult
from stages.providers.classify import malformed_response, parse_guarded, post_json

PROVIDER = "openai"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_Tokens = Annotated[int, Meta(ge=0)]


class _PromptTokensDetails(Struct):
    cached_tokens: _Tokens | None = None


class _Usage(Struct):
    prompt_tokens: _Tokens
    completion_tokens: _Tokens
    total_tokens: _Tokens | None = None
    prompt_tokens_details: _PromptTokensDetails | None = None


class _Message(Struct):
    content: str | None = None
    refusal: str | None = None


class _Choice(Struct):
    message: _Message
    finish_reason: str | None = None


class _Completion(Struct):
    model: str
    choices: list[_Choice]
    usage: _Usage | None = None


_DECODER = msgspec.json.Decoder(_Completion)


def build_payload(call: ProviderCall) -> dict[str, Any]:
    """The JSON body for ``call`` (see the module docstring for the mapping)."""
    payload: dict[str, Any] = {
        "model": call.model,
        "messages": [{"role": m.role, "content": m.content} for m in call.messages],
        "max_completion_tokens": call.max_tokens,
    }
    if call.temperature is not None:
        payload["temperature"] = call.temperature
    if call.top_p is not None:
        payload["top_p"] = call.top_p
    if call.stop:
        payload["stop"] = list(call.stop)
    if call.user is not None:
        payload["user"] = call.user
    return payload


def parse_response(
    body: bytes, call: ProviderCall, *, request_id: str | None = None, status_code: int = 200
) -> ProviderResult:
    """Parse a chat completion body into a ``ProviderResult``.

    Args:
        body: raw JSON of a ``chat.completion`` object.
        call: the call it answers (its ``model`` is the fallback model name).
        request_id: the ``x-request-id`` header, if any.
        status_code: HTTP status the body came with (2xx).

    Returns:
        Text, model, usage (tokens; ``prompt_tokens`` includes cached ones).

    Raises:
        ProviderServerError: malformed JSON, missing fields, no choice, or empty text.
        ContentFilterError: ``finish_reason`` ``content_filter``, or a refusal with no text.
    """
    try:
        completion = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise malformed_response(PROVIDER, str(exc), status_code=status_code) from exc
    if not completion.choices:
        raise malformed_response(PROVIDER, "no choices", status_code=status_code)
    choice = completion.choices[0]
    content = choice.message.content or ""
    if choice.finish_reason == "content_filter" or (not content and choice.message.refusal):
        reason = choice.message.refusal or "finish_reason content_filter"
        raise ContentFilterError(
            f"{PROVIDER} HTTP {status_code}: refused by content policy: {reason[:200]}",
            provider=PROVIDER,
            status_code=status_code,
        )
    if not content.strip():
        raise malformed_response(PROVIDER, "empty message content", status_code=status_code)
    if completion.usage is None:
        raise malformed_response(PROVIDER, "missing usage", status_code=status_code)
    raw = completion.usage
    cached = raw.prompt_tokens_details.cached_tokens if raw.prompt_tokens_details else None
    usage = Usage(
        prompt_tokens=raw.prompt_tokens,
        completion_tokens=raw.completion_tokens,
        total_tokens=raw.total_tokens if raw.total_tokens is not None else raw.prompt_tokens + raw.completion_tokens,
        cached_prompt_tokens=min(cached or 0, raw.prompt_tokens),
    )
    return ProviderResult(
        content=content,
        model=completion.model or call.model,
        usage=usage,
        status_code=status_code,
        request_id=request_id,
        finish_reason=choice.finish_reason,
    )


class OpenAIAdapter:
    """Calls OpenAI Chat Completions (or any server speaking its wire format, such as the emulator).

    Args:
        base_url: API root including ``/v1`` (``OPENAI_BASE_URL``), e.g.
            ``https://api.openai.com/v1``; a trailing ``/`` is ignored.
        api_key: ``OPENAI_API_KEY``; ``None`` sends no ``Authorization`` header
            (the server then answers 401, an ``AuthenticationError``).
    """

    name: str = PROVIDER

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        return f"OpenAIAdapter(base_url={self.base_url!r}, api_key=<{key}>)"

    @property
    def url(self) -> str:
        """The endpoint every call is sent to: ``{base_url}/chat/completions``."""
        return f"{self.base_url}/chat/completions"

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def complete(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> ProviderResult:
        """Send ``call`` as one chat completion and return the parsed answer.

        Args:
            client: shared HTTP client (``httpx_aiohttp.HttpxAiohttpClient`` or ``httpx.AsyncClient``).
            call: model, messages and generation parameters.
            timeout_s: limit for the whole HTTP call (s).

        Returns:
            The answer's text, model and usage (tokens).

        Raises:
            AIProviderError: a subclass per ``stages.providers.classify`` (HTTP
                status, error body, transport failure, malformed 200), with
                ``provider="openai"``; never carries the API key.
        """
        secrets = (self._api_key,)
        response = await post_json(
            client,
            PROVIDER,
            self.url,
            headers=self._headers(),
            payload=build_payload(call),
            timeout_s=timeout_s,
            secrets=secrets,
        )
        return parse_guarded(
            PROVIDER,
            response.status_code,
            lambda: parse_response(
                response.content,
                call,
                request_id=response.headers.get("x-request-id"),
                status_code=response.status_code,
            ),
            secrets=secrets,
        )
