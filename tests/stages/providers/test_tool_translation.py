"""Tools, images and structured output through each wire format (DESIGN A4): payloads, answers, streams.

Pure functions only (``build_payload``, ``parse_response``, the stream
readers), fed bodies and server-sent events shaped like the providers'
documentation; no HTTP.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from httpx_sse import ServerSentEvent

from pipeline.errors import InvalidRequestError, ProviderServerError
from schemas.request import (
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageURL,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaSpec,
    Message,
    TextFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoiceFunction,
    ToolChoiceNamed,
)
from stages.providers import anthropic as anthropic_mod
from stages.providers import cloudflare as cloudflare_mod
from stages.providers import openai as openai_mod
from stages.providers.base import ProviderCall, StreamDelta, StreamEnd, StreamEvent, StreamToolDelta
from stages.rules.tool_ids import (
    TOOL_CALL_ID_PATTERN,
    conversation_digest,
    sanitize_tool_call_id,
    synthesized_tool_call_id,
)

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = Tool(function=FunctionDef(name="get_weather", description="Weather of a city.", parameters=WEATHER_PARAMS))
CLOCK = Tool(function=FunctionDef(name="get_time"))
GOOD_ID = "call_abc123"
BAD_ID = "call 1/ä:" + "x" * 60  # bad characters and too long
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
USAGE_OPENAI = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
USAGE_ANTHROPIC = {"input_tokens": 20, "output_tokens": 5}
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def tool_call(call_id: str, name: str = "get_weather", arguments: str = '{"city":"Paris"}') -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


def conversation(call_id: str = GOOD_ID) -> list[Message]:
    """user -> assistant tool_calls (content None) -> tool result -> user."""
    return [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Weather in Paris?"),
        Message(role="assistant", content=None, tool_calls=[tool_call(call_id)]),
        Message(role="tool", tool_call_id=call_id, content="18C, sunny"),
        Message(role="user", content="And tomorrow?"),
    ]


def make_call(messages: list[Message], **kw: Any) -> ProviderCall:
    return ProviderCall(model=kw.pop("model", "m"), messages=messages, max_tokens=kw.pop("max_tokens", 100), **kw)


def body(data: dict[str, Any]) -> bytes:
    return msgspec.json.encode(data)


async def sse(*items: dict[str, Any] | str) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events as the stream readers get them from ``open_events``."""
    for item in items:
        yield ServerSentEvent(data=item if isinstance(item, str) else json.dumps(item))


async def collect(reader: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [item async for item in reader]


# --- OpenAI format ---------------------------------------------------------------------------------


def test_openai_round_trip_payload_is_openai_shape() -> None:
    call = make_call(
        conversation(),
        model="gpt-4o",
        tools=[WEATHER],
        tool_choice="auto",
        parallel_tool_calls=False,
        response_format=JsonSchemaFormat(json_schema=JsonSchemaSpec(name="answer", schema=PERSON_SCHEMA, strict=True)),
    )
    assert openai_mod.build_payload(call) == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": GOOD_ID,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "18C, sunny", "tool_call_id": GOOD_ID},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "max_completion_tokens": 100,
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": WEATHER_PARAMS},
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": PERSON_SCHEMA, "strict": True},
        },
    }


def test_openai_compatible_sends_tools_but_not_parallel_tool_calls() -> None:
    call = make_call(
        conversation(),
        tools=[CLOCK],
        tool_choice=ToolChoiceNamed(function=ToolChoiceFunction(name="get_time")),
        parallel_tool_calls=True,
        response_format=JsonObjectFormat(),
    )
    payload = openai_mod.build_payload(call, flavor="openai_compatible")
    assert payload["tools"] == [{"type": "function", "function": {"name": "get_time"}}]
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert "parallel_tool_calls" not in payload
    assert payload["response_format"] == {"type": "json_object"}
    text_only = make_call(conversation(), response_format=TextFormat())
    assert "response_format" not in openai_mod.build_payload(text_only, flavor="openai_compatible")
    assert openai_mod.build_payload(text_only)["response_format"] == {"type": "text"}


