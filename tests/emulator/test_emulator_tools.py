"""Tools, images and structured output in the emulator (DESIGN A4), judged by the official SDKs."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
from pydantic import BaseModel

from pipeline.emulator import EmulatorServer, parse_profile, prompt_tokens, text_tokens
from pipeline.emulator.tools import IMAGE_TOKENS, ToolDef, instance, tool_tokens, violating

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"
CF_TOOLS_MODEL = "@cf/meta/llama-3.3-70b-instruct-fp8-fast"
CF_VISION_MODEL = "@cf/meta/llama-3.2-11b-vision-instruct"
CF_TEXT_MODEL = "@cf/meta/llama-3.1-8b-instruct"
KEY = "sk-test-emulator-key-000111222333"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()
PNG_URI = f"data:image/png;base64,{PNG}"

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "when": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "where": {"$ref": "#/$defs/place"},
    },
    "required": ["city", "unit", "days"],
    "$defs": {
        "place": {
            "type": "object",
            "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "exact": {"type": "boolean"}},
            "required": ["lat"],
        }
    },
}
CLOCK_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
OPENAI_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK_SCHEMA}},
]
ANTHROPIC_TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA},
    {"name": "get_time", "input_schema": CLOCK_SCHEMA},
]
TOOL_DEFS = [ToolDef("get_weather", "Weather", WEATHER_SCHEMA), ToolDef("get_time", "", CLOCK_SCHEMA)]


@pytest_asyncio.fixture(scope="module")
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer() as emu:
        yield emu


@pytest.fixture(autouse=True)
def _fresh_emulator(emulator: EmulatorServer) -> Iterator[None]:
    emulator.reset()
    yield
    emulator.reset()


@pytest_asyncio.fixture
async def oai(emulator: EmulatorServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=emulator.env["OPENAI_BASE_URL"], api_key=KEY, max_retries=0) as client:
        yield client


@pytest_asyncio.fixture
async def claude(emulator: EmulatorServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=emulator.env["ANTHROPIC_BASE_URL"], api_key=KEY, max_retries=0
    ) as client:
        yield client


@pytest_asyncio.fixture
async def http(emulator: EmulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=5.0) as client:
        yield client


def _valid(schema: dict[str, Any], value: Any) -> bool:
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


async def _cf(http: httpx.AsyncClient, model: str, body: dict[str, Any]) -> httpx.Response:
    return await http.post(f"/client/v4/accounts/acc/ai/run/{model}", headers={"authorization": "Bearer t"}, json=body)


class _OpenAIError(BaseModel):
    message: str
    param: str | None


async def _openai_400(oai: openai.AsyncOpenAI, **kwargs: Any) -> _OpenAIError:
    """The error body of a call the emulator refuses with 400 (the SDK's ``body`` is the ``error`` object)."""
    kwargs.setdefault("model", OPENAI_MODEL)
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(**kwargs)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    return _OpenAIError(message=body["message"], param=body["param"])


async def _anthropic_400(claude: anthropic.AsyncAnthropic, **kwargs: Any) -> str:
    kwargs.setdefault("model", ANTHROPIC_MODEL)
    kwargs.setdefault("max_tokens", 100)
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude.messages.create(**kwargs)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    return str(body["error"]["message"])


# --- the instance generator ---------------------------------------------------------------------------


SCHEMAS: list[dict[str, Any]] = [
    WEATHER_SCHEMA,
    {"type": "string", "minLength": 30, "maxLength": 40},
    {"type": "integer", "exclusiveMinimum": 100, "multipleOf": 7},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": ["null", "boolean"]},
    {"const": {"fixed": [1, 2]}},
    {"anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
    {"oneOf": [{"type": "integer", "maximum": -5}, {"type": "string"}]},
    {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"required": ["b"]}]},
    {
        "definitions": {"node": {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}}},
        "type": "object",
        "properties": {"nodes": {"type": "array", "items": {"$ref": "#/definitions/node"}, "minItems": 3}},
        "required": ["nodes"],
        "additionalProperties": False,
    },
    {"type": "object", "minProperties": 2, "additionalProperties": {"type": "integer"}},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    {"type": "string", "pattern": "^[0-9]+$"},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_instance_validates_and_violating_does_not(schema: dict[str, Any]) -> None:
    value = instance(schema, "what is the weather")
    assert _valid(schema, value), value
    assert instance(schema, "what is the weather") == value  # deterministic
    if schema.get("type") == "object" or "properties" in schema or "allOf" in schema:
        assert not _valid(schema, violating(schema, "what is the weather", object_only=True))
    elif "const" not in schema:
        assert not _valid(schema, violating(schema, "what is the weather"))


