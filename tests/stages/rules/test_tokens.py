"""Token estimate, model catalog and the public face of ``stages.providers``."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import stages.providers as providers
from schemas.request import Message
from stages.providers import (
    AnthropicAdapter,
    CloudflareAdapter,
    ModelInfo,
    OpenAIAdapter,
    build_adapter,
    estimate_messages_tokens,
    estimate_tokens,
    known_models,
    model_info,
)
from stages.rules.tokens import MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("x" * 400, 100),
        ("你好世界", 4),  # CJK: one token per character
        ("éééé", 2),  # other non-ASCII: half a token per character
        ("ab你", 2),  # 2 * 0.25 + 1 = 1.5 -> 2
    ],
)
def test_estimate_tokens(text: str, expected: int) -> None:
    assert estimate_tokens(text) == expected


def test_estimate_is_monotonic_in_length() -> None:
    counts = [estimate_tokens("word " * n) for n in range(50)]
    assert counts == sorted(counts)


def test_estimate_messages_tokens_rule() -> None:
    messages = [Message(role="system", content="x" * 8), Message(role="user", content="y" * 12)]
    expected = (2 + MESSAGE_OVERHEAD_TOKENS) + (3 + MESSAGE_OVERHEAD_TOKENS) + REPLY_PRIMING_TOKENS
    assert estimate_messages_tokens(messages) == expected == 16
    as_dicts: list[dict[str, Any]] = [
        {"role": "system", "content": "x" * 8},
        {"role": "user", "content": [{"type": "text", "text": "y" * 12}]},
    ]
    assert estimate_messages_tokens(as_dicts) == expected
    assert estimate_messages_tokens([]) == 0


@pytest.mark.parametrize(
    ("provider", "model", "window", "max_out"),
    [
        ("openai", "gpt-4o", 128_000, 16_384),
        ("openai", "gpt-4o-mini", 128_000, 16_384),
        ("openai", "gpt-4.1", 1_047_576, 32_768),
        ("openai", "gpt-4.1-mini", 1_047_576, 32_768),
        ("openai", "gpt-4.1-nano", 1_047_576, 32_768),
        ("openai", "gpt-3.5-turbo", 16_385, 4_096),
        ("anthropic", "claude-3-5-haiku-20241022", 200_000, 8_192),
        ("anthropic", "claude-3-haiku-20240307", 200_000, 4_096),
        ("anthropic", "claude-3-5-sonnet-20241022", 200_000, 8_192),
        ("anthropic", "claude-sonnet-4-20250514", 200_000, 64_000),
        ("anthropic", "claude-haiku-4-5", 200_000, 64_000),
        ("anthropic", "claude-haiku-4-5-20251001", 200_000, 64_000),
        ("anthropic", "claude-opus-4-1", 200_000, 32_000),
        ("anthropic", "claude-opus-4-1-20250805", 200_000, 32_000),
        ("cloudflare", "@cf/meta/llama-3.1-8b-instruct", 7_968, 7_968),
        ("cloudflare", "@cf/meta/llama-3.1-8b-instruct-fp8", 32_000, 32_000),
        ("cloudflare", "@cf/meta/llama-3.1-8b-instruct-fast", 128_000, 128_000),
        ("cloudflare", "@cf/meta/llama-3.2-3b-instruct", 128_000, 128_000),
        ("cloudflare", "@cf/meta/llama-3.3-70b-instruct-fp8-fast", 24_000, 24_000),
        ("cloudflare", "@cf/mistral/mistral-7b-instruct-v0.1", 2_824, 2_824),
    ],
)
def test_catalog_limits(provider: str, model: str, window: int, max_out: int) -> None:
    info = model_info(provider, model)
    assert info is not None
    assert (info.provider, info.model, info.context_window, info.max_output_tokens) == (
        provider,
        model,
        window,
        max_out,
    )
    assert info.source.startswith("https://")
    assert model in known_models(provider)


def test_catalog_unknowns_and_immutability() -> None:
    assert model_info("openai", "gpt-9") is None
    assert model_info("nobody", "gpt-4o") is None
    assert known_models("nobody") == []
    assert known_models("openai") == sorted(known_models("openai"))
    info = model_info("openai", "gpt-4o")
    assert isinstance(info, ModelInfo)
    with pytest.raises(AttributeError):
        info.context_window = 1  # type: ignore[misc]
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**msgspec.to_builtins(info), "context_window": 0}, ModelInfo)


def test_build_adapter() -> None:
    a = build_adapter("openai", base_url="http://h/v1/", api_key="k")
    assert isinstance(a, OpenAIAdapter)
    assert a.name == "openai"
    assert a.url == "http://h/v1/chat/completions"
    b = build_adapter("anthropic", base_url="http://h", api_key="k")
    assert isinstance(b, AnthropicAdapter)
    assert b.url == "http://h/v1/messages"
    c = build_adapter("cloudflare", base_url="http://h/client/v4", api_key="k", account_id="acc")
    assert isinstance(c, CloudflareAdapter)
    assert (
        c.url_for("@cf/meta/llama-3.1-8b-instruct")
        == "http://h/client/v4/accounts/acc/ai/run/@cf/meta/llama-3.1-8b-instruct"
    )
    with pytest.raises(ValueError, match="unknown provider"):
        build_adapter("gemini", base_url="x", api_key=None)


def test_adapter_repr_hides_key() -> None:
    secret = "sk-very-secret-value-123"
    for adapter in (
        OpenAIAdapter("http://h/v1", secret),
        AnthropicAdapter("http://h", secret),
        CloudflareAdapter("http://h", secret, "acc"),
    ):
        assert secret not in repr(adapter)
        assert secret not in str(adapter)


def test_exported_members() -> None:
    expected = {
        "PROVIDER_NAMES",
        "AnthropicAdapter",
        "CloudflareAdapter",
        "ModelInfo",
        "OpenAIAdapter",
        "ProviderAdapter",
        "ProviderCall",
        "ProviderResult",
        "build_adapter",
        "catalog_providers",
        "classify_response",
        "classify_transport_error",
        "estimate_messages_tokens",
        "estimate_tokens",
        "known_models",
        "model_info",
        "parse_retry_after",
        "redact",
    }
    assert set(providers.__all__) == expected
    for name in providers.__all__:
        assert getattr(providers, name) is not None, name