def test_openai_content_parts_and_images_pass_through() -> None:
    parts = [
        TextPart(text="What is this?"),
        ImagePart(image_url=ImageURL(url="https://example.com/cat.png", detail="low")),
        ImagePart(image_url=ImageURL(url=PNG_URI)),
    ]
    payload = openai_mod.build_payload(make_call([Message(role="user", content=parts)]))
    assert payload["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": PNG_URI}},
            ],
        }
    ]


def test_unresolved_blob_reference_is_invalid_request_everywhere() -> None:
    blob = "aipipe-blob:image/png;sha256:" + "0" * 64
    call = make_call([Message(role="user", content=[ImagePart(image_url=ImageURL(url=blob))])])
    for build in (openai_mod.build_payload, anthropic_mod.build_payload, cloudflare_mod.build_payload):
        with pytest.raises(InvalidRequestError, match="blob"):
            build(call)


def test_openai_parses_tool_only_answer_with_sanitised_ids() -> None:
    answer = {
        "model": "gpt-4o",
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": BAD_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"a":1}'}},
                        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE_OPENAI,
    }
    result = openai_mod.parse_response(body(answer), make_call(conversation()))
    assert result.content == ""
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == [
        ToolCall(id=sanitize_tool_call_id(BAD_ID), function=FunctionCall(name="get_weather", arguments='{"a":1}')),
        ToolCall(id="call_2", function=FunctionCall(name="get_time", arguments="{}")),
    ]
    assert result.tool_calls is not None and all(TOOL_CALL_ID_PATTERN.match(c.id) for c in result.tool_calls)


def test_openai_compatible_answer_without_ids_or_usage() -> None:
    answer = {
        "model": "llama3",
        "choices": [
            {
                "message": {"content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}]},
                "finish_reason": "function_call",
            }
        ],
    }
    result = openai_mod.parse_response(body(answer), make_call(conversation()), usage_optional=True)
    assert result.tool_calls == [
        ToolCall(
            id=synthesized_tool_call_id("get_time", "{}", 0, conversation_digest(conversation())),
            function=FunctionCall(name="get_time"),
        )
    ]
    assert result.finish_reason == "tool_calls"  # legacy word mapped to OpenAI's current one
    assert result.usage_estimated and result.usage.completion_tokens > 0


def test_openai_empty_answer_without_tool_calls_is_still_malformed() -> None:
    answer = {
        "model": "gpt-4o",
        "choices": [{"message": {"content": ""}, "finish_reason": "stop"}],
        "usage": USAGE_OPENAI,
    }
    with pytest.raises(ProviderServerError):
        openai_mod.parse_response(body(answer), make_call(conversation()))


async def test_openai_stream_of_tool_calls_only_ends_cleanly() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"model": "gpt-4o", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    events = sse(
        chunk({"role": "assistant", "content": None}),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": BAD_ID, "type": "function", "function": {"name": "get_weather", "arguments": ""}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
        {"model": "gpt-4o", "choices": [], "usage": USAGE_OPENAI},
        "[DONE]",
    )
    items = await collect(openai_mod.read_chunks(events, make_call(conversation()), "openai"))
    assert items[:-1] == [
        StreamToolDelta(index=0, id=sanitize_tool_call_id(BAD_ID), name="get_weather", arguments=""),
        StreamToolDelta(index=0, arguments='{"city":'),
        StreamToolDelta(index=0, arguments='"Paris"}'),
        StreamToolDelta(index=1, id="call_2", name="get_time", arguments="{}"),
    ]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason == "tool_calls" and end.usage is not None


# --- Anthropic Messages -----------------------------------------------------------------------------


def test_anthropic_round_trip_payload() -> None:
    call = make_call(conversation(), model="claude", tools=[WEATHER, CLOCK])
    payload = anthropic_mod.build_payload(call)
    assert payload == {
        "model": "claude",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": GOOD_ID, "name": "get_weather", "input": {"city": "Paris"}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": GOOD_ID, "content": "18C, sunny"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        "system": "Be brief.",
        "tools": [
            {"name": "get_weather", "description": "Weather of a city.", "input_schema": WEATHER_PARAMS},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
        ],
    }


def test_anthropic_parallel_calls_give_one_user_turn_of_tool_results() -> None:
    messages = [
        Message(role="user", content="Weather and time in Paris?"),
        Message(
            role="assistant",
            content="Let me look both up.",
            tool_calls=[tool_call("call_a"), tool_call(BAD_ID, "get_time", "{}")],
        ),
        Message(role="tool", tool_call_id="call_a", content="18C"),
        Message(role="tool", tool_call_id=BAD_ID, content=[TextPart(text="14:00")]),
    ]
    turns = anthropic_mod.build_payload(make_call(messages))["messages"]
    safe = sanitize_tool_call_id(BAD_ID)
    assert turns[1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look both up."},
                {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": safe, "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
                {"type": "tool_result", "tool_use_id": safe, "content": "14:00"},
            ],
        },
    ]


