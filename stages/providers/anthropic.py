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
* Each other message becomes a list of content blocks (below). Empty or
  whitespace text is dropped (the API refuses empty text blocks) and a
  message left with no block is dropped; an assistant turn with
  ``tool_calls`` always has its ``tool_use`` blocks, so it is never dropped.
  Consecutive turns of the same role are merged into one (a ``tool`` turn
  counts as ``user``), text meeting text joined with a blank line.
* The first message must be ``user``: when the conversation starts with an
  ``assistant`` turn, a user turn ``LEADING_USER_TURN`` is put in front of it.
* A final ``assistant`` message is a prefill the model continues; the
  trailing whitespace of its last text is stripped (the API refuses trailing
  whitespace there).
* A turn that is one text block is sent as a plain ``content`` string (as
  before tools existed); any other turn as its block list.
* ``max_tokens`` is always sent (required by the API).
* ``temperature`` is clamped to the API's range 0..1. When ``top_p`` is set and
  ``temperature`` is the pipeline default ``1.0``, only ``top_p`` is sent (the
  API asks to alter one of the two, and recent models refuse both); otherwise
  both are sent as given.
* ``stop`` -> ``stop_sequences``; ``user`` -> ``metadata.user_id``.

Content blocks, tools and images (https://docs.anthropic.com/en/api/messages,
https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use,
https://docs.anthropic.com/en/docs/build-with-claude/vision, read 2026-12-06):

* a text part -> ``{"type": "text", "text"}``; an image part ->
  ``{"type": "image", "source": {"type": "base64", "media_type", "data"}}``
  for a ``data:`` URI and ``{"type": "image", "source": {"type": "url",
  "url"}}`` for an https URL (``detail`` has no Anthropic equivalent and is
  left out); an unresolved ``aipipe-blob:`` reference or an undecodable
  ``data:`` URI is an ``InvalidRequestError``.
* an assistant turn's ``tool_calls`` -> ``{"type": "tool_use", "id", "name",
  "input"}`` blocks after the turn's text, ``input`` the parsed
  ``arguments`` (arguments that are not a JSON object are an
  ``InvalidRequestError`` naming the call).
* ``tool`` turns -> ``{"type": "tool_result", "tool_use_id", "content"}``
  blocks (``content`` left out when the result is empty; the API documents it
  as optional); consecutive ones form ONE user turn, and the tool results
  come first in that user turn, as the API requires, with a following user
  text after them. Every id goes through ``sanitize_tool_call_id``, so the
  ``tool_use`` and its ``tool_result`` name the same id.
* ``tools`` -> ``[{"name", "description"?, "input_schema"}]`` (``parameters``,
  or the empty object schema); ``tool_choice``: ``auto`` -> ``{"type":
  "auto"}``, ``required`` -> ``{"type": "any"}``, a named function ->
  ``{"type": "tool", "name"}``, ``none`` -> ``{"type": "none"}``;
  ``parallel_tool_calls: false`` -> ``"disable_parallel_tool_use": true``
  inside ``tool_choice`` (``{"type": "auto", ...}`` when no choice was given;
  not with ``none``, which calls no tool).

Structured output: the Messages API has no ``response_format``. A
``json_schema`` format whose schema is an object schema, on a request with
no tools and no continuation, uses the documented JSON mode of tool use
(https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use#json-mode,
read 2026-12-06): one tool named after the schema with the schema as its
``input_schema``, forced with ``tool_choice: {"type": "tool", "name"}``; the
answer's ``input`` for that tool is returned as ``content`` (compact JSON
text) with no tool calls and ``finish_reason: stop`` (``length`` when
``max_tokens`` cut it), and a stream sends its ``partial_json`` as text.
Any other JSON format (``json_object``; ``json_schema`` with tools, with a
continuation, or with a non-object or missing schema) adds
``JSON_INSTRUCTION`` (and the schema) to the ``system`` prompt: best-effort,
the model is asked, not forced; the pipeline validates the answer anyway.