def test_tool_tokens_rule() -> None:
    """Name, description and canonical schema of each tool; the usage tests below show it at every provider."""
    schema_text = json.dumps(CLOCK_SCHEMA, sort_keys=True, separators=(",", ":"))
    assert tool_tokens(TOOL_DEFS[1:]) == text_tokens("get_time") + text_tokens(schema_text)
    assert tool_tokens(TOOL_DEFS) == tool_tokens(TOOL_DEFS[:1]) + tool_tokens(TOOL_DEFS[1:])


# --- OpenAI tools ---------------------------------------------------------------------------------------


async def test_openai_tool_call_validates(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Please call get_weather for Paris"}]
    completion = await oai.chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=OPENAI_TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    arguments = json.loads(call.function.arguments)
    assert _valid(WEATHER_SCHEMA, arguments)
    assert set(arguments) == set(WEATHER_SCHEMA["properties"])
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens([messages[0]["content"]]) + tool_tokens(TOOL_DEFS)
    again = await oai.chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=OPENAI_TOOLS)
    again_calls = again.choices[0].message.tool_calls
    assert again_calls is not None and again_calls[0].id == call.id  # derived from the request
    [record, _] = emulator.calls("openai")
    assert record.tools_offered and record.tool_count == 2 and record.tool_call
    assert record.tool_names == ["get_weather"] and record.images == 0


async def test_openai_tool_choice(oai: openai.AsyncOpenAI) -> None:
    async def ask(text: str, **kwargs: Any) -> openai.types.chat.ChatCompletion:
        return await oai.chat.completions.create(
            model=OPENAI_MODEL, messages=[{"role": "user", "content": text}], tools=OPENAI_TOOLS, **kwargs
        )

    plain = await ask("Hello there")
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
    first_named = await ask("Use GET_TIME, or maybe get_weather")
    assert first_named.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[index]
    required = await ask("Hello there", tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]
    named = await ask("Hello there", tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[index]
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments)["zone"]  # type: ignore[index]
    none = await ask("call get_weather", tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


async def test_openai_two_turn_tool_loop(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
    first = await oai.chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=OPENAI_TOOLS)
    message = first.choices[0].message
    assert message.tool_calls is not None
    messages.append(message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18C and sunny"})
    messages[-2]["content"] = None  # content may be null next to tool_calls
    second = await oai.chat.completions.create(model=OPENAI_MODEL, messages=messages, tools=OPENAI_TOOLS)
    assert second.choices[0].finish_reason == "stop"
    text = second.choices[0].message.content
    assert text is not None and "Based on the tool result: 18C and sunny." in text
    assert second.choices[0].message.tool_calls is None
    record = emulator.calls("openai")[-1]
    assert record.tool_results == 1 and not record.tool_call and record.roles == ["user", "assistant", "tool"]


# --- Anthropic tools --------------------------------------------------------------------------------------


async def test_anthropic_two_turn_tool_loop(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await claude.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=200, messages=messages, tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"}
    )
    assert first.stop_reason == "tool_use"
    [block] = first.content
    assert block.type == "tool_use" and block.name == "get_weather"
    assert re.fullmatch(r"toolu_[A-Za-z0-9]{24}", block.id)
    assert _valid(WEATHER_SCHEMA, block.input)
    assert first.usage.input_tokens == prompt_tokens([messages[0]["content"]]) + tool_tokens(TOOL_DEFS)
    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": block.id, "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ],
        }
    )
    second = await claude.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=200, messages=messages, tools=ANTHROPIC_TOOLS
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text" and "Based on the tool result: 18C." in second.content[0].text
    record = emulator.calls("anthropic")[-1]
    assert record.tool_results == 1 and not record.tool_call and record.last_user_text == "And tomorrow?"


