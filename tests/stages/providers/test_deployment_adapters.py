"""One adapter per wire format, one instance per deployment: Azure OpenAI and OpenAI-compatible servers (DESIGN A10).

Judged against the emulator's deployment paths (``/d/<name>``) and, for the
wire format itself, the official ``openai`` SDK's ``AzureOpenAI`` client.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msgspec
import openai
import pytest

from pipeline.emulator import EmulatorServer
from pipeline.errors import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderServerError,
)
from schemas.request import Message
from stages.providers import ProviderCall, build_adapter
from stages.providers.openai import build_payload, parse_response

KEY = "az-test-SECRETKEY-0123456789abcdef"
CALL = ProviderCall(
    model="gpt-4o-mini", messages=[Message(role="user", content="Which river is longest?")], max_tokens=64, user="u1"
)


@pytest.fixture(autouse=True)
def _fresh(emulator: EmulatorServer) -> Iterator[None]:
    emulator.reset()
    yield
    emulator.reset()


def azure(emu: EmulatorServer, *, key: str | None = KEY, version: str | None = "2024-10-21") -> object:
    return build_adapter(
        "azure-eu",
        base_url=f"{emu.url}/d/azure-eu",
        api_key=key,
        kind="azure_openai",
        api_version=version,
        azure_deployments={"gpt-4o-mini": "mini-eu.1"},
    )


def compatible(emu: EmulatorServer, name: str = "local") -> object:
    return build_adapter(name, base_url=f"{emu.url}/d/{name}/v1", api_key=KEY, kind="openai_compatible")


async def test_azure_calls_the_deployment_url_with_api_version_and_the_api_key_header(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    adapter = azure(emulator)
    assert adapter.url_for("gpt-4o-mini").endswith(  # type: ignore[attr-defined]
        "/d/azure-eu/openai/deployments/mini-eu.1/chat/completions?api-version=2024-10-21"
    )
    result = await adapter.complete(client, CALL, 5.0)  # type: ignore[attr-defined]
    assert result.content and result.model == "gpt-4o-mini" and result.usage.total_tokens > 0
    [call] = emulator.calls("azure-eu")
    assert call.path == "/d/azure-eu/openai/deployments/mini-eu.1/chat/completions"
    assert emulator.counts()["azure-eu"] == 1 and emulator.counts()["openai"] == 0
    # the emulator takes only the api-key header, as Azure's key authentication does
    url = adapter.url_for("gpt-4o-mini")  # type: ignore[attr-defined]
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post(url, json=body, headers={"authorization": f"Bearer {KEY}"})).status_code == 401
    assert (await client.post(url, json=body, headers={"api-key": KEY})).status_code == 200
    no_version = url.split("?")[0]
    assert (await client.post(no_version, json=body, headers={"api-key": KEY})).status_code == 404
    with pytest.raises(AuthenticationError) as caught:
        await azure(emulator, key=None).complete(client, CALL, 5.0)  # type: ignore[attr-defined]
    assert caught.value.provider == "azure-eu"


async def test_azure_prompt_filter_is_content_filter_and_names_the_deployment(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    emulator.faults.schedule("azure-eu", {"kind": "content_filter", "status": 400})
    with pytest.raises(ContentFilterError) as caught:
        await azure(emulator).complete(client, CALL, 5.0)  # type: ignore[attr-defined]
    assert caught.value.provider == "azure-eu" and caught.value.status_code == 400
    assert "content management policy" in str(caught.value)


def test_azure_filtered_answer_is_content_filter() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "finish_reason": "content_filter",
                "message": {"role": "assistant", "content": None},
                "content_filter_results": {"violence": {"filtered": True, "severity": "medium"}},
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12},
    }
    with pytest.raises(ContentFilterError, match="azure-eu HTTP 200"):
        parse_response(msgspec.json.encode(body), CALL, provider="azure-eu")


def test_azure_without_api_version_is_refused_at_build() -> None:
    with pytest.raises(ValueError, match="api_version"):
        build_adapter("azure-eu", base_url="https://x.openai.azure.com", api_key=KEY, kind="azure_openai")


async def test_the_official_azure_sdk_talks_to_the_emulators_azure_path(emulator: EmulatorServer) -> None:
    sdk = openai.AsyncAzureOpenAI(
        api_key=KEY, api_version="2024-10-21", azure_endpoint=f"{emulator.url}/d/azure-sdk", max_retries=0
    )
    async with sdk:
        completion = await sdk.chat.completions.create(
            model="my-deployment", messages=[{"role": "user", "content": "hello"}], max_tokens=16
        )
    assert completion.choices[0].message.content and completion.usage is not None
    assert emulator.calls("azure-sdk")[0].path == "/d/azure-sdk/openai/deployments/my-deployment/chat/completions"


def test_openai_compatible_sends_only_the_fields_every_server_accepts() -> None:
    compat = build_payload(CALL, flavor="openai_compatible")
    assert compat == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Which river is longest?"}],
        "max_tokens": 64,
    }
    official = build_payload(CALL, flavor="openai")
    assert official["max_completion_tokens"] == 64 and "max_tokens" not in official and official["user"] == "u1"
    assert build_payload(CALL, flavor="azure_openai")["max_tokens"] == 64
    assert build_payload(CALL, flavor="azure_openai", max_tokens_field="max_completion_tokens")[
        "max_completion_tokens"
    ] == 64


async def test_an_answer_without_usage_is_counted_and_flagged(
    emulator: EmulatorServer, client: httpx.AsyncClient
) -> None:
    emulator.faults.set("local", {"omit_usage": True})
    result = await compatible(emulator).complete(client, CALL, 5.0)  # type: ignore[attr-defined]
    assert result.usage_estimated and result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    emulator.faults.set("local", None)
    with_usage = await compatible(emulator).complete(client, CALL, 5.0)  # type: ignore[attr-defined]
    assert not with_usage.usage_estimated


def test_deepseek_cache_hits_count_as_cached_prompt_tokens() -> None:
    body = {
        "model": "deepseek-chat",
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105, "prompt_cache_hit_tokens": 64},
    }
    result = parse_response(msgspec.json.encode(body), CALL, provider="deepseek", usage_optional=True)
    assert result.usage.cached_prompt_tokens == 64 and not result.usage_estimated


@pytest.mark.parametrize("shape", ["vllm", "plain"])
@pytest.mark.parametrize(
    ("step", "error"),
    [
        ({"status": 404, "kind": "not_found"}, ModelNotFoundError),
        ({"status": 400, "kind": "context_length"}, ContextLengthExceededError),
        ({"status": 422, "kind": "invalid_request"}, InvalidRequestError),
        ({"status": 401, "kind": "authentication"}, AuthenticationError),
        ({"status": 503}, ProviderServerError),
    ],
)
async def test_error_bodies_that_are_not_openais_are_classified_from_the_status(
    emulator: EmulatorServer, client: httpx.AsyncClient, shape: str, step: dict[str, object], error: type[Exception]
) -> None:
    emulator.faults.set("vllm-box", {"error_body": shape, "schedule": [step]})
    with pytest.raises(error) as caught:
        await compatible(emulator, "vllm-box").complete(client, CALL, 5.0)  # type: ignore[attr-defined]
    assert getattr(caught.value, "provider", None) == "vllm-box"