Response mapping: the ``text`` blocks of ``content`` joined; ``tool_use``
blocks -> ``ToolCall`` (sanitised id, ``arguments`` the compact JSON of
``input``); an answer of only ``tool_use`` blocks is valid (``content``
``""``). ``stop_reason`` in OpenAI's words: ``end_turn``/``stop_sequence``
-> ``stop``, ``max_tokens`` -> ``length``, ``tool_use`` -> ``tool_calls``,
others -> ``None``. ``usage``:
``prompt_tokens = input_tokens + cache_read_input_tokens +
cache_creation_input_tokens`` (``input_tokens`` excludes both cache counts),
``cached_prompt_tokens = cache_read_input_tokens``,
``cache_creation_prompt_tokens = cache_creation_input_tokens``,
``completion_tokens = output_tokens``. ``stop_reason: refusal`` is a
``ContentFilterError``. The provider request id is the ``request-id`` header.

Streaming (https://docs.anthropic.com/en/docs/build-with-claude/streaming,
read 2026-12-06): ``stream: true`` gives ``message_start`` (the model and the
input usage), ``content_block_start``, ``content_block_delta`` with
``text_delta`` or ``input_json_delta`` (``partial_json``),
``content_block_stop``, ``message_delta`` (``stop_reason`` and the cumulative
``output_tokens``) and ``message_stop``; ``ping`` is a keep-alive. A
``content_block_start`` of a ``tool_use`` block is a ``StreamToolDelta`` with
its id and name, and each ``partial_json`` of that block a
``StreamToolDelta`` with the fragment; its ``index`` counts tool calls from 0
(not content blocks: a text block before it does not count). An ``error``
event (e.g. ``overloaded_error``) is
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

from pipeline.errors import ContentFilterError, InvalidRequestError, UntranslatableRequestError
from schemas.request import (
    FunctionCall,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    Tool,
    ToolCall,
    ToolChoice,
)
from schemas.response import Usage
from stages.providers.base import (
    ProviderCall,
    ProviderResult,
    StreamDelta,
    StreamEnd,
    StreamEvent,
    StreamToolDelta,
    refuse_blob_reference,
)
from stages.providers.classify import before_sending, classify_response, malformed_response, parse_guarded, post_json
from stages.providers.sse import open_events, stream_cut
from stages.rules.images import ImageError, decode_data_uri
from stages.rules.structured import JSON_INSTRUCTION, JSON_SCHEMA_LEAD
from stages.rules.tool_ids import sanitize_tool_call_id, synthesized_tool_call_id

PROVIDER = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_VERSION = "2023-06-01"
#: User turn put in front of a conversation that starts with an assistant turn.
LEADING_USER_TURN = "(The conversation so far follows.)"
#: System-prompt instruction for a JSON answer the API cannot force (module docstring).
#: Highest ``temperature`` the Messages API accepts.
MAX_TEMPERATURE = 1.0
_DEFAULT_TEMPERATURE = 1.0
#: No size limit of its own on a ``data:`` image: the pipeline's ``images.max_bytes`` applied before.
_NO_IMAGE_LIMIT = 1 << 62

_Tokens = Annotated[int, Meta(ge=0)]