def test_anthropic_tool_turn_with_empty_content_is_never_dropped() -> None:
    messages = [
        Message(role="user", content="Time?"),
        Message(role="assistant", content="  ", tool_calls=[tool_call("call_t", "get_time", "{}")]),
        Message(role="tool", tool_call_id="call_t", content=""),
    ]
    turns = anthropic_mod.build_payload(make_call(messages))["messages"]
    assert turns == [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_t", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_t"}]},
    ]


def test_anthropic_leading_turn_merge_and_prefill_rules_hold_with_blocks() -> None:
    messages = [
        Message(role="assistant", content="Hi.", tool_calls=[tool_call("call_x")]),
        Message(role="tool", tool_call_id="call_x", content="18C"),
        Message(role="user", content="Thanks."),
        Message(role="user", content="More?"),
        Message(role="assistant", content="Sure "),
    ]
    turns = anthropic_mod.build_payload(make_call(messages))["messages"]
    assert turns == [
        {"role": "user", "content": anthropic_mod.LEADING_USER_TURN},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Hi."},
                {"type": "tool_use", "id": "call_x", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_x", "content": "18C"},
                {"type": "text", "text": "Thanks.\n\nMore?"},
            ],
        },
        {"role": "assistant", "content": "Sure"},
    ]


@pytest.mark.parametrize("arguments", ["[1, 2]", "not json", '"text"'])
def test_anthropic_arguments_not_a_json_object_are_invalid_request(arguments: str) -> None:
    messages = [
        Message(role="user", content="Go"),
        Message(role="assistant", content=None, tool_calls=[tool_call("call_bad", arguments=arguments)]),
        Message(role="tool", tool_call_id="call_bad", content="x"),
    ]
    with pytest.raises(InvalidRequestError, match="call_bad"):
        anthropic_mod.build_payload(make_call(messages))