async def test_anthropic_named_tool_is_json_mode(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=50,
        messages=[{"role": "user", "content": "Describe Paris"}],
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
    )
    assert message.content[0].type == "tool_use" and message.content[0].name == "get_time"
    assert _valid(CLOCK_SCHEMA, message.content[0].input)
    auto = await claude.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}], tools=ANTHROPIC_TOOLS
    )
    assert auto.stop_reason == "end_turn" and auto.content[0].type == "text"


# --- structured output ------------------------------------------------------------------------------------


class Address(BaseModel):
    street: str
    zip_code: str


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user"]
    nickname: str | None
    addresses: list[Address]


async def test_openai_parse_pydantic(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.parse(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "Invent a person"}], response_format=Person
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and parsed.addresses
    assert emulator.calls("openai")[-1].response_format == "json_schema"


async def test_openai_json_object(oai: openai.AsyncOpenAI) -> None:
    completion = await oai.chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "Answer in JSON please"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)
    error = await _openai_400(
        oai, messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"}
    )
    assert "must contain the word 'json'" in error.message


async def test_openai_strict_schema_rules(oai: openai.AsyncOpenAI) -> None:
    error = await _openai_400(
        oai,
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": CLOCK_SCHEMA, "strict": True}},
    )
    assert "'additionalProperties' is required to be supplied and to be false" in error.message


async def test_invalid_json_schema_fault(
    emulator: EmulatorServer, oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    schedule = {"provider": "openai", "steps": [{"action": "invalid_json_schema"}]}
    assert (await http.post("/_emulator/schedule", json=schedule)).status_code == 200
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA}}
    bad = await oai.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "weather"}], response_format=response_format
    )
    assert not _valid(WEATHER_SCHEMA, json.loads(bad.choices[0].message.content or ""))
    good = await oai.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "weather"}], response_format=response_format
    )
    assert _valid(WEATHER_SCHEMA, json.loads(good.choices[0].message.content or ""))
    assert [c.outcome for c in emulator.calls("openai")] == ["invalid_json_schema", "ok"]
    # the same for a forced tool (Anthropic's JSON mode) and as a probability key
    emulator.faults.schedule("anthropic", {"action": "invalid_json_schema"})
    async with anthropic.AsyncAnthropic(base_url=emulator.url, api_key=KEY, max_retries=0) as claude:
        message = await claude.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": "weather"}],
            tools=ANTHROPIC_TOOLS[:1],
            tool_choice={"type": "tool", "name": "get_weather"},
        )
    assert message.content[0].type == "tool_use" and not _valid(WEATHER_SCHEMA, message.content[0].input)
    parse_profile({"providers": {"openai": {"probabilities": {"invalid_json_schema": 0.5}}}})


# --- Workers AI ---------------------------------------------------------------------------------------------


async def test_cloudflare_tools_json_and_tool_turns(emulator: EmulatorServer, http: httpx.AsyncClient) -> None:
    cf_tools = [{"name": "get_weather", "description": "Weather", "parameters": WEATHER_SCHEMA}, OPENAI_TOOLS[1]]
    called = await _cf(
        http, CF_TOOLS_MODEL, {"messages": [{"role": "user", "content": "get_weather"}], "tools": cf_tools}
    )
    result = called.json()["result"]
    assert result["response"] is None
    [call] = result["tool_calls"]
    assert call["name"] == "get_weather" and _valid(WEATHER_SCHEMA, call["arguments"])
    assert result["usage"]["prompt_tokens"] == prompt_tokens(["get_weather"]) + tool_tokens(TOOL_DEFS)
    history = [
        {"role": "user", "content": "get_weather"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": call["arguments"]}]},
        {"role": "tool", "content": "rainy"},
    ]
    answered = await _cf(http, CF_TOOLS_MODEL, {"messages": history, "tools": cf_tools})
    assert "Based on the tool result: rainy." in answered.json()["result"]["response"]
    structured = await _cf(
        http,
        CF_TOOLS_MODEL,
        {
            "messages": [{"role": "user", "content": "weather"}],
            "response_format": {"type": "json_schema", "json_schema": WEATHER_SCHEMA},
        },
    )
    value = structured.json()["result"]["response"]
    assert isinstance(value, dict) and _valid(WEATHER_SCHEMA, value)
    as_object = await _cf(http, CF_TOOLS_MODEL, {"prompt": "weather", "response_format": {"type": "json_object"}})
    assert isinstance(as_object.json()["result"]["response"], dict)
    assert [c.tool_call for c in emulator.calls("cloudflare")] == [True, False, False, False]


# --- images ---------------------------------------------------------------------------------------------------


async def test_openai_images(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    content: list[Any] = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": PNG_URI, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    completion = await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": content}])
    assert "I see 2 image(s)." in (completion.choices[0].message.content or "")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens(["What is in these?"]) + 2 * IMAGE_TOKENS
    assert emulator.calls("openai")[-1].images == 2
    error = await _openai_400(oai, model="gpt-3.5-turbo", messages=[{"role": "user", "content": content}])
    assert error.message == "Invalid content type. image_url is only supported by certain models."
    assert error.param == "messages.[0].content.[1].type"
    bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]
    error = await _openai_400(oai, messages=[{"role": "user", "content": bad}])
    assert "invalid base64" in error.message and error.param == "messages[0].content[0].image_url.url"