class _Block(Struct):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


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
#: ``stop_reason`` in OpenAI's words (``finish_reason``); others map to ``None``.
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
}


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text (no spaces between tokens, UTF-8 characters as they are)."""
    return msgspec.json.encode(value).decode("utf-8")


def _image_block(url: str, provider: str) -> dict[str, Any]:
    """An image part as an Anthropic ``image`` block: base64 source for a ``data:`` URI, url source for https."""
    refuse_blob_reference(url, provider)
    if url.startswith("data:"):
        try:
            media_type, _ = decode_data_uri(url, max_bytes=_NO_IMAGE_LIMIT)
        except ImageError as exc:
            raise InvalidRequestError(f"{provider}: {exc}", provider=provider) from exc
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": url.partition(",")[2]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _tool_input(call: ToolCall, provider: str) -> dict[str, Any]:
    """A tool call's ``arguments`` parsed into the JSON object a ``tool_use`` block's ``input`` is."""
    try:
        value = msgspec.json.decode(call.function.arguments or "{}")
    except msgspec.DecodeError as exc:
        raise UntranslatableRequestError(
            f"{provider}: tool call {call.id!r} ({call.function.name}) has arguments that are not JSON: {exc}",
            provider=provider,
        ) from exc
    if not isinstance(value, dict):
        raise UntranslatableRequestError(
            f"{provider}: tool call {call.id!r} ({call.function.name}) has arguments that are not a JSON object",
            provider=provider,
        )
    return value


def _blocks_of(m: Message, provider: str) -> list[dict[str, Any]]:
    """The content blocks of one non-system message (module docstring); ``[]`` when it has nothing to send."""
    if m.role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": sanitize_tool_call_id(m.tool_call_id or "")}
        text = m.text()
        if text.strip():
            result["content"] = text
        return [result]
    blocks: list[dict[str, Any]] = []
    if isinstance(m.content, list):
        for part in m.content:
            if isinstance(part, ImagePart):
                blocks.append(_image_block(part.image_url.url, provider))
            elif part.text.strip():
                blocks.append({"type": "text", "text": part.text})
    elif m.content is not None and m.content.strip():
        blocks.append({"type": "text", "text": m.content})
    for tool_call in m.tool_calls or ():
        blocks.append(
            {
                "type": "tool_use",
                "id": sanitize_tool_call_id(tool_call.id),
                "name": tool_call.function.name,
                "input": _tool_input(tool_call, provider),
            }
        )
    return blocks


def _ordered(role: str, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``blocks`` in the order the API requires: tool results first in a user turn, tool uses last in an assistant's."""
    first = "tool_result" if role == "user" else None
    last = "tool_use" if role == "assistant" else None
    return (
        [b for b in blocks if b["type"] == first]
        + [b for b in blocks if b["type"] not in (first, last)]
        + [b for b in blocks if b["type"] == last]
    )


def to_anthropic_messages(
    messages: list[Message], *, provider: str = PROVIDER
) -> tuple[str | None, list[dict[str, Any]]]:
    """Split chat messages into Anthropic's ``system`` string and ``messages`` list.

    Applies the rules of the module docstring (system join, content blocks,
    empty drop, role merge, tool-result order, leading user turn, prefill
    whitespace).

    Args:
        messages: the pipeline's chat turns.
        provider: the deployment name an error carries.

    Returns:
        ``(system or None, [{"role": "user"|"assistant", "content": str | [block, ...]}, ...])``.

    Raises:
        InvalidRequestError: when no non-empty user or assistant turn is left, an
            image cannot be sent, or a tool call's arguments are not a JSON object.
    """
    system_parts = [m.text() for m in messages if m.role == "system" and m.text().strip()]
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for m in messages:
        if m.role == "system":
            continue
        blocks = _blocks_of(m, provider)
        if not blocks:
            continue
        role: str = "user" if m.role == "tool" else m.role
        if turns and turns[-1][0] == role:
            merged = turns[-1][1]
            if merged[-1]["type"] == "text" and blocks[0]["type"] == "text":
                merged[-1] = {"type": "text", "text": merged[-1]["text"] + "\n\n" + blocks[0]["text"]}
                blocks = blocks[1:]
            merged.extend(blocks)
        else:
            turns.append((role, blocks))
    if not turns:
        raise InvalidRequestError(
            f"{provider}: the request has no non-empty user or assistant message", provider=provider
        )
    if turns[0][0] == "assistant":
        turns.insert(0, ("user", [{"type": "text", "text": LEADING_USER_TURN}]))
    out: list[dict[str, Any]] = []
    for role, blocks in turns:
        ordered = _ordered(role, blocks)
        content: str | list[dict[str, Any]] = ordered
        if len(ordered) == 1 and ordered[0]["type"] == "text":
            content = ordered[0]["text"]
        out.append({"role": role, "content": content})
    last = out[-1]
    if last["role"] == "assistant":
        if isinstance(last["content"], str):
            last["content"] = last["content"].rstrip()
        elif last["content"][-1]["type"] == "text":
            last["content"][-1] = {"type": "text", "text": last["content"][-1]["text"].rstrip()}
    return ("\n\n".join(system_parts) if system_parts else None), out


def json_tool_name(call: ProviderCall) -> str | None:
    """The name of the forced tool of JSON mode when ``call`` uses it (module docstring), else ``None``."""
    fmt = call.response_format
    if not isinstance(fmt, JsonSchemaFormat) or call.tools or call.continuation:
        return None
    schema = fmt.json_schema.schema
    if schema is None or schema.get("type") != "object":
        return None
    return fmt.json_schema.name