def test_anthropic_images_base64_and_url() -> None:
    parts = [
        TextPart(text="Compare these."),
        ImagePart(image_url=ImageURL(url=PNG_URI, detail="high")),
        ImagePart(image_url=ImageURL(url="https://example.com/b.jpg")),
    ]
    turns = anthropic_mod.build_payload(make_call([Message(role="user", content=parts)]))["messages"]
    assert turns == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG_URI.partition(",")[2]},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}},
            ],
        }
    ]
    broken = Message(role="user", content=[ImagePart(image_url=ImageURL(url="data:image/png;base64,@@@"))])
    with pytest.raises(InvalidRequestError):
        anthropic_mod.build_payload(make_call([broken]))


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (ToolChoiceNamed(function=ToolChoiceFunction(name="get_time")), None, {"type": "tool", "name": "get_time"}),
        (None, None, None),
        (None, True, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (
            ToolChoiceNamed(function=ToolChoiceFunction(name="get_time")),
            False,
            {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        ),
        ("none", False, {"type": "none"}),
    ],
)
def test_anthropic_tool_choice_mapping(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    call = make_call(conversation(), tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=parallel)
    assert anthropic_mod.build_payload(call).get("tool_choice") == expected


def test_anthropic_parses_tool_only_answer() -> None:
    answer = {
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": BAD_ID, "name": "get_time", "input": {}},
        ],
        "stop_reason": "tool_use",
        "usage": USAGE_ANTHROPIC,
    }
    result = anthropic_mod.parse_response(body(answer), make_call(conversation()))
    assert result.content == ""
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == [
        ToolCall(id="toolu_01A", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}')),
        ToolCall(id=sanitize_tool_call_id(BAD_ID), function=FunctionCall(name="get_time", arguments="{}")),
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("pause_turn", None)],
)
def test_anthropic_stop_reason_in_openai_words(stop_reason: str, finish: str | None) -> None:
    answer = {
        "type": "message",
        "model": "claude",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": stop_reason,
        "usage": USAGE_ANTHROPIC,
    }
    assert anthropic_mod.parse_response(body(answer), make_call(conversation())).finish_reason == finish


def _json_mode_call(**kw: Any) -> ProviderCall:
    fmt = JsonSchemaFormat(json_schema=JsonSchemaSpec(name="person", schema=PERSON_SCHEMA))
    return make_call([Message(role="user", content="Who wrote Hamlet?")], response_format=fmt, **kw)


def test_anthropic_json_mode_round_trip() -> None:
    call = _json_mode_call()
    payload = anthropic_mod.build_payload(call)
    assert payload["tools"] == [{"name": "person", "input_schema": PERSON_SCHEMA}]
    assert payload["tool_choice"] == {"type": "tool", "name": "person"}
    assert "system" not in payload
    answer = {
        "type": "message",
        "model": "claude",
        "content": [{"type": "tool_use", "id": "toolu_9", "name": "person", "input": {"name": "Shakespeare"}}],
        "stop_reason": "tool_use",
        "usage": USAGE_ANTHROPIC,
    }
    result = anthropic_mod.parse_response(body(answer), call)
    assert result.content == '{"name":"Shakespeare"}'
    assert result.tool_calls is None
    assert result.finish_reason == "stop"


async def test_anthropic_json_mode_streams_the_input_as_text() -> None:
    events = sse(
        {"type": "message_start", "message": {"model": "claude", "usage": USAGE_ANTHROPIC}},
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_9", "name": "person", "input": {}},
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"name": '}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '"W. S."}'}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    )
    items = await collect(anthropic_mod.read_events(events, _json_mode_call(), "anthropic"))
    assert items[:-1] == [StreamDelta(text='{"name": '), StreamDelta(text='"W. S."}')]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason == "stop"


def test_anthropic_json_instruction_when_json_mode_cannot_be_used() -> None:
    with_tools = _json_mode_call(tools=[WEATHER])
    payload = anthropic_mod.build_payload(with_tools)
    assert payload["tools"] == [
        {"name": "get_weather", "description": "Weather of a city.", "input_schema": WEATHER_PARAMS}
    ]
    assert payload["system"] == (
        f"{anthropic_mod.JSON_INSTRUCTION} It must validate against this JSON Schema: "
        + json.dumps(PERSON_SCHEMA, separators=(",", ":"))
    )
    assert (
        anthropic_mod.parse_response(
            body(
                {
                    "type": "message",
                    "model": "claude",
                    "content": [{"type": "text", "text": '{"name":"x"}'}],
                    "stop_reason": "end_turn",
                    "usage": USAGE_ANTHROPIC,
                }
            ),
            with_tools,
        ).content
        == '{"name":"x"}'
    )
    json_object = make_call(
        [Message(role="system", content="Be brief."), Message(role="user", content="Hi")],
        response_format=JsonObjectFormat(),
    )
    payload = anthropic_mod.build_payload(json_object)
    assert payload["system"] == f"Be brief.\n\n{anthropic_mod.JSON_INSTRUCTION}"
    assert "tools" not in payload and "tool_choice" not in payload


