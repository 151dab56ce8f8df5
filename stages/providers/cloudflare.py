"""Cloudflare Workers AI adapter: ``POST {base_url}/accounts/{account_id}/ai/run/{model}``.

API reference: https://developers.cloudflare.com/api/resources/ai/methods/run/
(the run endpoint), https://developers.cloudflare.com/workers-ai/get-started/rest-api/
(REST usage), https://developers.cloudflare.com/workers-ai/models/ (each text
generation model's input/output schema) and
https://developers.cloudflare.com/workers-ai/platform/errors/ (error codes).
``base_url`` defaults to ``https://api.cloudflare.com/client/v4``
(``CLOUDFLARE_BASE_URL``). Auth: ``Authorization: Bearer <api token>``.

Request mapping from ``ProviderCall``: ``messages`` (the text generation
schema takes ``system``/``user``/``assistant``/``tool`` roles; details below), ``max_tokens``,
``temperature`` (schema range 0..5, so every pipeline value fits) and
``top_p``. ``stop`` and ``user`` are not sent: the text generation input schema
has no stop sequences or end-user field.

Response: every answer is the Cloudflare API envelope
``{"result", "success", "errors": [{"code", "message"}], "messages"}``.
``success: false`` is an error even with HTTP 200 and is classified from
``errors[].code``/``message`` (see ``stages.providers.classify``). The text is
``result.response``. ``result.usage`` ``{prompt_tokens, completion_tokens,
total_tokens}`` is used when present; when a model omits it, usage is
*estimated* with ``stages.rules.tokens`` (``estimate_messages_tokens`` of
the sent messages and ``estimate_tokens`` of the answer), so costs stay
approximately right. The model name is the one asked for (the envelope does
not echo it); the provider request id is the ``cf-ray`` header.

Function calling: Workers AI's "traditional" function calling
(https://developers.cloudflare.com/workers-ai/features/function-calling/traditional/,
read 2026-12-06): ``tools`` are sent as ``[{"name", "description",
"parameters"}]`` (``description`` ``""`` when the tool has none, as the
models' input schemas require it; ``parameters`` the empty object schema when
the tool takes none), and the answer's ``result.tool_calls`` are
``[{"name", "arguments": <object>}]``; the OpenAI-like entries some models
return, ``{"id", "type": "function", "function": {"name", "arguments":
<string>}}``, are read too. A call without an id gets
``synthesized_tool_call_id(name, arguments, index)``; every id is sanitised.
With tool calls, ``result.response`` may be ``null`` or absent: a valid
answer, ``content`` ``""``, ``finish_reason`` ``tool_calls``. History: an
assistant turn's calls are sent as ``{"role": "assistant", "content": <its
text or "">, "tool_calls": [{"id", "type": "function", "function": {"name",
"arguments"}}]}`` and a tool turn as ``{"role": "tool", "content",
"tool_call_id"}`` (ids sanitised), the shape the models' chat templates
read. Workers AI documents no ``tool_choice`` and no
``parallel_tool_calls``: ``tool_choice: "none"`` sends no tools; ``auto``,
``required`` and a named function send the tools and leave the choice to the
model (a limit: the call is asked for, not forced); ``parallel_tool_calls``
is not sent.

Images (vision models such as ``@cf/meta/llama-3.2-11b-vision-instruct``,
https://developers.cloudflare.com/workers-ai/models/llama-3.2-11b-vision-instruct/,
read 2026-12-06): a user turn with images is sent as OpenAI-shaped content
parts, ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url":
{"url": <data: URI>}}``; the models take image bytes only, so an https URL
is an ``InvalidRequestError`` (aipipe does not fetch URLs; the router skips
such a candidate before the call), as is an unresolved blob reference.

JSON mode (https://developers.cloudflare.com/workers-ai/features/json-mode/,
read 2026-12-06): a ``json_schema`` format is sent as ``{"type":
"json_schema", "json_schema": <the schema itself>}`` (Workers AI's field
holds the JSON Schema, not OpenAI's ``{name, schema}`` wrapper) and
``json_object`` as ``{"type": "json_object"}``; ``text`` sends nothing. In
JSON mode ``result.response`` may be a JSON object rather than a string: it
is returned as compact JSON text.

Streaming (https://developers.cloudflare.com/workers-ai/features/streaming/,
read 2026-12-06): ``stream: true`` answers with server-sent events whose
``data`` is ``{"response": "<text>"}``, the last one carrying ``usage`` on the
models that report it, then ``data: [DONE]``; a stream that ends without
``[DONE]`` was cut. Workers AI documents text streaming only: a streamed
call with tools still sends them, and ``tool_calls`` found in a stream event
(some models put them in the last one) become ``StreamToolDelta``s, each
carrying its whole arguments (the ``StreamEnd`` then says ``tool_calls``);
a model that streams no tool calls answers in text. Continuation (resume, DESIGN A9): Workers AI documents no
assistant prefill, so, as for OpenAI, the partial answer is sent as an
``assistant`` turn followed by ``CONTINUE_INSTRUCTION``; the model is asked,
not forced, to continue without repeating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import msgspec
from msgspec import Meta, Struct

from pipeline.errors import AuthenticationError, InvalidRequestError, UntranslatableRequestError
from schemas.request import (
    FunctionCall,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    ResponseFormat,
    Tool,
    ToolCall,
)
from schemas.response import Usage
from stages.providers.base import (
    CONTINUE_INSTRUCTION,
    ProviderCall,
    ProviderResult,
    StreamDelta,
    StreamEnd,
    StreamEvent,
    StreamToolDelta,
    refuse_blob_reference,
)
from stages.providers.classify import before_sending, classify_response, malformed_response, parse_guarded, post_json
from stages.providers.openai import with_tool_fields
from stages.providers.sse import open_events, stream_cut
from stages.rules.images import ImageError, data_uri, decode_data_uri
from stages.rules.tokens import estimate_messages_tokens, estimate_tokens
from stages.rules.tool_ids import conversation_digest, sanitize_tool_call_id, synthesized_tool_call_id

PROVIDER = "cloudflare"
DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"

_Tokens = Annotated[int, Meta(ge=0)]


class _Usage(Struct):
    prompt_tokens: _Tokens | None = None
    completion_tokens: _Tokens | None = None
    total_tokens: _Tokens | None = None


class _Function(Struct):
    name: str | None = None
    arguments: Any = None


class _ToolCall(Struct):
    name: str | None = None
    arguments: Any = None
    id: str | None = None
    type: str | None = None
    function: _Function | None = None


class _Result(Struct):
    response: Any = None
    usage: _Usage | None = None
    tool_calls: list[_ToolCall] | None = None


class _Envelope(Struct):
    success: bool
    result: _Result | None = None


_DECODER = msgspec.json.Decoder(_Envelope)
_EVENT_DECODER = msgspec.json.Decoder(_Result)
#: No size limit of its own on a ``data:`` image: the pipeline's ``images.max_bytes`` applied before.
_NO_IMAGE_LIMIT = 1 << 62


def _compact_json(value: Any) -> str:
    return msgspec.json.encode(value).decode("utf-8")


def _text_of(response: Any) -> str:
    """``result.response`` as text: a string as is, a JSON value (JSON mode) as compact JSON, ``None`` as ``""``."""
    if response is None:
        return ""
    if isinstance(response, str):
        return response
    return _compact_json(response)


def _tool_calls_of(raw: list[_ToolCall] | None, messages: list[Message], first_index: int = 0) -> list[ToolCall]:
    """Workers AI tool calls (either shape, module docstring) as ``ToolCall``s; ``first_index`` numbers the first.

    ``messages`` are the turns the answer follows (the context of a synthesised id).
    """
    calls: list[ToolCall] = []
    context = conversation_digest(messages) if any(not item.id for item in raw or ()) else ""
    for offset, item in enumerate(raw or ()):
        fn = item.function
        name = (fn.name if fn is not None else None) or item.name or ""
        arguments_raw = fn.arguments if fn is not None and fn.arguments is not None else item.arguments
        if isinstance(arguments_raw, str):
            arguments = arguments_raw or "{}"
        else:
            arguments = _compact_json(arguments_raw if arguments_raw is not None else {})
        raw_id = item.id or synthesized_tool_call_id(name, arguments, first_index + offset, context)
        calls.append(ToolCall(id=sanitize_tool_call_id(raw_id), function=FunctionCall(name=name, arguments=arguments)))
    return calls


async def read_events(events: AsyncIterator[Any], call: ProviderCall, provider: str) -> AsyncIterator[StreamEvent]:
    """Workers AI stream events as ``StreamDelta``s (and whole ``StreamToolDelta``s), then a ``StreamEnd``.

    See the module docstring; ``finish_reason`` is ``tool_calls`` when the
    stream carried tool calls, else ``stop``.

    Raises:
        ProviderServerError: a malformed event, or a stream cut before ``[DONE]``.
    """
    usage: Usage | None = None
    tools_seen = 0
    async for event in events:
        if event.data == "[DONE]":
            yield StreamEnd(model=call.model, usage=usage, finish_reason="tool_calls" if tools_seen else "stop")
            return
        try:
            item = _EVENT_DECODER.decode(event.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise malformed_response(provider, f"stream event: {exc}") from exc
        raw = item.usage
        if raw is not None and raw.prompt_tokens is not None and raw.completion_tokens is not None:
            usage = Usage(
                prompt_tokens=raw.prompt_tokens,
                completion_tokens=raw.completion_tokens,
                total_tokens=raw.total_tokens or raw.prompt_tokens + raw.completion_tokens,
            )
        text = _text_of(item.response)
        if text:
            yield StreamDelta(text=text)
        for tool_call in _tool_calls_of(item.tool_calls, call.messages, tools_seen):
            yield StreamToolDelta(
                index=tools_seen,
                id=tool_call.id,
                name=tool_call.function.name or None,
                arguments=tool_call.function.arguments,
            )
            tools_seen += 1
    raise stream_cut(provider, "no [DONE]")


def _image_url(url: str, provider: str) -> str:
    """An image part's URL as the ``data:`` URI Workers AI takes (module docstring)."""
    refuse_blob_reference(url, provider)
    if not url.startswith("data:"):
        raise UntranslatableRequestError(
            f"{provider}: Workers AI takes image bytes only; aipipe does not fetch URLs (got an https image URL)",
            provider=provider,
        )
    try:
        media_type, raw = decode_data_uri(url, max_bytes=_NO_IMAGE_LIMIT)
    except ImageError as exc:
        raise InvalidRequestError(f"{provider}: {exc}", provider=provider) from exc
    return data_uri(media_type, raw)


