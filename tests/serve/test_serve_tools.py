"""Tools, images and structured output end to end (DESIGN A4): the official openai SDK against ``aipipe serve``.

The emulator enforces each API's real rules (Anthropic's role alternation and
``tool_result`` right after its ``tool_use``, OpenAI's tool message after the
call, the 40-character id limit), so a wrong translation fails here.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jsonschema
import msgspec
import openai
import pytest
from pydantic import BaseModel

from pipeline import AIProviderManager
from pipeline.emulator import EmulatorServer
from pipeline.errors import InvalidRequestError, InvalidResponseError
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.runtime.messages import CONTROL_DECODER
from pipeline.serve.endpoint import HEADER_PROVIDER
from pipeline.serve.openai_server import OpenAIServer
from schemas import AIRequest, CostEvent
from schemas.events import Health

FAST = {"retry": {"max_attempts": 1, "base_delay_ms": 1}}
PROVIDERS = ("openai", "anthropic", "cloudflare")
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER_SCHEMA},
    }
]
ID_SHAPE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# a 1x1 PNG
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
        "00000500010d0a2db40000000049454e44ae426082"
    )
).decode()


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer() as emu:
        yield emu


@asynccontextmanager
async def serving(
    emu: EmulatorServer,
    prefix: str,
    tmp_path: Any,
    *,
    model_groups: dict[str, dict[str, str]] | None = None,
    cloudflare_models: list[str] | None = None,
) -> AsyncIterator[tuple[AIProviderManager, Any]]:
    """All three providers on the emulator, in-process bus, and the endpoint over the manager."""
    environ = {
        "AIPIPE_EMULATE": "1",
        "AIPIPE_EMULATOR_URL": emu.url,
        "AIPIPE_TOPIC_PREFIX": prefix,
        "AIPIPE_HOME": str(tmp_path),
    }
    data: dict[str, Any] = {"providers": {p: dict(FAST) for p in PROVIDERS}}
    if model_groups:
        data["model_groups"] = model_groups
    if cloudflare_models:
        data["providers"]["cloudflare"]["models"] = cloudflare_models
    manager = AIProviderManager(config_from_mapping(data, base=preset("production")), environ, bus="memory")
    async with manager, OpenAIServer(manager) as server:
        yield manager, server


async def health_events(manager: AIProviderManager) -> list[Health]:
    """Every ``health`` event on ``ai.control`` so far, in order."""
    assert manager.pipeline is not None
    bus = manager.pipeline.bus
    consumer = await bus.consumer([manager.settings.topics.control], group=None, from_beginning=True)
    try:
        events = [CONTROL_DECODER.decode(r.value) for r in await consumer.getmany(200, max_records=1000)]
    finally:
        await consumer.stop()
    return [e for e in events if isinstance(e, Health)]


def sdk(server: OpenAIServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="anything", max_retries=0)


async def ask_tools(
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]], provider: str
) -> tuple[Any, str | None]:
    raw = await client.chat.completions.with_raw_response.create(
        model="chat-large",
        messages=messages,
        tools=TOOLS,
        extra_body={"providers": [provider]},  # type: ignore[arg-type]
    )
    return raw.parse(), raw.headers.get(HEADER_PROVIDER)


async def turn_one(client: openai.AsyncOpenAI, provider: str) -> tuple[list[dict[str, Any]], Any]:
    """A question that needs the tool, answered with a tool call by ``provider``."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You answer weather questions with the get_weather tool."},
        {"role": "user", "content": "What is the weather in Paris? Use get_weather."},
    ]
    completion, answered_by = await ask_tools(client, messages, provider)
    assert answered_by == provider
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) >= 1
    call = calls[0]
    assert call.function.name == "get_weather" and ID_SHAPE.match(call.id)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    messages.append(choice.message.model_dump(exclude_none=True))
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": '{"temp_c": 21, "sky": "clear"}'})
    return messages, completion


async def test_the_sdk_tool_loop_with_each_provider_answering(emulator: EmulatorServer, tmp_path: Any) -> None:
    async with serving(emulator, "tools-each.", tmp_path) as (_, server):
        client = sdk(server)
        for provider in PROVIDERS:
            messages, _ = await turn_one(client, provider)
            final, answered_by = await ask_tools(client, messages, provider)
            assert answered_by == provider
            assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
            assert "temp_c" in (final.choices[0].message.content or "")  # the tool's result reached the model
        last = {c.provider: c for c in emulator.calls()}
        assert {p: last[p].tool_results for p in PROVIDERS} == {p: 1 for p in PROVIDERS}


