"""Anthropic Messages adapter: ``POST {base_url}/v1/messages``.

API reference: https://docs.anthropic.com/en/api/messages (request and
response), https://docs.anthropic.com/en/api/versioning (``anthropic-version``),
https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching (usage
fields). ``base_url`` has no ``/v1``, like the SDK's ``ANTHROPIC_BASE_URL``
(default ``https://api.anthropic.com``). Headers: ``x-api-key`` and
``anthropic-version`` (default ``2023-06-01``).

Request mapping from ``ProviderCall`` (the Messages API has stricter rules
than the chat format the pipeline uses):

* ``system`` messages are removed from ``messages`` and joined, in order, with
  a blank line into the top-level ``system`` string.
* Messages whose content is empty or whitespace are dropped (the API refuses
  empty text blocks), then consecutive messages of the same role are merged
  into one, joined with a blank line.
* The first message must be ``user``: when the conversation starts with an
  ``assistant`` turn, a user turn ``LEADING_USER_TURN`` is put in front of it.
* A final ``assistant`` message is a prefill the model continues; its trailing
  whitespace is stripped (the API refuses trailing whitespace there).
* ``max_tokens`` is always sent (required by the API).
* ``temperature`` is clamped to the API's range 0..1. When ``top_p`` is set and
  ``temperature`` is the pipeline default ``1.0``, only ``top_p`` is sent (the
  API asks to alter one of the two, and recent models refuse both); otherwise
  both are sent as given.
* ``stop`` -> ``stop_sequences``; ``user`` -> ``metadata.user_id``.

Response mapping: the ``text`` blocks of ``content`` joined; ``usage``:
``prompt_tokens = input_tokens + cache_read_input_tokens +
cache_creation_input_tokens`` (``input_tokens`` excludes both cache counts),
``cached_prompt_tokens = cache_read_input_tokens``,
``cache_creation_prompt_tokens = cache_creation_input_tokens``,
``completion_tokens = output_tokens``. ``stop_reason: refusal`` is a
``ContentFilterError``. The provider request id is the ``request-id`` header.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import msgspec
from msgspec import Meta, Struct

from pipeline.errors import ContentFilterError, InvalidRequestError
from schemas.request import Message
from schemas.response import Usage
from stages.providers.base import ProviderCall, ProviderResult
from stages.providers.classify import before_sending, malformed_response, parse_guarded, post_json

PROVIDER = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
#: User turn put in front of a conversation that starts with an assistant turn.
LEADING_USER_TURN = "(The conversation so far follows.)"
#: Highest ``temperature`` the Messages API accepts.
MAX_TEMPERATURE = 1.0
_DEFAULT_TEMPERATURE = 1.0

_Tokens = Annotated[int, Meta(ge=0)]


class _Block(Struct):
    type: str
    text: str | None = None


class _Usage(Struct):
    input_tokens: _Tokens
    output_tokens: _Tokens
    cache_creation_input_tokens: _Tokens | None = None
    cache_read_input_tokens: _Tokens | None = None


class _MessageResponse(Struct):
    model: str
    content: list[_Block]
    usage: _Usage
    type: str = "message"
    stop_reason: str | None = None


_DECODER = msgspec.json.Decoder(_MessageResponse)


def to_anthropic_messages(
    messages: list[Message], *, provider: str = PROVIDER
) -> tuple[str | None, list[dict[str, str]]]:
    """Split chat messages into Anthropic's ``system`` string and ``messages`` list.

    Applies the rules of the module docstring (system join, empty drop, role
    merge, leading user turn, prefill whitespace).

    Args:
        messages: the pipeline's chat turns.
        provider: the deployment name an error carries.

    Returns:
        ``(system or None, [{"role": "user"|"assistant", "content": str}, ...])``.

    Raises:
        InvalidRequestError: when no non-empty user or assistant turn is left.
    """
    system_parts = [m.content for m in messages if m.role == "system" and m.content.strip()]
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == "system" or not m.content.strip():
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": m.role, "content": m.content})
    if not turns:
        raise InvalidRequestError(
            f"{provider}: the request has no non-empty user or assistant message", provider=provider
        )
    if turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": LEADING_USER_TURN})
    if turns[-1]["role"] == "assistant":
        turns[-1]["content"] = turns[-1]["content"].rstrip()
    return ("\n\n".join(system_parts) if system_parts else None), turns


def build_payload(call: ProviderCall, *, provider: str = PROVIDER) -> dict[str, Any]:
    """The JSON body for ``call`` (see the module docstring for the mapping); ``provider`` names the deployment.

    Raises:
        InvalidRequestError: when no non-empty user or assistant turn is left.
    """
    system, turns = to_anthropic_messages(call.messages, provider=provider)
    payload: dict[str, Any] = {"model": call.model, "max_tokens": call.max_tokens, "messages": turns}
    if system is not None:
        payload["system"] = system
    temperature = call.temperature
    if call.top_p is not None and temperature == _DEFAULT_TEMPERATURE:
        temperature = None
    if temperature is not None:
        payload["temperature"] = min(max(temperature, 0.0), MAX_TEMPERATURE)
    if call.top_p is not None:
        payload["top_p"] = call.top_p
    if call.stop:
        payload["stop_sequences"] = list(call.stop)
    if call.user is not None:
        payload["metadata"] = {"user_id": call.user}
    return payload


def parse_response(
    body: bytes, call: ProviderCall, *, request_id: str | None = None, status_code: int = 200, provider: str = PROVIDER
) -> ProviderResult:
    """Parse a Messages API ``message`` body into a ``ProviderResult``.

    Args:
        body: raw JSON of a ``{"type": "message", ...}`` object.
        call: the call it answers (its ``model`` is the fallback model name).
        request_id: the ``request-id`` header, if any.
        status_code: HTTP status the body came with (2xx).
        provider: the deployment name errors carry.

    Returns:
        Text, model and usage (tokens; ``prompt_tokens`` includes cache reads and writes).

    Raises:
        ProviderServerError: malformed JSON, missing fields, not a message, or no text.
        ContentFilterError: ``stop_reason`` ``refusal``.
    """
    try:
        message = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise malformed_response(provider, str(exc), status_code=status_code) from exc
    if message.type != "message":
        raise malformed_response(provider, f"unexpected object type {message.type[:40]!r}", status_code=status_code)
    if message.stop_reason == "refusal":
        raise ContentFilterError(
            f"{provider} HTTP {status_code}: refused by content policy (stop_reason refusal)",
            provider=provider,
            status_code=status_code,
        )
    text = "".join(b.text or "" for b in message.content if b.type == "text")
    if not text.strip():
        raise malformed_response(provider, "no text content", status_code=status_code)
    raw = message.usage
    cache_read = raw.cache_read_input_tokens or 0
    cache_write = raw.cache_creation_input_tokens or 0
    prompt = raw.input_tokens + cache_read + cache_write
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=raw.output_tokens,
        total_tokens=prompt + raw.output_tokens,
        cached_prompt_tokens=cache_read,
        cache_creation_prompt_tokens=cache_write,
    )
    return ProviderResult(
        content=text,
        model=message.model or call.model,
        usage=usage,
        status_code=status_code,
        request_id=request_id,
        finish_reason=message.stop_reason,
    )


class AnthropicAdapter:
    """Calls the Anthropic Messages API (or the emulator speaking it).

    Args:
        base_url: API root without ``/v1`` (``ANTHROPIC_BASE_URL``), e.g.
            ``https://api.anthropic.com``; a trailing ``/`` is ignored.
        api_key: ``ANTHROPIC_API_KEY`` sent as ``x-api-key``; ``None`` sends none
            (the server answers 401, an ``AuthenticationError``).
        version: the ``anthropic-version`` header.
        name: the deployment name, carried by every error.
    """

    type = "anthropic"

    def __init__(
        self, base_url: str, api_key: str | None, version: str = DEFAULT_VERSION, *, name: str = PROVIDER
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.version = version
        self._api_key = api_key

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        where = f"name={self.name!r}, base_url={self.base_url!r}, version={self.version!r}"
        return f"AnthropicAdapter({where}, api_key=<{key}>)"

    @property
    def url(self) -> str:
        """The endpoint every call is sent to: ``{base_url}/v1/messages``."""
        return f"{self.base_url}/v1/messages"

    def secret_values(self) -> tuple[str, ...]:
        """The credentials this adapter sends, so messages bound for events can be scrubbed of them."""
        return (self._api_key,) if self._api_key else ()

    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.version}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    async def complete(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> ProviderResult:
        """Send ``call`` as one Messages request and return the parsed answer.

        Args:
            client: shared HTTP client (``httpx_aiohttp.HttpxAiohttpClient`` or ``httpx.AsyncClient``).
            call: model, messages and generation parameters.
            timeout_s: limit for the whole HTTP call (s).

        Returns:
            The answer's text, model and usage (tokens).

        Raises:
            InvalidRequestError: no non-empty user/assistant turn (no HTTP call is made).
            AIProviderError: a subclass per ``stages.providers.classify`` (HTTP
                status incl. 529 overloaded, error body, transport failure,
                malformed 200), with ``provider`` the deployment name; never carries the API key.
        """
        secrets = (self._api_key,)
        payload = before_sending(lambda: build_payload(call, provider=self.name))
        response = await post_json(
            client,
            self.name,
            self.url,
            headers=self._headers(),
            payload=payload,
            timeout_s=timeout_s,
            secrets=secrets,
        )
        return parse_guarded(
            self.name,
            response.status_code,
            lambda: parse_response(
                response.content,
                call,
                request_id=response.headers.get("request-id"),
                status_code=response.status_code,
                provider=self.name,
            ),
            secrets=secrets,
        )