def _message_to_wire(m: Message, provider: str) -> dict[str, Any]:
    """One chat turn in the shape Workers AI's text generation models take (module docstring)."""
    content: Any = m.content
    if isinstance(m.content, list):
        if any(isinstance(p, ImagePart) for p in m.content):
            content = [
                {"type": "image_url", "image_url": {"url": _image_url(p.image_url.url, provider)}}
                if isinstance(p, ImagePart)
                else {"type": "text", "text": p.text}
                for p in m.content
            ]
        else:
            content = m.text()
    elif content is None:
        content = ""
    return with_tool_fields({"role": m.role, "content": content}, m)


def tools_to_wire(tools: list[Tool]) -> list[dict[str, Any]]:
    """``tools`` in Workers AI's traditional function calling shape: ``[{"name", "description", "parameters"}]``."""
    return [
        {"name": t.function.name, "description": t.function.description or "", "parameters": t.function.schema()}
        for t in tools
    ]


def response_format_to_wire(fmt: ResponseFormat) -> dict[str, Any] | None:
    """``response_format`` in Workers AI's JSON mode shape, or ``None`` for text (module docstring)."""
    if isinstance(fmt, JsonSchemaFormat):
        if fmt.json_schema.schema is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": fmt.json_schema.schema}
    if isinstance(fmt, JsonObjectFormat):
        return {"type": "json_object"}
    return None