@pytest.mark.parametrize(
    ("first", "second"),
    [("anthropic", "openai"), ("openai", "anthropic"), ("cloudflare", "anthropic"), ("anthropic", "cloudflare")],
)
async def test_a_conversation_started_on_one_provider_continues_on_another(
    emulator: EmulatorServer, tmp_path: Any, first: str, second: str
) -> None:
    async with serving(emulator, f"tools-{first}-{second}.", tmp_path) as (_, server):
        client = sdk(server)
        messages, _ = await turn_one(client, first)
        final, answered_by = await ask_tools(client, messages, second)
        assert answered_by == second and final.choices[0].finish_reason == "stop"
        calls = [c for c in emulator.calls() if c.provider == second]
        assert calls[-1].status == 200 and calls[-1].tool_results == 1


async def test_a_turn_fails_over_mid_conversation_without_the_client_knowing(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    async with serving(emulator, "tools-failover.", tmp_path) as (_manager, server):
        client = sdk(server)
        messages, _ = await turn_one(client, "openai")
        emulator.faults.schedule("openai", {"status": 500})
        raw = await client.chat.completions.with_raw_response.create(
            model="chat-large",
            messages=messages,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            extra_body={"providers": ["openai", "anthropic"]},
        )
        assert raw.headers[HEADER_PROVIDER] == "anthropic"
        assert raw.parse().choices[0].finish_reason == "stop"


class Weather(BaseModel):
    city: str
    temperature_c: float
    conditions: list[str]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_parse_with_a_pydantic_model(emulator: EmulatorServer, tmp_path: Any, provider: str) -> None:
    async with serving(emulator, f"tools-parse-{provider}.", tmp_path) as (_, server):
        completion = await sdk(server).chat.completions.parse(
            model="chat-large",
            messages=[{"role": "user", "content": "Describe the weather in Oslo."}],
            response_format=Weather,
            extra_body={"providers": [provider]},
        )
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Weather) and parsed.city
        assert completion.choices[0].finish_reason == "stop"


async def test_streamed_tool_calls_are_assembled_by_the_sdk(emulator: EmulatorServer, tmp_path: Any) -> None:
    async with serving(emulator, "tools-stream.", tmp_path) as (_, server):
        client = sdk(server)
        for provider in ("openai", "anthropic"):
            async with client.chat.completions.stream(
                model="chat-large",
                messages=[{"role": "user", "content": "Weather in Rome? Call get_weather."}],
                tools=TOOLS,  # type: ignore[arg-type]
                extra_body={"providers": [provider]},
            ) as stream:
                final = await stream.get_final_completion()
            choice = final.choices[0]
            assert choice.finish_reason == "tool_calls", provider
            assert choice.message.tool_calls and choice.message.tool_calls[0].function.name == "get_weather"
            jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), WEATHER_SCHEMA)


# --- routing by capability, structured output, images: through the Python API --------------------


