"""The OpenAI Chat Completions wire format, for the deployment types openai, azure_openai, openai_compatible.

API reference: https://platform.openai.com/docs/api-reference/chat/create
(request) and https://platform.openai.com/docs/api-reference/chat/object
(response). One adapter class speaks the format; a deployment is an
instance of it with its own name, URL, key and flavour.

``openai``: ``POST {base_url}/chat/completions`` with ``base_url`` including
``/v1`` like the SDK's ``OPENAI_BASE_URL`` (default
``https://api.openai.com/v1``); ``Authorization: Bearer <key>``; ``max_tokens``
is sent as ``max_completion_tokens`` (the current name; ``max_tokens`` is
deprecated and refused by reasoning models); ``user`` is sent.

``azure_openai`` (https://learn.microsoft.com/azure/ai-services/openai/reference,
read 2026-12-06): ``POST {base_url}/openai/deployments/{deployment-id}/chat/completions?api-version={v}``
where ``base_url`` is the resource endpoint (``https://RESOURCE.openai.azure.com``),
the deployment id is the model's entry in ``azure_deployments`` (default: the
model name) and ``api-version`` the deployment's (default the GA
``2024-10-21``); the key goes in the ``api-key`` header. ``max_tokens`` is
sent as ``max_tokens`` (every api-version takes it; set ``max_tokens_field =
"max_completion_tokens"`` for o-series deployments). Azure's content
filter: a filtered prompt is HTTP 400 with ``error.code: content_filter``
(``innererror.code: ResponsibleAIPolicyViolation``), a filtered answer is a
200 with ``finish_reason: content_filter``; both are ``ContentFilterError``.

``openai_compatible`` (vLLM, Ollama, LM Studio, llama.cpp, Groq, Together,
Mistral, DeepSeek, OpenRouter...): the OpenAI format with the common
deviations handled. Only the fields every one of them accepts are sent
(``model``, ``messages``, ``max_tokens``, ``temperature``, ``top_p``,
``stop``): Mistral answers 422 ``extra_forbidden`` to
``max_completion_tokens`` and to fields it does not know, Ollama and
llama.cpp document ``max_tokens`` only. An answer without ``usage`` is
priced from counted tokens and flagged ``usage_estimated``; DeepSeek's
``prompt_cache_hit_tokens`` counts as cached prompt tokens where
``prompt_tokens_details`` is absent
(https://api-docs.deepseek.com/api/create-chat-completion). Error bodies
that are not OpenAI's shape (vLLM ``{"object": "error", "message", "code"}``,
Ollama ``{"error": "text"}``, Mistral's ``message`` object) are read by
``classify.extract_error_detail`` and classified from the status code.

Response mapping (all three): ``choices[0].message.content`` is the text;
``usage`` ``prompt_tokens`` (includes cached), ``completion_tokens``,
``total_tokens`` and ``prompt_tokens_details.cached_tokens`` ->
``Usage.cached_prompt_tokens``
(https://platform.openai.com/docs/guides/prompt-caching). The provider request
id is the ``x-request-id`` header (Azure: ``apim-request-id``).
``finish_reason: content_filter`` or a ``refusal`` without content is a
``ContentFilterError``.

Tools, images and structured output (DESIGN A4; request fields from
https://platform.openai.com/docs/api-reference/chat/create, the function
calling guide https://platform.openai.com/docs/guides/function-calling, the
vision guide https://platform.openai.com/docs/guides/images-vision and the
structured outputs guide https://platform.openai.com/docs/guides/structured-outputs,
all read 2026-12-06). The pipeline's messages are already OpenAI's shape, so
they go out as they are: ``content`` a string, ``null`` (an assistant turn
with ``tool_calls``) or parts ``{"type": "text", "text"}`` /
``{"type": "image_url", "image_url": {"url", "detail"?}}`` (an https URL or a
``data:`` URI; a blob reference the executor did not resolve is an
``InvalidRequestError``); an assistant turn's ``tool_calls`` as
``{"id", "type": "function", "function": {"name", "arguments"}}`` and a
``tool`` turn's ``tool_call_id``, every id through ``sanitize_tool_call_id``
(so the assistant turn and its tool turns name the same id whichever
provider minted it). ``tools`` (``{"type": "function", "function": {name,
description?, parameters?, strict?}}``), ``tool_choice`` (``"auto"``,
``"none"``, ``"required"`` or ``{"type": "function", "function": {"name"}}``),
``parallel_tool_calls`` and ``response_format`` (``{"type": "json_object"}``,
``{"type": "json_schema", "json_schema": {name, description?, schema?,
strict?}}``) are sent as documented. ``openai_compatible`` gets ``tools``,
``tool_choice`` and a JSON ``response_format`` (vLLM, Ollama, llama.cpp,
Groq, Mistral and the others name them the same way) but neither
``parallel_tool_calls`` nor ``{"type": "text"}`` (the default anyway): that
keeps to "only the fields they all accept", and a server that does not know
``parallel_tool_calls`` (Mistral answers 422 to an unknown field) must not
fail a call over a hint. In an answer, ``choices[0].message.tool_calls``
become ``ToolCall``s with sanitised ids (a compatible server's call without
an id gets ``synthesized_tool_call_id``; empty ``arguments`` become ``{}``);
an answer with tool calls and empty or ``null`` content is valid.
``finish_reason`` passes through when it is one of OpenAI's words (``stop``,
``length``, ``tool_calls``, ``content_filter``); compatible servers' other
words are mapped (``function_call`` -> ``tool_calls``, ``eos`` ->
``stop``, ...) or dropped (``None``).

Streaming (https://platform.openai.com/docs/api-reference/chat-streaming,
read 2026-12-06): ``stream: true`` gives ``chat.completion.chunk`` events
ending with ``data: [DONE]``; a chunk's ``delta.tool_calls`` entries ``{index,
id?, type?, function: {name?, arguments?}}`` become ``StreamToolDelta``s
(the first piece of a call carries its id, sanitised, and name; later
pieces append to its arguments), and a stream whose only output is tool
calls, ending with ``finish_reason: tool_calls``, ends cleanly;
``stream_options: {"include_usage": true}``
adds a last chunk with empty ``choices`` and the ``usage``. It is asked for
by ``openai`` and ``azure_openai``; ``openai_compatible`` servers get only
``stream: true`` (Mistral refuses unknown fields) and an answer without
usage is counted. A stream that ends without ``[DONE]`` and without a
``finish_reason`` was cut. Continuation (resume, DESIGN A9): the Chat
Completions API has no assistant prefill, so the partial answer is sent as an
``assistant`` turn followed by ``CONTINUE_INSTRUCTION`` as a ``user`` turn. Its
limit: the model is asked, not forced, to continue without repeating.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
import msgspec
from msgspec import Meta, Struct

from pipeline.errors import ContentFilterError
from schemas.request import (
    FunctionCall,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    ResponseFormat,
    TextFormat,
    Tool,
    ToolCall,
    ToolChoice,
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
from stages.providers.classify import before_sending, malformed_response, parse_guarded, post_json
from stages.providers.sse import open_events, stream_cut
from stages.rules.tokens import estimate_messages_tokens, estimate_tokens
from stages.rules.tool_ids import conversation_digest, sanitize_tool_call_id, synthesized_tool_call_id

PROVIDER = "openai"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: The deployment types this wire format serves.
Flavor = Literal["openai", "azure_openai", "openai_compatible"]
#: Where each flavour puts ``max_tokens`` unless the deployment says otherwise (module docstring).
DEFAULT_MAX_TOKENS_FIELD: dict[str, str] = {
    "openai": "max_completion_tokens",
    "azure_openai": "max_tokens",
    "openai_compatible": "max_tokens",
}

_Tokens = Annotated[int, Meta(ge=0)]


class _PromptTokensDetails(Struct):
    cached_tokens: _Tokens | None = None


class _Usage(Struct):
    prompt_tokens: _Tokens
    completion_tokens: _Tokens
    total_tokens: _Tokens | None = None
    prompt_tokens_details: _PromptTokensDetails | None = None
    prompt_cache_hit_tokens: _Tokens | None = None  # DeepSeek


class _Function(Struct):
    name: str = ""
    arguments: str | None = None


class _ToolCall(Struct):
    function: _Function
    id: str | None = None
    type: str = "function"


class _Message(Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(Struct):
    message: _Message
    finish_reason: str | None = None


class _Completion(Struct):
    model: str
    choices: list[_Choice]
    usage: _Usage | None = None


_DECODER = msgspec.json.Decoder(_Completion)


#: Compatible servers' ``finish_reason`` words outside OpenAI's four, in OpenAI's words (module docstring).
_FINISH_ALIASES: dict[str, str] = {
    "function_call": "tool_calls",
    "tool_use": "tool_calls",
    "eos": "stop",
    "eos_token": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_length": "length",
}
_FINISH_WORDS = frozenset({"stop", "length", "tool_calls", "content_filter"})


def finish_reason_of(raw: str | None) -> str | None:
    """``raw`` as one of OpenAI's ``finish_reason`` words, or ``None`` for a word it has no equivalent of."""
    if raw is None or raw in _FINISH_WORDS:
        return raw
    return _FINISH_ALIASES.get(raw)


