"""Each adapter against the emulator: success, every classification row, transport failures, secrecy."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import httpx_aiohttp
import pytest
import pytest_asyncio

from pipeline.emulator import EmulatorServer, prompt_tokens, reply_text, text_tokens
from pipeline.errors import (
    AIProviderError,
    AuthenticationError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderServerError,
    ProviderTimeoutError,
    RateLimitError,
)
from schemas.request import Message
from stages.providers import ProviderAdapter, ProviderCall, build_adapter

KEY = "sk-test-SECRETKEY-0123456789abcdef"
ACCOUNT = "acct-test-1"
PROVIDERS = ("openai", "anthropic", "cloudflare")
MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-20241022",
    "cloudflare": "@cf/meta/llama-3.1-8b-instruct",
}
TIMEOUT_S = 5.0


@pytest.fixture(autouse=True)
def _fresh_emulator(emulator: EmulatorServer) -> Iterator[None]:
    emulator.reset()
    yield
    emulator.reset()


@pytest_asyncio.fixture(params=["aiohttp", "httpx"])
async def any_client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    client = httpx_aiohttp.HttpxAiohttpClient() if request.param == "aiohttp" else httpx.AsyncClient()
    async with client:
        yield client


def adapter_for(emu: EmulatorServer, provider: str, *, key: str | None = KEY, account: str | None = ACCOUNT) -> Any:
    base = {
        "openai": emu.env["OPENAI_BASE_URL"],
        "anthropic": emu.env["ANTHROPIC_BASE_URL"],
        "cloudflare": emu.env["CLOUDFLARE_BASE_URL"],
    }[provider]
    return build_adapter(provider, base_url=base, api_key=key, account_id=account)


def make_call(
    provider: str, text: str = "How do consumer groups work?", *, model: str | None = None, **kw: Any
) -> ProviderCall:
    return ProviderCall(
        model=model or MODELS[provider],
        messages=[Message(role="system", content="Answer briefly."), Message(role="user", content=text)],
        max_tokens=kw.pop("max_tokens", 200),
        **kw,
    )


async def expect_error(
    adapter: ProviderAdapter,
    client: httpx.AsyncClient,
    call: ProviderCall,
    cls: type[AIProviderError],
    timeout_s: float = TIMEOUT_S,
) -> AIProviderError:
    with pytest.raises(AIProviderError) as info:
        await adapter.complete(client, call, timeout_s)
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    assert err.provider == adapter.name
    assert KEY not in str(err) and KEY not in repr(err)
    return err


# --- success -----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_success_on_both_clients(emulator: EmulatorServer, any_client: httpx.AsyncClient, provider: str) -> None:
    call = make_call(provider, temperature=0.5, top_p=0.9, stop=["\n\n"], user="user-1")
    result = await adapter_for(emulator, provider).complete(any_client, call, TIMEOUT_S)
    expected_text, truncated = reply_text(provider, MODELS[provider], "How do consumer groups work?", 200)  # type: ignore[arg-type]
    assert not truncated
    assert result.content == expected_text
    assert result.model == MODELS[provider]
    assert result.status_code == 200
    expected_prompt = prompt_tokens(["Answer briefly.", "How do consumer groups work?"])
    assert result.usage.prompt_tokens == expected_prompt
    assert result.usage.completion_tokens == text_tokens(expected_text)
    assert result.usage.total_tokens == expected_prompt + text_tokens(expected_text)
    assert result.request_id
    (record,) = emulator.calls(provider)  # type: ignore[arg-type]
    assert record.status == 200 and record.outcome == "ok"
    assert record.roles == ["system", "user"]
    assert record.max_tokens == 200


async def test_max_tokens_truncates_answer(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    result = await adapter_for(emulator, "openai").complete(client, make_call("openai", max_tokens=3), TIMEOUT_S)
    assert result.content == "OpenAI emulator reply from gpt-4o-mini"[:12]
    assert result.usage.completion_tokens == 3
    assert result.finish_reason == "length"


async def test_openai_cached_tokens(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("openai", {"action": "ok", "cached_tokens": 7})
    result = await adapter_for(emulator, "openai").complete(client, make_call("openai"), TIMEOUT_S)
    assert result.usage.cached_prompt_tokens == 7
    assert result.usage.prompt_tokens == prompt_tokens(["Answer briefly.", "How do consumer groups work?"])


async def test_anthropic_cache_reads_fold_into_prompt(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("anthropic", {"cached_tokens": 7})
    result = await adapter_for(emulator, "anthropic").complete(client, make_call("anthropic"), TIMEOUT_S)
    assert result.usage.prompt_tokens == prompt_tokens(["Answer briefly.", "How do consumer groups work?"])
    assert result.usage.cached_prompt_tokens == 7
    assert result.usage.cache_creation_prompt_tokens == 0


async def test_anthropic_conversation_rules_pass_real_validation(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    call = ProviderCall(
        model=MODELS["anthropic"],
        messages=[
            Message(role="assistant", content="Hello, I am the assistant."),
            Message(role="system", content="Be precise."),
            Message(role="user", content="One."),
            Message(role="user", content="Two."),
            Message(role="assistant", content="Prefill "),
        ],
        max_tokens=50,
    )
    result = await adapter_for(emulator, "anthropic").complete(client, call, TIMEOUT_S)
    assert result.content
    (record,) = emulator.calls("anthropic")
    assert record.roles == ["system", "user", "assistant", "user", "assistant"]
    assert record.last_user_text == "One.\n\nTwo."  # merged; a user turn was put first (roles[1])


# --- HTTP status rows --------------------------------------------------------------------------------


STATUS_ROWS: list[tuple[int, type[AIProviderError]]] = [
    (400, InvalidRequestError),
    (401, AuthenticationError),
    (403, AuthenticationError),
    (404, ModelNotFoundError),
    (408, ProviderTimeoutError),
    (429, RateLimitError),
    (500, ProviderServerError),
    (502, ProviderServerError),
    (503, ProviderServerError),
    (504, ProviderServerError),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("status", "cls"), STATUS_ROWS)
async def test_status_classification(
    emulator: EmulatorServer, client: httpx.AsyncClient, provider: str, status: int, cls: type[AIProviderError]
) -> None:
    emulator.faults.schedule(provider, {"status": status})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, provider), client, make_call(provider), cls)
    assert err.status_code == status
    assert emulator.counts()[provider] == 1  # exactly one HTTP call


async def test_anthropic_529_overloaded(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("anthropic", {"kind": "overloaded", "retry_after_s": 4})
    err = await expect_error(adapter_for(emulator, "anthropic"), client, make_call("anthropic"), ProviderServerError)
    assert err.status_code == 529
    assert err.retry_after_s == 4.0
    assert "overloaded_error" in str(err)


async def test_cloudflare_not_found_kind_is_400_no_such_model(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    emulator.faults.schedule("cloudflare", {"kind": "not_found"})
    err = await expect_error(adapter_for(emulator, "cloudflare"), client, make_call("cloudflare"), ModelNotFoundError)
    assert err.status_code == 400
    assert "5007" in str(err)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_unknown_model_is_model_not_found(
    emulator: EmulatorServer, client: httpx.AsyncClient, provider: str
) -> None:
    model = {"openai": "gpt-9", "anthropic": "claude-9-opus", "cloudflare": "@cf/meta/llama-9"}[provider]
    err = await expect_error(
        adapter_for(emulator, provider), client, make_call(provider, model=model), ModelNotFoundError
    )
    assert err.status_code == (400 if provider == "cloudflare" else 404)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_missing_key_is_authentication(
    emulator: EmulatorServer, client: httpx.AsyncClient, provider: str
) -> None:
    err = await expect_error(
        adapter_for(emulator, provider, key=None), client, make_call(provider), AuthenticationError
    )
    assert err.status_code == 401


async def test_cloudflare_without_account_makes_no_call(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    await expect_error(
        adapter_for(emulator, "cloudflare", account=None), client, make_call("cloudflare"), AuthenticationError
    )
    assert emulator.counts()["cloudflare"] == 0


# --- context window and content policy ---------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_injected_context_length_each_wording(
    emulator: EmulatorServer, client: httpx.AsyncClient, provider: str
) -> None:
    emulator.faults.schedule(provider, {"kind": "context_length"})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, provider), client, make_call(provider), ContextLengthExceededError)
    assert err.status_code == 400
    wording = {
        "openai": "context_length_exceeded",
        "anthropic": "prompt is too long",
        "cloudflare": "context window limit",
    }[provider]
    assert wording in str(err)


async def test_generic_maximum_context_length_wording(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule(
        "cloudflare", {"status": 400, "message": "Input exceeds the maximum context length of 4096"}
    )
    await expect_error(adapter_for(emulator, "cloudflare"), client, make_call("cloudflare"), ContextLengthExceededError)


async def test_real_context_overflow_openai(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    call = make_call("openai", "word " * 14_000, model="gpt-3.5-turbo", max_tokens=2_000)
    err = await expect_error(adapter_for(emulator, "openai"), client, call, ContextLengthExceededError)
    assert "maximum context length is 16385 tokens" in str(err)


async def test_real_context_overflow_cloudflare(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    call = make_call("cloudflare", "word " * 2_500, model="@cf/mistral/mistral-7b-instruct-v0.1", max_tokens=256)
    err = await expect_error(adapter_for(emulator, "cloudflare"), client, call, ContextLengthExceededError)
    assert "(2824)" in str(err)


async def test_max_tokens_above_model_limit_is_invalid_request(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    call = make_call("anthropic", max_tokens=9_000)
    err = await expect_error(adapter_for(emulator, "anthropic"), client, call, InvalidRequestError)
    assert "8192" in str(err)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_content_filter(emulator: EmulatorServer, client: httpx.AsyncClient, provider: str) -> None:
    emulator.faults.schedule(provider, {"kind": "content_filter"})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, provider), client, make_call(provider), ContentFilterError)
    assert err.status_code == 400
    assert not err.retryable


# --- Retry-After ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_429_retry_after_seconds(emulator: EmulatorServer, client: httpx.AsyncClient, provider: str) -> None:
    emulator.faults.schedule(provider, {"status": 429, "retry_after_s": 2})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, provider), client, make_call(provider), RateLimitError)
    assert err.retry_after_s == 2.0
    assert err.retryable


async def test_429_retry_after_http_date(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("openai", {"status": 429, "retry_after_s": 30, "retry_after_http_date": True})
    err = await expect_error(adapter_for(emulator, "openai"), client, make_call("openai"), RateLimitError)
    assert err.retry_after_s is not None
    assert 28.0 <= err.retry_after_s <= 30.0  # HTTP-dates have 1 s resolution


async def test_429_retry_after_ms(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("anthropic", {"status": 429, "retry_after_ms": 1500, "retry_after_s": 9})
    err = await expect_error(adapter_for(emulator, "anthropic"), client, make_call("anthropic"), RateLimitError)
    assert err.retry_after_s == 1.5


async def test_503_with_retry_after(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("cloudflare", {"status": 503, "retry_after_s": 5})
    err = await expect_error(adapter_for(emulator, "cloudflare"), client, make_call("cloudflare"), ProviderServerError)
    assert err.retry_after_s == 5.0


# --- transport failures and bad 200s --------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_connection_reset(emulator: EmulatorServer, any_client: httpx.AsyncClient, provider: str) -> None:
    emulator.faults.schedule(provider, {"action": "reset"})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, provider), any_client, make_call(provider), ProviderServerError)
    assert err.status_code is None
    assert "connection dropped" in str(err)
    (record,) = await emulator.wait_for_calls(1, provider, finished=True)  # type: ignore[arg-type]
    assert record.outcome == "reset" and record.status is None
    # the next call on the same client works again
    result = await adapter_for(emulator, provider).complete(any_client, make_call(provider), TIMEOUT_S)
    assert result.content


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_hang_past_timeout(emulator: EmulatorServer, any_client: httpx.AsyncClient, provider: str) -> None:
    emulator.faults.schedule(provider, {"action": "hang"})  # type: ignore[arg-type]
    started = time.monotonic()
    err = await expect_error(
        adapter_for(emulator, provider), any_client, make_call(provider), ProviderTimeoutError, timeout_s=0.3
    )
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2.0
    assert "0.3 s" in str(err)
    (record,) = await emulator.wait_for_calls(1, provider, finished=True)  # type: ignore[arg-type]
    assert record.outcome == "hang" and record.status is None


async def test_short_hang_answers_late(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.faults.schedule("anthropic", {"action": "hang", "hang_s": 0.2})
    started = time.monotonic()
    result = await adapter_for(emulator, "anthropic").complete(client, make_call("anthropic"), TIMEOUT_S)
    assert time.monotonic() - started >= 0.2
    assert result.content
    (record,) = emulator.calls("anthropic")
    assert record.status == 200


async def test_connection_refused_is_timeout(any_client: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapter = build_adapter("openai", base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
    with pytest.raises(ProviderTimeoutError) as info:
        await adapter.complete(any_client, make_call("openai"), TIMEOUT_S)
    assert "could not connect" in str(info.value)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("action", ["malformed_json", "empty_content"])
async def test_bad_200_is_server_error(
    emulator: EmulatorServer, client: httpx.AsyncClient, provider: str, action: str
) -> None:
    emulator.faults.schedule(provider, {"action": action})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, provider), client, make_call(provider), ProviderServerError)
    assert err.status_code == 200
    assert "malformed response" in str(err)


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("rate_limit", RateLimitError),
        ("authentication", AuthenticationError),
        ("not_found", ModelNotFoundError),
        ("timeout", ProviderTimeoutError),
        ("context_length", ContextLengthExceededError),
        ("server", ProviderServerError),
    ],
)
async def test_cloudflare_success_false_in_200(
    emulator: EmulatorServer, client: httpx.AsyncClient, kind: str, cls: type[AIProviderError]
) -> None:
    emulator.faults.schedule("cloudflare", {"status": 200, "kind": kind})  # type: ignore[arg-type]
    err = await expect_error(adapter_for(emulator, "cloudflare"), client, make_call("cloudflare"), cls)
    assert err.status_code == 200


# --- secrecy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_api_key_never_in_errors(emulator: EmulatorServer, client: httpx.AsyncClient, provider: str) -> None:
    steps: list[dict[str, Any]] = [
        {"status": 401},  # OpenAI echoes a masked key in this one
        {"status": 400, "message": f"bad credentials {KEY} for this call"},
        {"status": 500, "message": f"Authorization: Bearer {KEY}"},
        {"status": 200, "kind": "authentication", "message": f"token {KEY[:-1]}"},
        {"action": "malformed_json"},
        {"action": "reset"},
        {"action": "hang"},
    ]
    emulator.faults.schedule(provider, *steps)  # type: ignore[arg-type]
    adapter = adapter_for(emulator, provider)
    errors: list[AIProviderError] = []
    for _ in steps:
        with pytest.raises(AIProviderError) as info:
            await adapter.complete(client, make_call(provider), 0.5)
        errors.append(info.value)
    assert len(errors) == len(steps)
    for err in errors:
        for text in (str(err), repr(err), err.message):
            assert KEY not in text
            assert KEY[:8] not in text  # not even the masked prefix OpenAI shows
            assert KEY[-4:] + "." not in text


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_calls_with_hold(emulator: EmulatorServer, client: httpx.AsyncClient) -> None:
    emulator.hold(3, provider="openai")
    adapter = adapter_for(emulator, "openai")
    tasks = [asyncio.create_task(adapter.complete(client, make_call("openai", f"q{i}"), TIMEOUT_S)) for i in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=TIMEOUT_S)
    assert [r.content for r in results] == [reply_text("openai", "gpt-4o-mini", f"q{i}", 200)[0] for i in range(3)]
    records = emulator.calls("openai")
    assert len(records) == 3 and all(r.held for r in records)
    # all three were in the emulator at once: each arrived before any finished
    assert max(r.arrived_at for r in records) <= min(r.finished_at or 0 for r in records)