async def test_a_tools_request_is_routed_past_a_candidate_without_tools(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    async with serving(emulator, "tools-skip.", tmp_path) as (manager, _):
        response = await manager.generate_content(
            {
                "model": "gpt-3.5-turbo",  # Workers AI llama-3.1-8b takes no tools
                "messages": [{"role": "user", "content": "Weather in Lima? use get_weather"}],
                "tools": TOOLS,
                "providers": ["cloudflare", "openai"],
            }
        )
        assert response.status == "ok" and response.provider == "openai" and response.tool_calls
        skip = response.attempts[0]
        assert (skip.provider, skip.outcome, skip.error_type) == ("cloudflare", "skipped", "invalid_request")
        assert skip.reason is not None and "tools" in skip.reason
        assert [c.provider for c in emulator.calls()] == ["openai"]  # no call to the skipped candidate


async def test_an_image_request_is_routed_past_a_candidate_without_vision(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}
    async with serving(emulator, "tools-vision.", tmp_path) as (manager, _):
        response = await manager.generate_content(
            {
                "model": "chat-large",  # Workers AI llama-3.3-70b takes no images
                "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],
                "providers": ["cloudflare", "anthropic"],
            }
        )
        assert response.status == "ok" and response.provider == "anthropic"
        assert response.attempts[0].outcome == "skipped" and "images" in (response.attempts[0].reason or "")
        assert [(c.provider, c.images) for c in emulator.calls()] == [("anthropic", 1)]
        # the image travelled by claim check: stored once by hash, a reference on the topic
        assert len(list((tmp_path / "blobs").iterdir())) == 1
        with pytest.raises(InvalidRequestError, match=r"does not take images \(vision\)") as info:
            await manager.generate_content(
                {
                    "model": "gpt-3.5-turbo",
                    "messages": [{"role": "user", "content": [image]}],
                    "providers": ["cloudflare", "openai"],
                }
            )
        assert [a.outcome for a in info.value.attempts] == ["skipped", "skipped"]
        assert len(emulator.calls()) == 1


async def test_an_https_image_skips_a_provider_that_needs_the_bytes(emulator: EmulatorServer, tmp_path: Any) -> None:
    groups = {"vision": {"cloudflare": "@cf/meta/llama-3.2-11b-vision-instruct", "openai": "gpt-4o-mini"}}
    models = [
        "@cf/meta/llama-3.1-8b-instruct",
        "@cf/meta/llama-3.3-70b-instruct-fp8-fast",
        "@cf/meta/llama-3.2-11b-vision-instruct",
    ]
    async with serving(emulator, "tools-url.", tmp_path, model_groups=groups, cloudflare_models=models) as (manager, _):
        response = await manager.generate_content(
            {
                "model": "vision",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                    }
                ],
                "providers": ["cloudflare", "openai"],
            }
        )
        assert response.status == "ok" and response.provider == "openai"
        skip = response.attempts[0]
        assert skip.provider == "cloudflare" and skip.outcome == "skipped" and "never fetches" in (skip.reason or "")
        assert not (tmp_path / "blobs").exists()  # an https URL is passed on, never fetched or stored


async def test_an_answer_that_breaks_the_schema_falls_back_without_a_breaker_count(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}}
    async with serving(emulator, "tools-schema.", tmp_path) as (manager, _):
        emulator.faults.schedule("openai", {"action": "invalid_json_schema"})
        response = await manager.generate_content(
            {
                "model": "chat-large",
                "prompt": "Count the planets.",
                "response_format": fmt,
                "providers": ["openai", "anthropic"],
            }
        )
        assert response.status == "ok" and response.provider == "anthropic"
        jsonschema.validate(json.loads(response.content or ""), schema)
        first = response.attempts[0]
        assert (first.provider, first.outcome, first.error_type) == ("openai", "error", "invalid_response")
        # the provider answered; only the answer was unusable: its health event is a success (no breaker count)
        assert [(h.provider, h.ok) for h in await health_events(manager)] == [("openai", True), ("anthropic", True)]

        emulator.faults.schedule("openai", {"action": "invalid_json_schema"})
        with pytest.raises(InvalidResponseError, match="no answer held to the response format") as info:
            await manager.generate_content(
                {"model": "chat-large", "prompt": "Count again.", "response_format": fmt, "providers": ["openai"]}
            )
        assert [(a.provider, a.error_type) for a in info.value.attempts] == [("openai", "invalid_response")]


async def test_a_tool_call_answer_is_cached_and_replayed_with_its_calls(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    request = {
        "model": "chat-large",
        "messages": [{"role": "user", "content": "Weather in Kyiv? use get_weather"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "providers": ["anthropic"],
    }
    async with serving(emulator, "tools-cache.", tmp_path) as (manager, _):
        first = await manager.generate_content(dict(request))
        again = await manager.generate_content(dict(request))
        assert first.tool_calls and first.content is None and first.finish_reason == "tool_calls"
        assert again.cached and again.tool_calls == first.tool_calls and again.finish_reason == "tool_calls"
        assert len(emulator.calls()) == 1


def test_a_request_carries_references_not_image_bytes() -> None:
    from stages.rules.images import reference_for

    raw = base64.b64decode(PIXEL)
    ref = reference_for("image/png", raw)
    request = msgspec.convert(
        {
            "id": "r",
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ref}}]}],
        },
        AIRequest,
    )
    assert request.needs() == frozenset({"vision"}) and ref.startswith("aipipe-blob:image/png;sha256:")