def _message_to_wire(m: Message, provider: str) -> dict[str, Any]:
    """One chat turn in OpenAI's shape, ids sanitised, images checked (module docstring)."""
    content: Any = m.content
    if isinstance(m.content, list):
        parts: list[dict[str, Any]] = []
        for part in m.content:
            if isinstance(part, ImagePart):
                url = part.image_url.url
                refuse_blob_reference(url, provider)
                image: dict[str, Any] = {"url": url}
                if part.image_url.detail is not None:
                    image["detail"] = part.image_url.detail
                parts.append({"type": "image_url", "image_url": image})
            else:
                parts.append({"type": "text", "text": part.text})
        content = parts
    return with_tool_fields({"role": m.role, "content": content}, m)


def with_tool_fields(wire: dict[str, Any], m: Message) -> dict[str, Any]:
    """``wire`` (one message in OpenAI's shape) with ``m``'s ``tool_calls`` and ``tool_call_id``, ids sanitised."""
    if m.tool_calls:
        wire["tool_calls"] = tool_calls_to_wire(m.tool_calls)
    if m.tool_call_id is not None:
        wire["tool_call_id"] = sanitize_tool_call_id(m.tool_call_id)
    return wire


def tool_calls_to_wire(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """An assistant turn's tool calls in OpenAI's ``tool_calls`` shape, ids sanitised (``stages.rules.tool_ids``)."""
    return [
        {
            "id": sanitize_tool_call_id(c.id),
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in calls
    ]


def tools_to_wire(tools: list[Tool]) -> list[dict[str, Any]]:
    """``tools`` as OpenAI's ``[{"type": "function", "function": {name, description?, parameters?, strict?}}]``."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        fn = tool.function
        spec: dict[str, Any] = {"name": fn.name}
        if fn.description is not None:
            spec["description"] = fn.description
        if fn.parameters is not None:
            spec["parameters"] = fn.parameters
        if fn.strict is not None:
            spec["strict"] = fn.strict
        out.append({"type": "function", "function": spec})
    return out


def tool_choice_to_wire(choice: ToolChoice) -> str | dict[str, Any]:
    """``tool_choice`` as OpenAI takes it: the word, or ``{"type": "function", "function": {"name"}}``."""
    if isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.function.name}}


def response_format_to_wire(fmt: ResponseFormat) -> dict[str, Any]:
    """``response_format`` in OpenAI's shape (``json_schema``: ``{name, description?, schema?, strict?}``)."""
    if isinstance(fmt, JsonSchemaFormat):
        spec: dict[str, Any] = {"name": fmt.json_schema.name}
        if fmt.json_schema.description is not None:
            spec["description"] = fmt.json_schema.description
        if fmt.json_schema.schema is not None:
            spec["schema"] = fmt.json_schema.schema
        if fmt.json_schema.strict is not None:
            spec["strict"] = fmt.json_schema.strict
        return {"type": "json_schema", "json_schema": spec}
    if isinstance(fmt, JsonObjectFormat):
        return {"type": "json_object"}
    return {"type": "text"}


def build_payload(
    call: ProviderCall, *, flavor: Flavor = "openai", max_tokens_field: str | None = None, provider: str = PROVIDER
) -> dict[str, Any]:
    """The JSON body for ``call`` in ``flavor``'s dialect (see the module docstring for the mapping).

    Raises:
        InvalidRequestError: an image is an unresolved ``aipipe-blob:`` reference.
    """
    messages = [_message_to_wire(m, provider) for m in call.messages]
    if call.continuation:
        messages.append({"role": "assistant", "content": call.continuation})
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    payload: dict[str, Any] = {
        "model": call.model,
        "messages": messages,
        max_tokens_field or DEFAULT_MAX_TOKENS_FIELD[flavor]: call.max_tokens,
    }
    if call.temperature is not None:
        payload["temperature"] = call.temperature
    if call.top_p is not None:
        payload["top_p"] = call.top_p
    if call.stop:
        payload["stop"] = list(call.stop)
    if call.user is not None and flavor != "openai_compatible":
        payload["user"] = call.user
    if call.tools:
        payload["tools"] = tools_to_wire(call.tools)
        if call.tool_choice is not None:
            payload["tool_choice"] = tool_choice_to_wire(call.tool_choice)
        if call.parallel_tool_calls is not None and flavor != "openai_compatible":
            payload["parallel_tool_calls"] = call.parallel_tool_calls
    fmt = call.response_format
    if fmt is not None and not (flavor == "openai_compatible" and isinstance(fmt, TextFormat)):
        payload["response_format"] = response_format_to_wire(fmt)
    return payload


def _tool_calls_of(raw: list[_ToolCall] | None, messages: list[Message]) -> list[ToolCall] | None:
    """The answer's tool calls with sanitised ids (a missing id is synthesised), or ``None`` when there are none.

    ``messages`` are the turns the answer follows (the context of a synthesised id).
    """
    if not raw:
        return None
    context = conversation_digest(messages) if any(not item.id for item in raw) else ""
    calls: list[ToolCall] = []
    for index, item in enumerate(raw):
        arguments = item.function.arguments or "{}"
        raw_id = item.id or synthesized_tool_call_id(item.function.name, arguments, index, context)
        calls.append(
            ToolCall(
                id=sanitize_tool_call_id(raw_id), function=FunctionCall(name=item.function.name, arguments=arguments)
            )
        )
    return calls


def parse_response(
    body: bytes,
    call: ProviderCall,
    *,
    request_id: str | None = None,
    status_code: int = 200,
    provider: str = PROVIDER,
    usage_optional: bool = False,
) -> ProviderResult:
    """Parse a chat completion body into a ``ProviderResult``.

    Args:
        body: raw JSON of a ``chat.completion`` object.
        call: the call it answers (its ``model`` is the fallback model name).
        request_id: the provider's request id header, if any.
        status_code: HTTP status the body came with (2xx).
        provider: the deployment name errors carry.
        usage_optional: an answer without ``usage`` gets counted tokens, flagged
            ``usage_estimated`` (``openai_compatible``), instead of being malformed.

    Returns:
        Text (``""`` when the answer is only tool calls), tool calls (sanitised
        ids), model, usage (tokens; ``prompt_tokens`` includes cached ones),
        ``finish_reason`` in OpenAI's words.

    Raises:
        ProviderServerError: malformed JSON, missing fields, no choice, or neither text nor tool calls.
        ContentFilterError: ``finish_reason`` ``content_filter``, or a refusal with no text.
    """
    try:
        completion = _DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise malformed_response(provider, str(exc), status_code=status_code) from exc
    if not completion.choices:
        raise malformed_response(provider, "no choices", status_code=status_code)
    choice = completion.choices[0]
    content = choice.message.content or ""
    if choice.finish_reason == "content_filter" or (not content and choice.message.refusal):
        reason = choice.message.refusal or "finish_reason content_filter"
        raise ContentFilterError(
            f"{provider} HTTP {status_code}: refused by content policy: {reason[:200]}",
            provider=provider,
            status_code=status_code,
        )
    tool_calls = _tool_calls_of(choice.message.tool_calls, call.messages)
    if not content.strip() and not tool_calls:
        raise malformed_response(provider, "empty message content", status_code=status_code)
    raw = completion.usage
    if raw is None:
        if not usage_optional:
            raise malformed_response(provider, "missing usage", status_code=status_code)
        prompt = estimate_messages_tokens(call.messages)
        answered = content + "".join(c.function.name + c.function.arguments for c in tool_calls or ())
        completion_tokens = estimate_tokens(answered)
        usage = Usage(
            prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
        )
    else:
        cached = raw.prompt_tokens_details.cached_tokens if raw.prompt_tokens_details else None
        if cached is None:
            cached = raw.prompt_cache_hit_tokens
        usage = Usage(
            prompt_tokens=raw.prompt_tokens,
            completion_tokens=raw.completion_tokens,
            total_tokens=raw.total_tokens
            if raw.total_tokens is not None
            else raw.prompt_tokens + raw.completion_tokens,
            cached_prompt_tokens=min(cached or 0, raw.prompt_tokens),
        )
    return ProviderResult(
        content=content,
        model=completion.model or call.model,
        usage=usage,
        status_code=status_code,
        request_id=request_id,
        finish_reason=finish_reason_of(choice.finish_reason),
        usage_estimated=raw is None,
        tool_calls=tool_calls,
    )


class _DeltaFunction(Struct):
    name: str | None = None
    arguments: str | None = None


class _DeltaToolCall(Struct):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: _DeltaFunction | None = None


class _Delta(Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_DeltaToolCall] | None = None


class _ChunkChoice(Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(Struct):
    model: str | None = None
    choices: list[_ChunkChoice] = []
    usage: _Usage | None = None


_CHUNK_DECODER = msgspec.json.Decoder(_Chunk)


def _usage_of(raw: _Usage) -> Usage:
    cached = raw.prompt_tokens_details.cached_tokens if raw.prompt_tokens_details else None
    if cached is None:
        cached = raw.prompt_cache_hit_tokens
    return Usage(
        prompt_tokens=raw.prompt_tokens,
        completion_tokens=raw.completion_tokens,
        total_tokens=raw.total_tokens if raw.total_tokens is not None else raw.prompt_tokens + raw.completion_tokens,
        cached_prompt_tokens=min(cached or 0, raw.prompt_tokens),
    )


async def read_chunks(events: AsyncIterator[Any], call: ProviderCall, provider: str) -> AsyncIterator[StreamEvent]:
    """``chat.completion.chunk`` events as ``StreamDelta``s, ``StreamToolDelta``s and a final ``StreamEnd``.

    A ``delta.tool_calls`` entry without ``index`` (a compatible server's) is
    placed by its position in the chunk. See the module docstring.

    Raises:
        ProviderServerError: a malformed event, or a stream cut before ``[DONE]``/``finish_reason``.
        ContentFilterError: ``finish_reason: content_filter``.
    """
    model = call.model
    usage: Usage | None = None
    finish: str | None = None
    async for event in events:
        if event.data == "[DONE]":
            yield StreamEnd(model=model, usage=usage, finish_reason=finish_reason_of(finish))
            return
        try:
            chunk = _CHUNK_DECODER.decode(event.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise malformed_response(provider, f"stream event: {exc}") from exc
        model = chunk.model or model
        if chunk.usage is not None:
            usage = _usage_of(chunk.usage)
        for choice in chunk.choices[:1]:
            if choice.finish_reason == "content_filter":
                raise ContentFilterError(
                    f"{provider}: stream stopped by content policy (finish_reason content_filter)", provider=provider
                )
            finish = choice.finish_reason or finish
            if choice.delta is None:
                continue
            if choice.delta.content:
                yield StreamDelta(text=choice.delta.content)
            for position, piece in enumerate(choice.delta.tool_calls or ()):
                fn = piece.function
                yield StreamToolDelta(
                    index=piece.index if piece.index is not None else position,
                    id=sanitize_tool_call_id(piece.id) if piece.id else None,
                    name=fn.name if fn is not None and fn.name else None,
                    arguments=(fn.arguments or "") if fn is not None else "",
                )
    if finish is None:
        raise stream_cut(provider, "no [DONE]")
    yield StreamEnd(model=model, usage=usage, finish_reason=finish_reason_of(finish))


class OpenAIAdapter:
    """Calls one deployment that speaks OpenAI Chat Completions: OpenAI, Azure OpenAI or a compatible server.

    Args:
        base_url: API root: including ``/v1`` for ``openai`` and
            ``openai_compatible`` (``OPENAI_BASE_URL``, e.g.
            ``https://api.openai.com/v1``), the resource endpoint for
            ``azure_openai``; a trailing ``/`` is ignored.
        api_key: the deployment's key; ``None`` sends no key (a local server;
            a server that needs one answers 401, an ``AuthenticationError``).
        name: the deployment name, carried by every error.
        flavor: ``openai``, ``azure_openai`` or ``openai_compatible`` (module docstring).
        api_version: Azure's ``api-version`` (required for ``azure_openai``).
        azure_deployments: Azure model -> deployment id (default: the model name).
        max_tokens_field: body field for ``max_tokens`` (default per flavour).

    Raises:
        ValueError: for ``azure_openai`` without ``api_version``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        name: str = PROVIDER,
        flavor: Flavor = "openai",
        api_version: str | None = None,
        azure_deployments: Mapping[str, str] | None = None,
        max_tokens_field: str | None = None,
    ) -> None:
        if flavor == "azure_openai" and not api_version:
            raise ValueError(f"{name}: azure_openai needs an api_version")
        self.name = name
        self.type: str = flavor
        self.flavor: Flavor = flavor
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.api_version = api_version
        self.azure_deployments = dict(azure_deployments or {})
        self.max_tokens_field = max_tokens_field

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        return f"OpenAIAdapter(name={self.name!r}, flavor={self.flavor!r}, base_url={self.base_url!r}, api_key=<{key}>)"

    @property
    def url(self) -> str:
        """The endpoint of an ``openai``/``openai_compatible`` call: ``{base_url}/chat/completions``."""
        return f"{self.base_url}/chat/completions"

    def url_for(self, model: str) -> str:
        """The endpoint a call for ``model`` is sent to (Azure: the model's deployment URL with ``api-version``)."""
        if self.flavor != "azure_openai":
            return self.url
        deployment = quote(self.azure_deployments.get(model, model), safe="")
        return f"{self.base_url}/openai/deployments/{deployment}/chat/completions?api-version={self.api_version}"

    def secret_values(self) -> tuple[str, ...]:
        """The credentials this adapter sends, so messages bound for events can be scrubbed of them."""
        return (self._api_key,) if self._api_key else ()

    def _headers(self) -> dict[str, str]:
        if not self._api_key:
            return {}
        if self.flavor == "azure_openai":
            return {"api-key": self._api_key}
        return {"authorization": f"Bearer {self._api_key}"}

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
                ``provider`` the deployment name; never carries the API key.
        """
        secrets = (self._api_key,)
        url, payload = before_sending(
            lambda: (
                self.url_for(call.model),
                build_payload(call, flavor=self.flavor, max_tokens_field=self.max_tokens_field, provider=self.name),
            )
        )
        response = await post_json(
            client,
            self.name,
            url,
            headers=self._headers(),
            payload=payload,
            timeout_s=timeout_s,
            secrets=secrets,
        )
        request_id = response.headers.get("x-request-id") or response.headers.get("apim-request-id")
        return parse_guarded(
            self.name,
            response.status_code,
            lambda: parse_response(
                response.content,
                call,
                request_id=request_id,
                status_code=response.status_code,
                provider=self.name,
                usage_optional=self.flavor == "openai_compatible",
            ),
            secrets=secrets,
        )

    async def stream(
        self, client: httpx.AsyncClient, call: ProviderCall, timeout_s: float
    ) -> AsyncIterator[StreamEvent]:
        """Send ``call`` with ``stream: true``; deltas as they arrive, then the end with usage (module docstring).

        Raises:
            AIProviderError: as ``complete``; ``ProviderServerError`` for a cut or malformed stream.
        """
        secrets = (self._api_key,)

        def prepare() -> tuple[str, dict[str, Any]]:
            payload = build_payload(
                call, flavor=self.flavor, max_tokens_field=self.max_tokens_field, provider=self.name
            )
            payload["stream"] = True
            if self.flavor != "openai_compatible":
                payload["stream_options"] = {"include_usage": True}
            return self.url_for(call.model), payload

        url, payload = before_sending(prepare)
        events = open_events(
            client, self.name, url, headers=self._headers(), payload=payload, timeout_s=timeout_s, secrets=secrets
        )
        async with aclosing(events):
            async for item in read_chunks(events, call, self.name):
                yield item