def _json_instruction(call: ProviderCall) -> str | None:
    """The system-prompt instruction of a JSON format JSON mode cannot serve, else ``None``."""
    fmt = call.response_format
    if isinstance(fmt, JsonObjectFormat):
        return JSON_INSTRUCTION
    if isinstance(fmt, JsonSchemaFormat) and json_tool_name(call) is None:
        if fmt.json_schema.schema is None:
            return JSON_INSTRUCTION
        return f"{JSON_INSTRUCTION}{JSON_SCHEMA_LEAD}{compact_json(fmt.json_schema.schema)}"
    return None


def tools_to_anthropic(tools: list[Tool]) -> list[dict[str, Any]]:
    """``tools`` as Anthropic's ``[{"name", "description"?, "input_schema"}]``."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        spec: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            spec["description"] = tool.function.description
        spec["input_schema"] = tool.function.schema()
        out.append(spec)
    return out


def tool_choice_to_anthropic(choice: ToolChoice | None, parallel_tool_calls: bool | None) -> dict[str, Any] | None:
    """``tool_choice`` and ``parallel_tool_calls`` as Anthropic's ``tool_choice`` object (``None``: send none)."""
    out: dict[str, Any] | None
    if choice is None:
        out = {"type": "auto"} if parallel_tool_calls is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    else:
        out = {"type": "tool", "name": choice.function.name}
    if out is not None and parallel_tool_calls is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def build_payload(call: ProviderCall, *, provider: str = PROVIDER) -> dict[str, Any]:
    """The JSON body for ``call`` (see the module docstring for the mapping); ``provider`` names the deployment.

    Raises:
        InvalidRequestError: when no non-empty user or assistant turn is left, an
            image cannot be sent, or a tool call's arguments are not a JSON object.
    """
    messages = list(call.messages)
    if call.continuation:
        last = messages[-1] if messages else None
        if last is not None and last.role == "assistant" and not last.tool_calls:
            # the caller's own prefill, continued by the partial
            messages[-1] = Message(role="assistant", content=last.text() + call.continuation)
        else:
            messages.append(Message(role="assistant", content=call.continuation))
    system, turns = to_anthropic_messages(messages, provider=provider)
    instruction = _json_instruction(call)
    if instruction is not None:
        system = f"{system}\n\n{instruction}" if system else instruction
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
    json_tool = json_tool_name(call)
    if call.tools:
        payload["tools"] = tools_to_anthropic(call.tools)
        choice = tool_choice_to_anthropic(call.tool_choice, call.parallel_tool_calls)
        if choice is not None:
            payload["tool_choice"] = choice
    elif json_tool is not None and isinstance(call.response_format, JsonSchemaFormat):
        spec = call.response_format.json_schema
        tool: dict[str, Any] = {"name": json_tool}
        if spec.description is not None:
            tool["description"] = spec.description
        tool["input_schema"] = spec.schema
        payload["tools"] = [tool]
        payload["tool_choice"] = {"type": "tool", "name": json_tool}
    return payload