# --- found by trying to break it ---------------------------------------------------------------


async def test_a_schema_with_a_remote_ref_is_refused_and_nothing_is_fetched_or_called(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    remote = {"type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/secret.json"}}}
    dangling = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}
    async with serving(emulator, "tools-ref.", tmp_path) as (manager, _):
        for schema, text in ((remote, "only references inside the schema"), (dangling, "does not resolve")):
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            with pytest.raises(InvalidRequestError, match=text):
                await manager.generate_content({"model": "chat-large", "prompt": "json", "response_format": fmt})
        bad_tool = [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}},
            }
        ]
        with pytest.raises(InvalidRequestError, match=r"tools\[0\]\.function\.parameters"):
            await manager.generate_content({"model": "chat-large", "prompt": "hi", "tools": bad_tool})
        assert emulator.calls() == []


async def test_a_forced_tool_choice_skips_workers_ai_and_is_checked_in_the_answer(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    two = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    async with serving(emulator, "tools-choice.", tmp_path) as (manager, _):
        response = await manager.generate_content(
            {
                "model": "chat-large",
                "messages": [{"role": "user", "content": "Use get_weather for Paris"}],
                "tools": two,
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                "providers": ["cloudflare", "openai"],
            }
        )
        skip = response.attempts[0]
        assert (skip.provider, skip.outcome) == ("cloudflare", "skipped") and "tool_choice" in (skip.reason or "")
        assert response.provider == "openai" and response.tool_calls
        assert response.tool_calls[0].function.name == "get_time"


async def test_a_history_one_provider_cannot_express_skips_it(emulator: EmulatorServer, tmp_path: Any) -> None:
    broken_arguments = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with serving(emulator, "tools-untranslatable.", tmp_path) as (manager, _):
        response = await manager.generate_content(
            {"model": "chat-large", "messages": broken_arguments, "tools": TOOLS, "providers": ["anthropic", "openai"]}
        )
        skip = response.attempts[0]
        assert (skip.provider, skip.outcome, skip.error_type) == ("anthropic", "skipped", "invalid_request")
        assert "not JSON" in (skip.reason or "") and response.provider == "openai"
        assert [c.provider for c in emulator.calls()] == ["openai"]


async def test_a_cut_tool_call_stream_is_never_spliced_onto_another_providers_call(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    async with serving(emulator, "tools-cut.", tmp_path) as (_, server):
        emulator.faults.schedule("openai", {"stream_cut_after": 2})
        with pytest.raises(openai.APIError) as info:
            async with sdk(server).chat.completions.stream(
                model="chat-large",
                messages=[{"role": "user", "content": "Weather in Rome? Call get_weather."}],
                tools=TOOLS,  # type: ignore[arg-type]
                extra_body={"providers": ["openai", "anthropic"], "stream_resume": True},
            ) as stream:
                await stream.get_final_completion()
        assert getattr(info.value, "code", None) == "stream_interrupted"
        assert [c.provider for c in emulator.calls()] == ["openai"]  # no provider continued a cut tool call


async def test_the_cost_of_answers_that_broke_the_schema_is_recorded(emulator: EmulatorServer, tmp_path: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}}
    async with serving(emulator, "tools-cost.", tmp_path) as (manager, _):
        emulator.faults.schedule("openai", {"action": "invalid_json_schema"})
        emulator.faults.schedule("anthropic", {"action": "invalid_json_schema"})
        with pytest.raises(InvalidResponseError) as info:
            await manager.generate_content(
                {"model": "chat-large", "prompt": "count", "response_format": fmt, "providers": ["openai", "anthropic"]}
            )
        request_id = info.value.request_id
        assert manager.pipeline is not None
        consumer = await manager.pipeline.bus.consumer([manager.settings.topics.costs], group=None, from_beginning=True)
        try:
            records = await consumer.getmany(200, max_records=100)
        finally:
            await consumer.stop()
        events = [msgspec.json.decode(r.value, type=CostEvent) for r in records if r.key == (request_id or "").encode()]
        assert len(events) == 1 and events[0].status == "invalid_response"
        assert [line.provider for line in events[0].lines] == ["openai", "anthropic"] and events[0].cost_usd > 0


@pytest.mark.parametrize(
    ("part", "text"),
    [
        ({"type": "text", "text": None}, "Expected `str`"),
        (
            {"type": "image_url", "image_url": {"url": "aipipe-blob:image/png;sha256:" + "0" * 64}},
            "https URL or a data",
        ),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, "no bytes"),
        (
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello world").decode()},
            },
            "are not image/png",
        ),
    ],
)
async def test_bad_parts_are_a_400_at_the_endpoint(
    emulator: EmulatorServer, tmp_path: Any, part: dict[str, Any], text: str
) -> None:
    async with serving(emulator, f"tools-bad-{abs(hash(text)) % 1000}.", tmp_path) as (_, server):
        with pytest.raises(openai.BadRequestError) as info:
            await sdk(server).chat.completions.create(
                model="chat-large",
                messages=[{"role": "user", "content": [part]}],  # type: ignore[list-item]
            )
        assert text in str(info.value)
        assert emulator.calls() == []


