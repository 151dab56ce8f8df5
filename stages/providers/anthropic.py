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

Streaming (https://docs.anthropic.com/en/docs/build-with-claude/streaming,
read 2026-12-06): ``stream: true`` gives ``message_start`` (the model and the
input usage), ``content_block_start``, ``content_block_delta`` with
``text_delta`` (the only deltas), ``content_block_stop``, ``message_delta``
(``stop_reason`` and the cumulative ``output_tokens``) and ``message_stop``;
``ping`` is a keep-alive. An ``error`` event (e.g. ``overloaded_error``) is
classified by the HTTP status its type stands for
(https://docs.anthropic.com/en/api/errors). A stream that ends without
``message_stop`` was cut. Continuation (resume, DESIGN A9): the partial answer
is sent as a final ``assistant`` turn, a prefill the model continues
(https://docs.anthropic.com/en/docs/build-with-claude/prompt-engineering/prefill-claudes-response);
the trailing whitespace the API refuses there is stripped and dropped again
from the front of the continuation. Its limit: prefill is not available with
extended thinking, so a deployment using it cannot resume.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

import httpx
import msgspec
from msgspec import Meta, Struct

from pipeline.errors import ContentFilterError, InvalidRequestError
from schemas.request import Message
from schemas.response import Usage
from stages.providers.base import ProviderCall, ProviderResult, StreamDelta, StreamEnd, StreamEvent
from stages.providers.classify import before_sending, classify_response, malformed_response, parse_guarded, post_json
from stages.providers.sse import open_events, stream_cut

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
    system_parts = [m.text() for m in messages if m.role == "system" and m.text().strip()]
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == "system" or not m.text().strip():
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + m.text()
        else:
            turns.append({"role": m.role, "content": m.text()})
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
    messages = list(call.messages)
    if call.continuation:
        if messages and messages[-1].role == "assistant":  # the caller's own prefill, continued by the partial
            messages[-1] = Message(role="assistant", content=messages[-1].text() + call.continuation)
        else:
            messages.append(Message(role="assistant", content=call.continuation))
    system, turns = to_anthropic_messages(messages, provider=provider)
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


#: The HTTP status each streamed ``error`` event type stands for (https://docs.anthropic.com/en/api/errors).
STREAM_ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


class _StreamMessage(Struct):
    model: str | None = None
    usage: _Usage | None = None


class _StreamDelta(Struct):
    type: str | None = None
    text: str | None = None
    stop_reason: str | None = None


class _DeltaUsage(Struct):
    output_tokens: _Tokens | None = None
    input_tokens: _Tokens | None = None
    cache_creation_input_tokens: _Tokens | None = None
    cache_read_input_tokens: _Tokens | None = None


class _ErrorInfo(Struct):
    type: str = "api_error"
    message: str = ""


class _StreamEvent(Struct):
    type: str
    message: _StreamMessage | None = None
    delta: _StreamDelta | None = None
    usage: _DeltaUsage | None = None
    error: _ErrorInfo | None = None


_EVENT_DECODER = msgspec.json.Decoder(_StreamEvent)
#: ``stop_reason`` in OpenAI's words (``finish_reason``).
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


async def read_events(
    events: AsyncIterator[Any], call: ProviderCall, provider: str, *, skip_leading: str = ""
) -> AsyncIterator[StreamEvent]:
    """Messages API stream events as ``StreamDelta``s and a final ``StreamEnd`` (module docstring).

    ``skip_leading`` is whitespace stripped from a prefill, dropped from the
    front of the continuation so that the joined text has it once.

    Raises:
        AIProviderError: an ``error`` event, classified by its type's status.
        ContentFilterError: ``stop_reason: refusal``.
        ProviderServerError: a malformed event, or a stream cut before ``message_stop``.
    """
    model = call.model
    prompt = cache_read = cache_write = output = 0
    have_usage = False
    finish: str | None = None
    async for event in events:
        try:
            item = _EVENT_DECODER.decode(event.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise malformed_response(provider, f"stream event: {exc}") from exc
        if item.type == "error":
            kind = item.error.type if item.error else "api_error"
            raise classify_response(provider, STREAM_ERROR_STATUS.get(kind, 500), {}, event.data.encode())
        if item.type == "message_start" and item.message is not None:
            model = item.message.model or model
            if item.message.usage is not None:
                raw = item.message.usage
                have_usage = True
                prompt, output = raw.input_tokens, raw.output_tokens
                cache_read, cache_write = raw.cache_read_input_tokens or 0, raw.cache_creation_input_tokens or 0
        elif item.type == "content_block_delta" and item.delta is not None and item.delta.type == "text_delta":
            text = item.delta.text or ""
            if skip_leading:
                dropped = len(text) - len(text.lstrip(skip_leading))
                keep = min(dropped, len(skip_leading))
                text, skip_leading = text[keep:], skip_leading[keep:] if keep < len(text) else ""
            if text:
                skip_leading = ""
                yield StreamDelta(text=text)
        elif item.type == "message_delta":
            if item.delta is not None and item.delta.stop_reason:
                if item.delta.stop_reason == "refusal":
                    raise ContentFilterError(
                        f"{provider}: stream stopped by content policy (refusal)", provider=provider
                    )
                finish = _FINISH.get(item.delta.stop_reason, item.delta.stop_reason)
            if item.usage is not None and item.usage.output_tokens is not None:
                output, have_usage = item.usage.output_tokens, True
        elif item.type == "message_stop":
            usage = None
            if have_usage:
                total_prompt = prompt + cache_read + cache_write
                usage = Usage(
                    prompt_tokens=total_prompt,
                    completion_tokens=output,
                    total_tokens=total_prompt + output,
                    cached_prompt_tokens=cache_read,
                    cache_creation_prompt_tokens=cache_write,
                )
            yield StreamEnd(model=model, usage=usage, finish_reason=finish)
            return
    raise stream_cut(provider, "no message_stop")


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

    async def stream(
        self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float
    ) -> AsyncIterator[StreamEvent]:
        """Send ``call`` with ``stream: true``; deltas as they arrive, then the end with usage (module docstring).

        Raises:
            InvalidRequestError: no non-empty user/assistant turn (no HTTP call is made).
            AIProviderError: as ``complete``; an ``error`` event mid-stream; a cut or malformed stream.
        """

        def prepare() -> dict[str, Any]:
            payload = build_payload(call, provider=self.name)
            payload["stream"] = True
            return payload

        payload = before_sending(prepare)
        partial = call.continuation or ""
        skip = partial[len(partial.rstrip()) :] if partial else ""
        events = open_events(
            client,
            self.name,
            self.url,
            headers=self._headers(),
            payload=payload,
            timeout_s=timeout_s,
            secrets=(self._api_key,),
        )
        async with aclosing(events):
            async for item in read_events(events, call, self.name, skip_leading=skip):
                yield item