def parse_response(
    body: bytes, call: ProviderCall, *, request_id: str | None = None, status_code: int = 200, provider: str = PROVIDER
) -> ProviderResult:
    """Parse a Messages API ``message`` body into a ``ProviderResult``.

    Args:
        body: raw JSON of a ``{"type": "message", ...}`` object.
        call: the call it answers (its ``model`` is the fallback model name; its
            ``response_format`` says whether the answer is JSON mode's tool input).
        request_id: the ``request-id`` header, if any.
        status_code: HTTP status the body came with (2xx).
        provider: the deployment name errors carry.

    Returns:
        Text (``""`` when the answer is only tool calls; in JSON mode the tool
        input as compact JSON), tool calls (sanitised ids), model, usage
        (tokens; ``prompt_tokens`` includes cache reads and writes),
        ``finish_reason`` in OpenAI's words.

    Raises:
        ProviderServerError: malformed JSON, missing fields, not a message, or neither text nor tool calls.
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
    finish = _FINISH.get(message.stop_reason or "")
    json_tool = json_tool_name(call)
    answer = next((b for b in message.content if b.type == "tool_use" and b.name == json_tool), None)
    tool_calls: list[ToolCall] | None = None
    if json_tool is not None and answer is not None:
        text = compact_json(answer.input if answer.input is not None else {})
        finish = "length" if finish == "length" else "stop"
    else:
        text = "".join(b.text or "" for b in message.content if b.type == "text")
        uses = [b for b in message.content if b.type == "tool_use"]
        tool_calls = [_tool_call_of(b, i) for i, b in enumerate(uses)] or None
    if not text.strip() and not tool_calls:
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
        finish_reason=finish,
        tool_calls=tool_calls,
    )


def _tool_call_of(block: _Block, index: int) -> ToolCall:
    """A ``tool_use`` block as a ``ToolCall``: sanitised id, ``arguments`` the compact JSON of ``input``."""
    name = block.name or ""
    arguments = compact_json(block.input if block.input is not None else {})
    raw_id = block.id or synthesized_tool_call_id(name, arguments, index)
    return ToolCall(id=sanitize_tool_call_id(raw_id), function=FunctionCall(name=name, arguments=arguments))


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
    partial_json: str | None = None
    stop_reason: str | None = None


class _StreamBlock(Struct):
    type: str
    id: str | None = None
    name: str | None = None


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
    index: int | None = None
    content_block: _StreamBlock | None = None
    message: _StreamMessage | None = None
    delta: _StreamDelta | None = None
    usage: _DeltaUsage | None = None
    error: _ErrorInfo | None = None


_EVENT_DECODER = msgspec.json.Decoder(_StreamEvent)


async def read_events(
    events: AsyncIterator[Any], call: ProviderCall, provider: str, *, skip_leading: str = ""
) -> AsyncIterator[StreamEvent]:
    """Messages API stream events as ``StreamDelta``s, ``StreamToolDelta``s and a final ``StreamEnd``.

    ``skip_leading`` is whitespace stripped from a prefill, dropped from the
    front of the continuation so that the joined text has it once. A
    ``tool_use`` block is numbered by the tool calls before it (0-based), not
    by its content block index; in JSON mode (``json_tool_name``) the forced
    tool's ``partial_json`` is answer text. See the module docstring.

    Raises:
        AIProviderError: an ``error`` event, classified by its type's status.
        ContentFilterError: ``stop_reason: refusal``.
        ProviderServerError: a malformed event, or a stream cut before ``message_stop``.
    """
    model = call.model
    prompt = cache_read = cache_write = output = 0
    have_usage = False
    finish: str | None = None
    json_tool = json_tool_name(call)
    tool_of_block: dict[int | None, int] = {}  # content block index -> 0-based tool call index
    json_blocks: set[int | None] = set()
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
        elif item.type == "content_block_start" and item.content_block is not None:
            block = item.content_block
            if block.type != "tool_use":
                continue
            if json_tool is not None and block.name == json_tool:
                json_blocks.add(item.index)
                continue
            tool_of_block[item.index] = len(tool_of_block)
            yield StreamToolDelta(
                index=tool_of_block[item.index],
                id=sanitize_tool_call_id(block.id) if block.id else None,
                name=block.name,
            )
        elif item.type == "content_block_delta" and item.delta is not None and item.delta.type == "input_json_delta":
            fragment = item.delta.partial_json or ""
            if not fragment:
                continue
            if item.index in json_blocks:
                yield StreamDelta(text=fragment)
            elif item.index in tool_of_block:
                yield StreamToolDelta(index=tool_of_block[item.index], arguments=fragment)
            else:
                raise malformed_response(provider, f"stream event: input_json_delta for unknown block {item.index}")
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
                finish = _FINISH.get(item.delta.stop_reason)
                if json_blocks and finish == "tool_calls":
                    finish = "stop"
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
            InvalidRequestError: no non-empty user/assistant turn, an image it cannot send, or tool call
                arguments that are not a JSON object (no HTTP call is made).
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
            InvalidRequestError: no non-empty user/assistant turn, an image it cannot send, or tool call
                arguments that are not a JSON object (no HTTP call is made).
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