async def test_anthropic_stream_tool_index_counts_tool_calls_not_blocks() -> None:
    events = sse(
        {"type": "message_start", "message": {"model": "claude-x", "usage": USAGE_ANTHROPIC}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": BAD_ID, "name": "get_weather", "input": {}},
        },
        {"type": "ping"},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city"'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ':"Paris"}'}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
        },
        {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "content_block_stop", "index": 2},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 30}},
        {"type": "message_stop"},
    )
    items = await collect(anthropic_mod.read_events(events, make_call(conversation()), "anthropic"))
    assert items[:-1] == [
        StreamDelta(text="Checking."),
        StreamToolDelta(index=0, id=sanitize_tool_call_id(BAD_ID), name="get_weather"),
        StreamToolDelta(index=0, arguments='{"city"'),
        StreamToolDelta(index=0, arguments=':"Paris"}'),
        StreamToolDelta(index=1, id="toolu_2", name="get_time"),
        StreamToolDelta(index=1, arguments="{}"),
    ]
    end = items[-1]
    assert isinstance(end, StreamEnd)
    assert (end.model, end.finish_reason) == ("claude-x", "tool_calls")
    assert end.usage is not None and end.usage.completion_tokens == 30


# --- Workers AI -------------------------------------------------------------------------------------


def test_cloudflare_round_trip_payload() -> None:
    call = make_call(conversation(BAD_ID), model="@cf/meta/llama-3.1-8b-instruct", tools=[WEATHER, CLOCK])
    safe = sanitize_tool_call_id(BAD_ID)
    assert cloudflare_mod.build_payload(call) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": safe,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "18C, sunny", "tool_call_id": safe},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "max_tokens": 100,
        "tools": [
            {"name": "get_weather", "description": "Weather of a city.", "parameters": WEATHER_PARAMS},
            {"name": "get_time", "description": "", "parameters": {"type": "object", "properties": {}}},
        ],
    }


def test_cloudflare_tool_choice_none_sends_no_tools() -> None:
    assert "tools" not in cloudflare_mod.build_payload(make_call(conversation(), tools=[WEATHER], tool_choice="none"))
    required = cloudflare_mod.build_payload(
        make_call(conversation(), tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    )
    assert len(required["tools"]) == 1
    assert "tool_choice" not in required and "parallel_tool_calls" not in required


def test_cloudflare_images_as_data_uri_parts_and_https_refused() -> None:
    parts = [TextPart(text="What is this?"), ImagePart(image_url=ImageURL(url=PNG_URI, detail="low"))]
    payload = cloudflare_mod.build_payload(make_call([Message(role="user", content=parts)]))
    assert payload["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PNG_URI}},
            ],
        }
    ]
    remote = Message(role="user", content=[ImagePart(image_url=ImageURL(url="https://example.com/a.png"))])
    with pytest.raises(InvalidRequestError, match="image bytes only; aipipe does not fetch URLs"):
        cloudflare_mod.build_payload(make_call([remote]))


def test_cloudflare_json_mode_payload() -> None:
    schema_call = _json_mode_call()
    assert cloudflare_mod.build_payload(schema_call)["response_format"] == {
        "type": "json_schema",
        "json_schema": PERSON_SCHEMA,
    }
    object_call = make_call(conversation(), response_format=JsonObjectFormat())
    assert cloudflare_mod.build_payload(object_call)["response_format"] == {"type": "json_object"}
    assert "response_format" not in cloudflare_mod.build_payload(
        make_call(conversation(), response_format=TextFormat())
    )


def test_cloudflare_object_response_in_json_mode_is_compact_text() -> None:
    envelope = {
        "success": True,
        "errors": [],
        "messages": [],
        "result": {
            "response": {"name": "India", "languages": ["Hindi", "English"]},
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
        },
    }
    result = cloudflare_mod.parse_response(body(envelope), _json_mode_call())
    assert result.content == '{"name":"India","languages":["Hindi","English"]}'
    assert result.tool_calls is None and result.finish_reason is None