async def test_anthropic_images(claude: anthropic.AsyncAnthropic) -> None:
    content: list[Any] = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "text", "text": "Describe"},
    ]
    message = await claude.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=100, messages=[{"role": "user", "content": content}]
    )
    assert message.content[0].type == "text" and "I see 2 image(s)." in message.content[0].text
    assert message.usage.input_tokens == prompt_tokens(["Describe"]) + 2 * IMAGE_TOKENS
    bmp = [{"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}}]
    assert await _anthropic_400(claude, messages=[{"role": "user", "content": bmp}]) == (
        "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
        "'image/gif' or 'image/webp'"
    )
    broken = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}]
    assert "base64" in await _anthropic_400(claude, messages=[{"role": "user", "content": broken}])


async def test_cloudflare_images(http: httpx.AsyncClient) -> None:
    content: list[Any] = [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": PNG_URI}}]
    ok = await _cf(http, CF_VISION_MODEL, {"messages": [{"role": "user", "content": content}]})
    assert ok.status_code == 200 and "I see 1 image(s)." in ok.json()["result"]["response"]
    text_only = await _cf(http, CF_TEXT_MODEL, {"messages": [{"role": "user", "content": content}]})
    assert text_only.status_code == 400
    assert text_only.json()["success"] is False and text_only.json()["errors"][0]["code"] == 5006
    by_url = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    refused = await _cf(http, CF_VISION_MODEL, {"messages": [{"role": "user", "content": by_url}]})
    assert refused.status_code == 400 and "not fetched" in refused.json()["errors"][0]["message"]


# --- the APIs' rules -------------------------------------------------------------------------------------------


def _openai_call(call_id: str, name: str = "get_weather") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


async def test_openai_tool_rules(oai: openai.AsyncOpenAI) -> None:
    user = {"role": "user", "content": "hi"}
    error = await _openai_400(oai, messages=[user, {"role": "tool", "tool_call_id": "call_1", "content": "x"}])
    assert error.message == (
        "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."
    )
    calls = {"role": "assistant", "content": None, "tool_calls": [_openai_call("call_1"), _openai_call("call_2")]}
    error = await _openai_400(
        oai, messages=[user, calls, {"role": "tool", "tool_call_id": "call_1", "content": "x"}, user]
    )
    assert error.message == (
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        "'tool_call_id'. The following tool_call_ids did not have response messages: call_2"
    )
    long_id = "call_" + "x" * 41
    error = await _openai_400(
        oai,
        messages=[
            user,
            {"role": "assistant", "tool_calls": [_openai_call(long_id)]},
            {"role": "tool", "tool_call_id": long_id, "content": "x"},
        ],
    )
    assert error.message == (
        "Invalid 'messages[1].tool_calls[0].id': string too long. Expected a string with maximum length 40, but got "
        "a string with length 46 instead."
    )
    error = await _openai_400(oai, messages=[user], tool_choice="auto")
    assert "'tool_choice' is only allowed when 'tools' are specified" in error.message
    bad_name = [{"type": "function", "function": {"name": "get weather!", "parameters": CLOCK_SCHEMA}}]
    error = await _openai_400(oai, messages=[user], tools=bad_name)
    assert error.param == "tools[0].function.name" and "does not match pattern" in error.message
    error = await _openai_400(oai, messages=[user, {"role": "assistant", "content": None}])
    assert "got null" in error.message


async def test_anthropic_tool_rules(claude: anthropic.AsyncAnthropic) -> None:
    user = {"role": "user", "content": "hi"}
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"zone": "UTC"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "noon"}
    tools = ANTHROPIC_TOOLS
    assert await _anthropic_400(claude, messages=[user, user]) == (
        'messages: roles must alternate between "user" and "assistant", but found multiple "user" roles in a row'
    )
    missing = [user, {"role": "assistant", "content": [use]}, {"role": "user", "content": "and?"}]
    assert await _anthropic_400(claude, messages=missing, tools=tools) == (
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: toolu_1. Each "
        "`tool_use` block must have a corresponding `tool_result` block in the next message."
    )
    stray = [user, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [result]}]
    assert await _anthropic_400(claude, messages=stray, tools=tools) == (
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1. Each "
        "`tool_result` block must have a corresponding `tool_use` block in the previous message."
    )
    late = [
        user,
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "text", "text": "first"}, result]},
    ]
    assert "at the beginning of this message" in await _anthropic_400(claude, messages=late, tools=tools)
    bad_id = [
        user,
        {"role": "assistant", "content": [{**use, "id": "tool use 1"}]},
        {"role": "user", "content": [result]},
    ]
    assert "tool_use.id: String should match pattern" in await _anthropic_400(claude, messages=bad_id, tools=tools)
    empty = [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    assert await _anthropic_400(claude, messages=empty) == "messages: text content blocks must be non-empty"
    # block lists of only tool_use / only tool_result are valid turns
    ok = await claude.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=100,
        messages=[user, {"role": "assistant", "content": [use]}, {"role": "user", "content": [result]}],
        tools=tools,
    )
    assert ok.content[0].type == "text" and "Based on the tool result: noon." in ok.content[0].text


