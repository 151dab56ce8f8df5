"""The OpenAI-compatible endpoint (``aipipe serve``): the official ``openai`` SDK against it, and its pure mapping."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import openai
import pytest

from pipeline import AIProviderManager
from pipeline.bus.protocol import Bus
from pipeline.emulator import EmulatorServer
from pipeline.errors import ServiceUnavailableError
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.runtime.settings import Settings
from pipeline.serve.endpoint import (
    HEADER_CACHED,
    HEADER_COST,
    HEADER_PROVIDER,
    HEADER_REQUEST_ID,
    ServeState,
    create_app,
)
from pipeline.serve.keys import ApiKeys, ServeConfigError, api_keys_for
from pipeline.serve.openai_format import ERROR_STATUS, OpenAIHTTPError, model_list, to_ai_request
from pipeline.serve.openai_server import OpenAIServer
from schemas import AIRequest, AIResponse, CostEvent
from schemas.response import ERROR_TYPES
from tests.harness import Harness

ROOT = Path(__file__).resolve().parents[2]
FAST = {"retry": {"max_attempts": 1, "base_delay_ms": 1}}


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer() as emu:
        yield emu


@asynccontextmanager
async def serving(
    emu: EmulatorServer, prefix: str, *, config: dict[str, Any] | None = None, **env: str
) -> AsyncIterator[tuple[AIProviderManager, OpenAIServer]]:
    """A development manager on the in-process bus (every provider on ``emu``) and the endpoint over it."""
    environ = {"AIPIPE_EMULATE": "1", "AIPIPE_EMULATOR_URL": emu.url, "AIPIPE_TOPIC_PREFIX": prefix, **env}
    data: dict[str, Any] = {"providers": {p: dict(FAST) for p in ("openai", "cloudflare")}}
    data.update(config or {})
    manager = AIProviderManager(config_from_mapping(data, base=preset("development")), environ, bus="memory")
    async with manager, OpenAIServer(manager) as server:
        yield manager, server


def sdk(server: OpenAIServer, api_key: str = "anything") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=api_key, max_retries=0)


def bus_of(manager: AIProviderManager) -> Bus:
    assert manager.pipeline is not None
    return manager.pipeline.bus


async def read_keyed(bus: Bus, topic: str, key: str, type_: Any, timeout_s: float = 5.0) -> Any:
    """The first value with ``key`` on ``topic`` (from the beginning), decoded as ``type_``."""
    consumer = await bus.consumer([topic], group=None, from_beginning=True)
    try:
        with anyio.fail_after(timeout_s):
            while True:
                for record in await consumer.getmany(100, max_records=1000):
                    if record.key == key.encode():
                        return msgspec.json.decode(record.value, type=type_)
    finally:
        await consumer.stop()


# --- the SDK against a running endpoint ------------------------------------------------------


async def test_sdk_chat_completion_returns_the_pipelines_answer(emulator: EmulatorServer) -> None:
    async with serving(emulator, "serve-ok.") as (manager, server):
        client = sdk(server)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo",
            messages=[
                {"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Name three rivers in Europe."},
            ],
            max_tokens=32,
            temperature=0.2,
            user="alice",
        )
        completion = raw.parse()
        rid = raw.headers[HEADER_REQUEST_ID]
        answer: AIResponse = await read_keyed(bus_of(manager), manager.settings.topics.responses, rid, AIResponse)
        cost: CostEvent = await read_keyed(bus_of(manager), manager.settings.topics.costs, rid, CostEvent)

        assert completion.id == rid and completion.object == "chat.completion"
        assert answer.status == "ok"
        assert completion.choices[0].message.content == answer.content and answer.content
        assert completion.choices[0].message.role == "assistant"
        assert completion.model == answer.model == "@cf/meta/llama-3.1-8b-instruct"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == answer.usage.prompt_tokens
        assert completion.usage.completion_tokens == answer.usage.completion_tokens
        assert completion.usage.total_tokens == answer.usage.total_tokens > 0
        assert completion.usage.prompt_tokens_details is not None
        assert completion.usage.prompt_tokens_details.cached_tokens == 0
        assert raw.headers[HEADER_PROVIDER] == "cloudflare" == answer.provider
        assert raw.headers[HEADER_COST] == f"{answer.cost_usd:.10f}" and answer.cost_usd > 0
        assert raw.headers[HEADER_CACHED] == "false"
        assert cost.user == "alice" and cost.cost_usd == answer.cost_usd
        [call] = emulator.calls("cloudflare")
        assert call.max_tokens == 32 and call.temperature == 0.2
        assert call.roles == ["system", "user"]

        again = await client.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo",
            messages=[
                {"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Name three rivers in Europe."},
            ],
            max_completion_tokens=32,
            temperature=0.2,
        )
        assert again.headers[HEADER_CACHED] == "true" and again.headers[HEADER_COST] == "0.0000000000"
        assert again.parse().choices[0].message.content == answer.content
        assert len(emulator.calls()) == 1


async def test_models_unknown_model_stream_and_unknown_parameter(emulator: EmulatorServer) -> None:
    async with serving(emulator, "serve-err.") as (_manager, server):
        client = sdk(server)
        ids = [m.id async for m in client.models.list()]
        assert ids[:3] == ["gpt-3.5-turbo", "chat-small", "chat-large"]
        assert "@cf/meta/llama-3.1-8b-instruct" in ids and "gpt-4o-mini" in ids
        assert not any(i.startswith("claude") for i in ids)  # anthropic is disabled in development
        assert (await client.models.retrieve("chat-small")).owned_by == "aipipe"

        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
        assert not_found.value.code == "model_not_found" and "gpt-17" in not_found.value.message
        assert not_found.value.response.headers[HEADER_REQUEST_ID].startswith("chatcmpl-")

        with pytest.raises(openai.BadRequestError) as streamed:
            await client.chat.completions.create(
                model="gpt-3.5-turbo",
                messages=[{"role": "user", "content": "hi"}],
                stream_options={"include_usage": True},
            )
        assert streamed.value.param == "stream_options" and "only allowed when 'stream'" in streamed.value.message

        with pytest.raises(openai.BadRequestError) as unknown:
            await client.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], extra_body={"bogus": 1}
            )
        assert unknown.value.param == "bogus"
        assert "Unrecognized request argument supplied: bogus" in unknown.value.message

        with pytest.raises(openai.BadRequestError) as bad_temperature:
            await client.chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], temperature=3
            )
        assert bad_temperature.value.param == "temperature"
        assert not any(emulator.counts().values())


async def test_over_budget_is_402_with_a_clear_message(emulator: EmulatorServer) -> None:
    async with serving(emulator, "serve-budget.", config={"budget": {"global_daily_usd": 0.000000001}}) as (_, server):
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk(server).chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], max_tokens=16
            )
        err = refused.value
        assert err.status_code == 402 and not isinstance(err, openai.RateLimitError)
        assert err.code == "budget_exceeded" and err.type == "budget_exceeded_error"
        assert "budget exceeded: scope global daily limit" in err.message
        assert not any(emulator.counts().values())


async def test_provider_failures_map_to_503_with_the_attempts_summary(emulator: EmulatorServer) -> None:
    emulator.faults.set("openai", {"default": {"status": 500}})
    emulator.faults.set("cloudflare", {"default": {"status": 500}})
    async with serving(emulator, "serve-fail.") as (_, server):
        with pytest.raises(openai.InternalServerError) as failed:
            await sdk(server).chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}], max_tokens=16
            )
    assert failed.value.status_code == 503 and failed.value.code == "all_providers_failed"
    assert "cloudflare" in failed.value.message and "openai" in failed.value.message


async def test_client_keys_decide_the_user(emulator: EmulatorServer, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys]\n"sk-test-bob-0123456789" = "bob"\n"sk-test-carol-987654" = "carol"\n')
    async with serving(emulator, "serve-keys.", AIPIPE_API_KEYS=str(keys)) as (manager, server):
        async with httpx.AsyncClient() as http:
            missing = await http.post(
                f"{server.base_url}/chat/completions",
                json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]},
            )
            models_missing = await http.get(f"{server.base_url}/models")
        assert missing.status_code == 401 and models_missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"

        with pytest.raises(openai.AuthenticationError) as unknown:
            await sdk(server, "sk-test-mallory").chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}]
            )
        assert "sk-test-mallory" not in unknown.value.message

        raw = await sdk(server, "sk-test-bob-0123456789").chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hello"}], max_tokens=16, user="mallory"
        )
        rid = raw.headers[HEADER_REQUEST_ID]
        cost: CostEvent = await read_keyed(bus_of(manager), manager.settings.topics.costs, rid, CostEvent)
        assert cost.user == "bob"
        assert not any(c.status != 200 for c in emulator.calls())


@pytest.mark.kafka
@pytest.mark.parametrize("pipe", ["kafka"], indirect=True)
async def test_serve_as_a_client_of_stages_on_kafka(pipe: Harness, emu: EmulatorServer) -> None:
    env = {"AIPIPE_KAFKA_BOOTSTRAP": pipe.bootstrap or "", "AIPIPE_TOPIC_PREFIX": pipe.topics.prefix}
    manager = AIProviderManager(None, env, bus="kafka")
    async with manager, OpenAIServer(manager) as server:
        assert manager.pipeline is None  # the stages run in the harness, not here
        raw = await sdk(server).chat.completions.with_raw_response.create(
            model="chat-small", messages=[{"role": "user", "content": "serve over kafka"}], max_tokens=24
        )
    completion = raw.parse()
    assert raw.headers[HEADER_PROVIDER] == "cloudflare"
    assert completion.choices[0].message.content
    assert emu.counts()["cloudflare"] == 1 and emu.calls("cloudflare")[0].max_tokens == 24


def test_serve_refuses_an_open_endpoint_in_production(tmp_path: Path) -> None:
    env = {"AIPIPE_ENV": "production", "AIPIPE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "refusing to serve an open endpoint in production: set AIPIPE_API_KEYS" in done.stderr


# --- pure parts ------------------------------------------------------------------------------


def test_openai_body_maps_onto_an_ai_request() -> None:
    body = {
        "model": "chat-small",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]},
            {"role": "assistant", "content": "Hi!", "name": "bot", "refusal": None},
            {"role": "user", "content": "Again."},
        ],
        "max_completion_tokens": 77,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "user": "dave",
        "metadata": {"team": "search"},
        "n": 1,
        "stream": False,
        "seed": 7,
        "presence_penalty": 0,
        "providers": ["openai"],
        "cache": {"bypass": True},
        "timeout_ms": 5000,
    }
    req = to_ai_request(body, request_id="chatcmpl-1")
    assert req.id == "chatcmpl-1" and req.model == "chat-small"
    assert [(m.role, m.content) for m in req.messages or []] == [
        ("system", "Be brief."),
        ("user", "Hello, world"),
        ("assistant", "Hi!"),
        ("user", "Again."),
    ]
    assert (req.max_tokens, req.temperature, req.top_p, req.stop) == (77, 0.5, 0.9, ["\n\n"])
    assert req.user == "dave" and req.metadata == {"team": "search"}
    assert req.providers == ["openai"] and req.cache is not None and req.cache.bypass and req.timeout_ms == 5000


def test_a_client_key_user_cannot_be_overridden_by_the_body() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "user": "mallory", "max_tokens": 9}
    req = to_ai_request(body, request_id="r", key_user="bob")
    assert req.user == "bob" and req.metadata == {"openai_user": "mallory"} and req.max_tokens == 9
    assert to_ai_request({**body, "user": "bob"}, request_id="r", key_user="bob").metadata is None


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream' is enabled"),
        ({"stream": "yes"}, "stream", "'stream' must be a boolean"),
        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options", "supports only"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options", "must be a boolean"),
        ({"stream_resume": True}, "stream_resume", "`stream_resume` needs `stream: true`"),
        ({"n": 2}, "n", "parameter 'n' is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "matching regex"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
            "object",
        ),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when `tools` are given"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "Invalid value 'xml'"),
        ({"foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "differ"),
        ({"max_tokens": 0}, "max_tokens", "Expected `int` >= 1"),
        ({"model": ""}, "model", "you must provide a model"),
        ({"messages": []}, "messages", "non-empty array"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role", "'critic' is not supported"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c1", "content": "4"}]},
            "messages",
            "`tool_call_id` 'c1' answers no tool call of an earlier assistant message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "messages[0].content[0].image_url",
            "an image URL must be an https URL",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content",
            "of type 'input_audio' is not supported",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages", "at least one user or assistant message"),
    ],
)
def test_bad_openai_bodies_are_400_naming_the_parameter(body: dict[str, Any], param: str | None, text: str) -> None:
    full = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(OpenAIHTTPError) as info:
        to_ai_request(full, request_id="r")
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    assert info.value.param == param and text in info.value.message


def test_a_pipeline_invalid_request_names_the_field_it_is_about() -> None:
    too_many = OpenAIHTTPError.for_type(
        "invalid_request", "max_tokens 4096 exceeds every provider's max_tokens_per_request (largest: 1024)"
    )
    assert too_many.body()["error"]["param"] == "max_tokens"
    unknown = OpenAIHTTPError.for_type("invalid_request", "unknown provider(s) in `providers`: bogus")
    assert unknown.body()["error"]["param"] == "providers"
    assert OpenAIHTTPError.for_type("invalid_request", "the request is not valid").body()["error"]["param"] is None


def test_every_error_type_has_a_status() -> None:
    assert set(ERROR_STATUS) == set(ERROR_TYPES)
    status = {t: OpenAIHTTPError.for_type(t, "m").status for t in ERROR_TYPES}
    assert status == {
        "invalid_request": 400,
        "authentication": 401,
        "budget_exceeded": 402,
        "model_not_found": 404,
        "rate_limit": 429,
        "content_filter": 400,
        "context_length_exceeded": 400,
        "timeout": 504,
        "server_error": 502,
        "all_providers_failed": 503,
        "service_unavailable": 503,
        "stream_interrupted": 502,
        "cancelled": 499,
        "invalid_response": 502,
    }
    ctx = OpenAIHTTPError.for_type("context_length_exceeded", "too long").body()["error"]
    assert ctx == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


def test_key_file_is_checked_and_never_quoted(tmp_path: Path) -> None:
    good = tmp_path / "keys.toml"
    good.write_text('[keys]\n"sk-secret-1" = "alice"\n')
    keys = ApiKeys.from_file(good)
    assert keys.user_for("sk-secret-1") == "alice" and keys.user_for("sk-secret-2") is None
    assert "sk-secret" not in repr(keys)
    empty_user = tmp_path / "bad.toml"
    empty_user.write_text('[keys]\n"sk-secret-1" = ""\n')
    with pytest.raises(ServeConfigError, match="user name") as bad:
        ApiKeys.from_file(empty_user)
    assert "sk-secret" not in str(bad.value)
    no_table = tmp_path / "none.toml"
    no_table.write_text('"sk-secret-1" = "alice"\n')
    with pytest.raises(ServeConfigError, match=r"needs a \[keys\] table"):
        ApiKeys.from_file(no_table)
    with pytest.raises(ServeConfigError, match="file not found"):
        ApiKeys.from_file(tmp_path / "missing.toml")
    assert api_keys_for(Settings.from_env({})) is None
    with pytest.raises(ServeConfigError, match="refusing to serve an open endpoint in production"):
        api_keys_for(Settings.from_env({"AIPIPE_ENV": "production"}))
    assert api_keys_for(Settings.from_env({"AIPIPE_ENV": "production", "AIPIPE_API_KEYS": str(good)})) is not None


def test_model_list_names_groups_then_enabled_providers_models() -> None:
    entries = model_list(preset("development"))
    owners = {e["id"]: e["owned_by"] for e in entries}
    assert owners["gpt-3.5-turbo"] == "aipipe" and owners["chat-large"] == "aipipe"
    assert owners["gpt-4o"] == "openai" and owners["@cf/meta/llama-3.2-3b-instruct"] == "cloudflare"
    assert not any(owner == "anthropic" for owner in owners.values())
    assert len(owners) == len(entries)


# --- refusing at once what the pipeline cannot take (hardening) -------------------------------------


async def test_bodies_over_the_request_limit_are_413_at_once_and_nothing_is_published(
    emulator: EmulatorServer,
) -> None:
    async with serving(emulator, "serve-413.") as (manager, server):
        filler = "word " * (5 * 1024 * 1024 // 5)  # a 5 MiB body (4-8 MiB bodies were 500s after 10 s before)
        body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": filler}]}
        async with httpx.AsyncClient(timeout=30) as http:
            started = time.monotonic()
            big = await http.post(f"{server.base_url}/chat/completions", json=body)
            took = time.monotonic() - started
            just_over = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "x" * 1_048_600}]}
            over = await http.post(f"{server.base_url}/chat/completions", json=just_over)
        assert big.status_code == over.status_code == 413 and took < 5
        assert big.json()["error"]["code"] == "request_too_large" and HEADER_REQUEST_ID in big.headers
        consumer = await bus_of(manager).consumer([manager.settings.topics.requests], group=None)
        try:
            assert await consumer.getmany(200, max_records=10) == []
        finally:
            await consumer.stop()


async def _app_answers(ask: Any) -> httpx.Response:
    app = create_app(ServeState(ask=ask, config=preset("development"), api_keys=None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://aipipe") as http:
        return await http.post(
            "/v1/chat/completions",
            json={"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]},
        )


async def test_service_unavailable_is_503() -> None:
    async def ask(request: AIRequest) -> AIResponse:
        raise ServiceUnavailableError("the broker did not take the request within 10 s")

    response = await _app_answers(ask)
    assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"


async def test_an_unexpected_error_is_a_500_with_the_request_id_and_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ask(request: AIRequest) -> AIResponse:
        raise KeyError("a bug")

    with caplog.at_level(logging.ERROR, logger="aipipe.serve"):
        response = await _app_answers(ask)
    rid = response.headers[HEADER_REQUEST_ID]
    assert response.status_code == 500 and rid in response.json()["error"]["message"]
    assert "Traceback" not in response.text
    [record] = [r for r in caplog.records if rid in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)


# --- streaming (DESIGN A9) ---------------------------------------------------------------------


async def test_sdk_streams_chunks_with_usage_and_done(emulator: EmulatorServer) -> None:
    emulator.faults.load({"reply_words": 30})
    async with serving(emulator, "serve-stream.") as (manager, server):
        stream = await sdk(server).chat.completions.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "stream through serve"}],
            max_tokens=400,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, models, finish, usage, ids = "", set(), None, None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            models.add(chunk.model)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        (rid,) = ids
        answer: AIResponse = await read_keyed(bus_of(manager), manager.settings.topics.responses, rid, AIResponse)
        assert answer.status == "ok" and text == answer.content and answer.stream_chunks
        assert models == {"@cf/meta/llama-3.1-8b-instruct"} and finish == "stop"
        assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens > 0
        # this replica's chunks went to its own topic, not to ai.stream
        assert manager.client.stream_topic.startswith(f"{manager.settings.topics.stream}.serve-")


async def test_a_stream_cut_after_text_ends_with_an_in_band_error_and_no_done(emulator: EmulatorServer) -> None:
    emulator.faults.load({"reply_words": 30, "providers": {"cloudflare": {"default": {"stream_cut_after": 4}}}})
    async with serving(emulator, "serve-cut.") as (_manager, server):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "cut"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert "data: [DONE]" not in lines
    last = msgspec.json.decode(lines[-1][6:])
    assert last["error"]["code"] == "stream_interrupted" and last["error"]["type"] == "server_error"
    text = "".join(
        msgspec.json.decode(line[6:])["choices"][0]["delta"].get("content", "")
        for line in lines[:-1]
        if msgspec.json.decode(line[6:]).get("choices")
    )
    assert len(text.split()) == 4


async def test_a_stream_that_fails_before_any_text_is_an_http_error(emulator: EmulatorServer) -> None:
    emulator.faults.load({"providers": {p: {"default": {"status": 500}} for p in ("openai", "cloudflare")}})
    async with serving(emulator, "serve-fail.") as (_manager, server):
        with pytest.raises(openai.APIStatusError) as failed:
            stream = await sdk(server).chat.completions.create(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}], stream=True
            )
            async for _ in stream:
                pass
        assert failed.value.status_code == 503 and failed.value.code == "all_providers_failed"


async def test_a_client_that_disconnects_cancels_the_provider_call(emulator: EmulatorServer) -> None:
    emulator.faults.load({"reply_words": 60, "providers": {"cloudflare": {"default": {"chunk_interval_ms": 50}}}})
    async with serving(emulator, "serve-gone.") as (manager, server):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "bye"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                rid = response.headers[HEADER_REQUEST_ID]
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # read one event, then hang up
        (call,) = await emulator.wait_for_calls(1, finished=True, timeout_s=10)
        assert call.outcome == "client_disconnected" and call.chunks_sent < 60
        answer: AIResponse = await read_keyed(bus_of(manager), manager.settings.topics.responses, rid, AIResponse)
        assert answer.status == "error" and answer.error is not None and answer.error.type == "cancelled"