@pytest.mark.parametrize("response", [None, "absent", ""])
def test_cloudflare_tool_only_answer_is_valid_in_both_shapes(response: str | None) -> None:
    result_body: dict[str, Any] = {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"id": BAD_ID, "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]
    }
    if response != "absent":
        result_body["response"] = response
    envelope = {"success": True, "errors": [], "messages": [], "result": result_body}
    result = cloudflare_mod.parse_response(body(envelope), make_call(conversation()))
    arguments = '{"city":"Paris"}'
    assert result.content == ""
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == [
        ToolCall(
            id=synthesized_tool_call_id("get_weather", arguments, 0, conversation_digest(conversation())),
            function=FunctionCall(name="get_weather", arguments=arguments),
        ),
        ToolCall(id=sanitize_tool_call_id(BAD_ID), function=FunctionCall(name="get_time", arguments="{}")),
    ]
    assert result.usage_estimated


def test_cloudflare_answer_with_neither_text_nor_tools_is_malformed() -> None:
    envelope = {"success": True, "errors": [], "messages": [], "result": {"response": None}}
    with pytest.raises(ProviderServerError):
        cloudflare_mod.parse_response(body(envelope), make_call(conversation()))


async def test_cloudflare_stream_with_tool_calls_in_an_event() -> None:
    events = sse(
        {"response": "Let me check. "},
        {"response": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"response": "", "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}},
        "[DONE]",
    )
    items = await collect(cloudflare_mod.read_events(events, make_call(conversation(), model="@cf/x"), "cloudflare"))
    arguments = '{"city":"Paris"}'
    assert items[:-1] == [
        StreamDelta(text="Let me check. "),
        StreamToolDelta(
            index=0,
            id=synthesized_tool_call_id("get_weather", arguments, 0, conversation_digest(conversation())),
            name="get_weather",
            arguments=arguments,
        ),
    ]
    end = items[-1]
    assert isinstance(end, StreamEnd) and end.finish_reason == "tool_calls" and end.usage is not None


# --- ids across formats -----------------------------------------------------------------------------


def test_bad_ids_are_sanitised_identically_in_every_format() -> None:
    call = make_call(conversation(BAD_ID), tools=[WEATHER])
    safe = sanitize_tool_call_id(BAD_ID)
    assert TOOL_CALL_ID_PATTERN.match(safe) and safe != BAD_ID
    openai_messages = openai_mod.build_payload(call)["messages"]
    assert openai_messages[2]["tool_calls"][0]["id"] == safe == openai_messages[3]["tool_call_id"]
    cf_messages = cloudflare_mod.build_payload(call)["messages"]
    assert cf_messages[2]["tool_calls"][0]["id"] == safe == cf_messages[3]["tool_call_id"]
    anthropic_turns = anthropic_mod.build_payload(call)["messages"]
    assert anthropic_turns[1]["content"][0]["id"] == safe == anthropic_turns[2]["content"][0]["tool_use_id"]


def test_a_tool_call_without_an_id_gets_a_new_id_in_each_turn() -> None:
    answer = {
        "success": True,
        "errors": [],
        "messages": [],
        "result": {"response": None, "tool_calls": [{"name": "get_time", "arguments": {}}]},
    }
    first = cloudflare_mod.parse_response(body(answer), make_call(conversation()))
    again = cloudflare_mod.parse_response(body(answer), make_call(conversation()))
    later_turns = [*conversation(), Message(role="user", content="and now?")]
    later = cloudflare_mod.parse_response(body(answer), make_call(later_turns))
    assert first.tool_calls == again.tool_calls  # a repeat (cache, redelivery) keeps its ids
    assert first.tool_calls and later.tool_calls and first.tool_calls[0].id != later.tool_calls[0].id