# --- streams ------------------------------------------------------------------------------------------------------


class GetWeather(BaseModel):
    city: str
    days: int


async def test_openai_stream_helper_assembles_tool_calls(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": "weather please"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        stream_options={"include_usage": True},
    ) as stream:
        events = [event.type async for event in stream]
        completion = await stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "GetWeather" and re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert completion.usage is not None and completion.usage.completion_tokens > 0


async def test_openai_stream_helper_parses_structured_output(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "a person"}], response_format=Person
    ) as stream:
        completion = await stream.get_final_completion()
    assert isinstance(completion.choices[0].message.parsed, Person)


async def test_anthropic_stream_assembles_tool_use(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=200,
        messages=[{"role": "user", "content": "get_weather for Oslo"}],
        tools=ANTHROPIC_TOOLS,
    ) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.name == "get_weather" and _valid(WEATHER_SCHEMA, block.input)
    record = emulator.calls("anthropic")[-1]
    assert record.stream and record.tool_call and record.chunks_sent > 1


async def test_call_log_over_http(oai: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    await oai.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": "get_time now"}], tools=OPENAI_TOOLS
    )
    [call] = (await http.get("/_emulator/calls", params={"provider": "openai"})).json()["calls"]
    assert call["tools_offered"] is True and call["tool_call"] is True and call["tool_names"] == ["get_time"]
    assert call["images"] == 0 and call["tool_results"] == 0 and call["response_format"] is None


async def test_streamed_invalid_json_schema(emulator: EmulatorServer, http: httpx.AsyncClient) -> None:
    emulator.faults.schedule("openai", {"action": "invalid_json_schema"})
    body = {
        "model": OPENAI_MODEL,
        "messages": [{"role": "user", "content": "weather"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}},
        "stream": True,
    }
    response = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, json=body)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert not _valid(WEATHER_SCHEMA, json.loads(text))
    [record] = emulator.calls("openai")
    assert record.outcome == "invalid_json_schema" and record.stream and record.response_format == "json_schema"