async def test_a_body_nested_too_deep_is_a_400(emulator: EmulatorServer, tmp_path: Any) -> None:
    async with serving(emulator, "tools-deep.", tmp_path) as (_, server):
        import httpx

        body = b'{"model": "chat-large", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{server.base_url}/chat/completions", content=body, headers={"content-type": "application/json"}
            )
        assert answer.status_code == 400


async def test_a_streamed_answer_that_breaks_the_schema_ends_invalid_response(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    async with serving(emulator, "tools-stream-schema.", tmp_path) as (_, server):
        emulator.faults.schedule("openai", {"action": "invalid_json_schema"})
        stream = await sdk(server).chat.completions.create(
            model="chat-large",
            messages=[{"role": "user", "content": "count"}],
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}},
            stream=True,
            extra_body={"providers": ["openai", "anthropic"]},
        )
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
        assert getattr(info.value, "code", None) == "invalid_response"
        assert [c.provider for c in emulator.calls()] == ["openai"]  # shown already: not sent elsewhere


async def test_parallel_tool_calls_are_answered_and_sent_back_on_another_provider(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    two = [*TOOLS, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    async with serving(emulator, "tools-parallel.", tmp_path) as (_, server):
        client = sdk(server)
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Call get_weather and get_time for Paris."}]
        first = await client.chat.completions.create(
            model="chat-large",
            messages=messages,
            tools=two,
            extra_body={"providers": ["openai"]},  # type: ignore[arg-type]
        )
        calls = first.choices[0].message.tool_calls or []
        assert [c.function.name for c in calls] == ["get_weather", "get_time"] and len({c.id for c in calls}) == 2
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages += [{"role": "tool", "tool_call_id": c.id, "content": f"result of {c.function.name}"} for c in calls]
        final = await client.chat.completions.create(
            model="chat-large",
            messages=messages,
            tools=two,
            extra_body={"providers": ["anthropic"]},  # type: ignore[arg-type]
        )
        assert final.choices[0].finish_reason == "stop"
        assert emulator.calls()[-1].tool_results == 2  # both results in one user turn of tool_result blocks
        single = await client.chat.completions.create(
            model="chat-large",
            messages=messages[:1],  # type: ignore[arg-type]
            tools=two,  # type: ignore[arg-type]
            parallel_tool_calls=False,
            extra_body={"providers": ["anthropic"]},
        )
        assert len(single.choices[0].message.tool_calls or []) == 1


async def test_json_object_and_a_schema_with_tools_on_anthropic_follow_the_instruction(
    emulator: EmulatorServer, tmp_path: Any
) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    async with serving(emulator, "tools-anthropic-json.", tmp_path) as (manager, _):
        as_object = await manager.generate_content(
            {
                "model": "chat-large",
                "prompt": "json please",
                "response_format": {"type": "json_object"},
                "providers": ["anthropic"],
            }
        )
        assert isinstance(json.loads(as_object.content or ""), dict)
        with_tools = await manager.generate_content(
            {
                "model": "chat-large",
                "prompt": "How many moons has Mars?",
                "tools": TOOLS,
                "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
                "providers": ["anthropic"],
            }
        )
        jsonschema.validate(json.loads(with_tools.content or ""), schema)