def build_payload(call: ProviderCall, *, provider: str = PROVIDER) -> dict[str, Any]:
    """The JSON body for ``call`` (see the module docstring for the mapping); ``provider`` names the deployment.

    Raises:
        InvalidRequestError: an image given by https URL (Workers AI takes bytes only), an
            unresolved blob reference, or an undecodable ``data:`` URI.
    """
    messages = [_message_to_wire(m, provider) for m in call.messages]
    if call.continuation:
        messages.append({"role": "assistant", "content": call.continuation})
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    payload: dict[str, Any] = {"messages": messages, "max_tokens": call.max_tokens}
    if call.temperature is not None:
        payload["temperature"] = call.temperature
    if call.top_p is not None:
        payload["top_p"] = call.top_p
    if call.tools and call.tool_choice != "none":
        payload["tools"] = tools_to_wire(call.tools)
    if call.response_format is not None:
        fmt = response_format_to_wire(call.response_format)
        if fmt is not None:
            payload["response_format"] = fmt
    return payload


def parse_response(
    body: bytes,
    call: ProviderCall,
    *,
    request_id: str | None = None,
    status_code: int = 200,
    headers: httpx.Headers | None = None,
    secrets: Iterable[str | None] = (),
    provider: str = PROVIDER,
) -> ProviderResult:
    """Parse a Workers AI run envelope into a ``ProviderResult``.

    Args:
        body: raw JSON envelope.
        call: the call it answers (model name, and messages for estimated usage).
        request_id: the ``cf-ray`` header, if any.
        status_code: HTTP status the body came with (2xx).
        headers: response headers, used to read ``Retry-After`` of a ``success: false`` answer.
        secrets: credentials to scrub from error messages.
        provider: the deployment name errors carry.

    Returns:
        Text (JSON mode's object as compact JSON; ``""`` when the answer is only
        tool calls), tool calls (sanitised or synthesised ids), model and usage
        (tokens; estimated when ``result.usage`` is absent).

    Raises:
        AIProviderError: ``success: false``, classified from ``errors[]`` codes and messages.
        ProviderServerError: malformed JSON, or neither text nor tool calls in ``result``.
    """
    try:
        envelope = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise malformed_response(provider, str(exc), status_code=status_code) from exc
    if not envelope.success:
        raise classify_response(provider, status_code, headers or httpx.Headers(), body, secrets=secrets)
    result = envelope.result
    tool_calls = _tool_calls_of(result.tool_calls, call.messages) if result is not None else []
    if result is None or (result.response is None and not tool_calls):
        raise malformed_response(provider, "missing result.response", status_code=status_code)
    text = _text_of(result.response)
    if not text.strip() and not tool_calls:
        raise malformed_response(provider, "empty result.response", status_code=status_code)
    raw = result.usage
    if raw is not None and raw.prompt_tokens is not None and raw.completion_tokens is not None:
        prompt, completion = raw.prompt_tokens, raw.completion_tokens
        total = raw.total_tokens if raw.total_tokens is not None else prompt + completion
    else:
        prompt = estimate_messages_tokens(call.messages)
        completion = estimate_tokens(text + "".join(c.function.name + c.function.arguments for c in tool_calls))
        total = prompt + completion
    estimated = not (raw is not None and raw.prompt_tokens is not None and raw.completion_tokens is not None)
    return ProviderResult(
        content=text,
        model=call.model,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total),
        status_code=status_code,
        request_id=request_id,
        finish_reason="tool_calls" if tool_calls else None,
        usage_estimated=estimated,
        tool_calls=tool_calls or None,
    )


class CloudflareAdapter:
    """Calls Workers AI text generation models through the Cloudflare REST API (or the emulator).

    Args:
        base_url: API root (``CLOUDFLARE_BASE_URL``), default
            ``https://api.cloudflare.com/client/v4``; a trailing ``/`` is ignored.
        api_token: ``CLOUDFLARE_API_TOKEN`` sent as a Bearer token; ``None`` sends none.
        account_id: ``CLOUDFLARE_ACCOUNT_ID``, part of the URL; ``None`` makes
            every call fail with ``AuthenticationError`` without an HTTP call.
        name: the deployment name, carried by every error.
    """

    type = "cloudflare"

    def __init__(self, base_url: str, api_token: str | None, account_id: str | None, *, name: str = PROVIDER) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.account_id = account_id
        self._api_token = api_token

    def __repr__(self) -> str:
        token = "set" if self._api_token else "unset"
        where = f"name={self.name!r}, base_url={self.base_url!r}, account_id={self.account_id!r}"
        return f"CloudflareAdapter({where}, api_token=<{token}>)"

    def url_for(self, model: str) -> str:
        """The endpoint for ``model``: ``{base_url}/accounts/{account_id}/ai/run/{model}``.

        Raises:
            AuthenticationError: when no account id is configured.
        """
        if not self.account_id:
            raise AuthenticationError(f"{self.name}: no Cloudflare account id is set", provider=self.name)
        return f"{self.base_url}/accounts/{quote(self.account_id, safe='')}/ai/run/{quote(model, safe='@/')}"

    def secret_values(self) -> tuple[str, ...]:
        """The token and account id this adapter sends, so messages bound for events can be scrubbed of them."""
        return tuple(v for v in (self._api_token, self.account_id) if v)

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_token}"} if self._api_token else {}

    async def complete(self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float) -> ProviderResult:
        """Run ``call.model`` once on ``call.messages`` and return the parsed answer.

        Args:
            client: shared HTTP client (``httpx_aiohttp.HttpxAiohttpClient`` or ``httpx.AsyncClient``).
            call: model, messages and generation parameters.
            timeout_s: limit for the whole HTTP call (s).

        Returns:
            The answer's text, the model asked for, and usage (tokens).

        Raises:
            AuthenticationError: no account id (no HTTP call is made), or HTTP 401/403 / code 10000.
            InvalidRequestError: an image Workers AI cannot take (no HTTP call is made).
            AIProviderError: a subclass per ``stages.providers.classify`` (HTTP
                status, ``success: false`` codes, transport failure, malformed
                200), with ``provider`` the deployment name; never carries the API token.
        """
        secrets = (self._api_token,)
        url, payload = before_sending(lambda: (self.url_for(call.model), build_payload(call, provider=self.name)))
        response = await post_json(
            client,
            self.name,
            url,
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
                request_id=response.headers.get("cf-ray"),
                status_code=response.status_code,
                headers=response.headers,
                secrets=secrets,
                provider=self.name,
            ),
            secrets=secrets,
        )

    async def stream(
        self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float
    ) -> AsyncIterator[StreamEvent]:
        """Run ``call.model`` with ``stream: true``; deltas as they arrive, then the end (module docstring).

        Raises:
            AuthenticationError: no account id (no HTTP call is made).
            InvalidRequestError: an image Workers AI cannot take (no HTTP call is made).
            AIProviderError: as ``complete``; ``ProviderServerError`` for a cut or malformed stream.
        """

        def prepare() -> tuple[str, dict[str, Any]]:
            payload = build_payload(call, provider=self.name)
            payload["stream"] = True
            return self.url_for(call.model), payload

        url, payload = before_sending(prepare)
        events = open_events(
            client,
            self.name,
            url,
            headers=self._headers(),
            payload=payload,
            timeout_s=timeout_s,
            secrets=(self._api_token,),
        )
        async with aclosing(events):
            async for item in read_events(events, call, self.name):
                yield item
