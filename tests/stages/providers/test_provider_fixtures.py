"""Adapters' parse functions and the classifier on bodies shaped like the API references (./fixtures)."""

from __future__ import annotations

import email.utils
from pathlib import Path

import httpx
import msgspec
import pytest

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
from stages.providers import anthropic as anthropic_mod
from stages.providers import cloudflare as cloudflare_mod
from stages.providers import openai as openai_mod
from stages.providers.base import ProviderCall
from stages.providers.classify import (
    classify_response,
    classify_transport_error,
    extract_error_detail,
    parse_retry_after,
    redact,
)
from stages.rules.tokens import estimate_messages_tokens, estimate_tokens

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def make_call(model: str, *messages: tuple[str, str], max_tokens: int = 100, **kwargs: object) -> ProviderCall:
    msgs = [Message(role=r, content=c) for r, c in messages] or [Message(role="user", content="hi")]  # type: ignore[arg-type]
    return ProviderCall(model=model, messages=msgs, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


# --- success bodies ------------------------------------------------------------------------


def test_openai_chat_completion_fixture() -> None:
    result = openai_mod.parse_response(fixture("openai_chat_completion.json"), make_call("gpt-4o"), request_id="req_1")
    assert result.content == "Kafka keeps an ordered log per partition."
    assert result.model == "gpt-4o-2024-08-06"
    assert result.finish_reason == "stop"
    assert result.request_id == "req_1"
    assert result.usage.prompt_tokens == 1117  # includes the cached ones
    assert result.usage.completion_tokens == 46
    assert result.usage.total_tokens == 1163
    assert result.usage.cached_prompt_tokens == 1024
    assert result.usage.cache_creation_prompt_tokens == 0


def test_openai_content_filter_finish_reason_is_content_filter_error() -> None:
    with pytest.raises(ContentFilterError) as info:
        openai_mod.parse_response(fixture("openai_chat_completion_content_filter.json"), make_call("gpt-4o-mini"))
    assert info.value.provider == "openai"
    assert info.value.status_code == 200


def test_anthropic_message_fixture() -> None:
    result = anthropic_mod.parse_response(fixture("anthropic_message.json"), make_call("claude-sonnet-4-20250514"))
    assert result.content == "A consumer group shares the partitions of a topic."
    assert result.model == "claude-sonnet-4-20250514"
    assert result.finish_reason == "stop"  # end_turn in OpenAI's words
    # prompt_tokens = input + cache reads + cache writes
    assert result.usage.prompt_tokens == 21 + 1800 + 188
    assert result.usage.cached_prompt_tokens == 1800
    assert result.usage.cache_creation_prompt_tokens == 188
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == 21 + 1800 + 188 + 12


def test_anthropic_refusal_is_content_filter_error() -> None:
    with pytest.raises(ContentFilterError):
        anthropic_mod.parse_response(fixture("anthropic_message_refusal.json"), make_call("claude-sonnet-4-5"))


def test_cloudflare_run_fixture_with_usage() -> None:
    call = make_call("@cf/meta/llama-3.1-8b-instruct", ("user", "What is a partition?"))
    result = cloudflare_mod.parse_response(fixture("cloudflare_run_success.json"), call, request_id="8f00-SJC")
    assert result.content == "Partitions let a topic scale across brokers."
    assert result.model == "@cf/meta/llama-3.1-8b-instruct"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (41, 11, 52)
    assert result.request_id == "8f00-SJC"


def test_cloudflare_run_fixture_without_usage_is_estimated() -> None:
    call = make_call("@cf/meta/llama-3.2-3b-instruct", ("system", "Be brief."), ("user", "What is an offset?"))
    result = cloudflare_mod.parse_response(fixture("cloudflare_run_no_usage.json"), call)
    text = "Offsets mark how far a consumer has read."
    assert result.content == text
    assert result.usage.prompt_tokens == estimate_messages_tokens(call.messages)
    assert result.usage.completion_tokens == estimate_tokens(text)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("cloudflare_error_auth.json", AuthenticationError),
        ("cloudflare_error_no_such_model.json", ModelNotFoundError),
        ("cloudflare_error_capacity.json", RateLimitError),
    ],
)
def test_cloudflare_success_false_in_200_is_classified(name: str, cls: type[AIProviderError]) -> None:
    with pytest.raises(cls) as info:
        cloudflare_mod.parse_response(fixture(name), make_call("@cf/meta/llama-3.1-8b-instruct"))
    assert info.value.provider == "cloudflare"
    assert info.value.status_code == 200


@pytest.mark.parametrize(
    ("parse", "body"),
    [
        (openai_mod.parse_response, b'{"id": "chatcmpl-1", "choices": ['),
        (openai_mod.parse_response, b'{"model": "gpt-4o", "choices": []}'),
        (openai_mod.parse_response, b'{"model": "gpt-4o", "choices": [{"message": {"content": ""}}], "usage": {}}'),
        (
            openai_mod.parse_response,
            b'{"model": "m", "choices": [{"message": {"content": "x"}}], '
            b'"usage": {"prompt_tokens": -1, "completion_tokens": 1}}',
        ),
        (anthropic_mod.parse_response, b"not json"),
        (anthropic_mod.parse_response, b'{"type": "message", "model": "m", "content": [], "usage": {}}'),
        (
            anthropic_mod.parse_response,
            b'{"type": "message", "model": "m", "content": [], "usage": {"input_tokens": 1, "output_tokens": 0}}',
        ),
        (cloudflare_mod.parse_response, b'{"success": true, "result": {}}'),
        (cloudflare_mod.parse_response, b'{"success": true, "result": {"response": "  "}}'),
        (cloudflare_mod.parse_response, b"[]"),
    ],
)
def test_malformed_or_empty_200_is_server_error(parse: object, body: bytes) -> None:
    with pytest.raises(ProviderServerError) as info:
        parse(body, make_call("m"))  # type: ignore[operator]
    assert info.value.status_code == 200
    assert info.value.retryable


# --- error bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "status", "name", "cls"),
    [
        ("openai", 400, "openai_error_context_length.json", ContextLengthExceededError),
        ("openai", 401, "openai_error_invalid_api_key.json", AuthenticationError),
        ("openai", 404, "openai_error_model_not_found.json", ModelNotFoundError),
        ("openai", 429, "openai_error_rate_limit.json", RateLimitError),
        ("openai", 400, "openai_error_content_policy.json", ContentFilterError),
        ("openai", 500, "openai_error_server.json", ProviderServerError),
        ("anthropic", 529, "anthropic_error_overloaded.json", ProviderServerError),
        ("anthropic", 400, "anthropic_error_prompt_too_long.json", ContextLengthExceededError),
        ("anthropic", 404, "anthropic_error_not_found.json", ModelNotFoundError),
        ("anthropic", 400, "anthropic_error_content_filter.json", ContentFilterError),
        ("cloudflare", 401, "cloudflare_error_auth.json", AuthenticationError),
        ("cloudflare", 400, "cloudflare_error_no_such_model.json", ModelNotFoundError),
        ("cloudflare", 429, "cloudflare_error_capacity.json", RateLimitError),
    ],
)
def test_error_fixtures_classify(provider: str, status: int, name: str, cls: type[AIProviderError]) -> None:
    err = classify_response(provider, status, {"x-request-id": "req_abc"}, fixture(name))
    assert type(err) is cls
    assert err.provider == provider
    assert err.status_code == status
    assert str(err).startswith(f"{provider} HTTP {status}")


def test_openai_401_masked_key_is_redacted() -> None:
    err = classify_response("openai", 401, {}, fixture("openai_error_invalid_api_key.json"))
    assert "sk-proj" not in str(err)
    assert "WXYZ" not in str(err)
    assert "[redacted]" in str(err)


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 8192 tokens",
        "prompt is too long: 5 tokens > 4 maximum",
        "input length and `max_tokens` exceed context limit: 197000 + 8192 > 200000",
        "AiError: The estimated number of input and maximum output tokens (9000) exceeded this model context "
        "window limit (7968).",
        "Request exceeds the context window of this model",
    ],
)
def test_context_overflow_wordings(message: str) -> None:
    body = msgspec.json.encode({"error": {"message": message, "type": "invalid_request_error"}})
    assert isinstance(classify_response("openai", 400, {}, body), ContextLengthExceededError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, ModelNotFoundError),
        (408, ProviderTimeoutError),
        (413, InvalidRequestError),
        (422, InvalidRequestError),
        (429, RateLimitError),
        (500, ProviderServerError),
        (502, ProviderServerError),
        (503, ProviderServerError),
        (504, ProviderServerError),
        (529, ProviderServerError),
    ],
)
def test_status_table(status: int, cls: type[AIProviderError]) -> None:
    err = classify_response("anthropic", status, {}, b"<html>oops</html>")
    assert type(err) is cls
    assert err.status_code == status


def test_extract_error_detail_shapes() -> None:
    assert extract_error_detail(b'{"error": {"message": "m", "type": "t", "code": "c"}}').code == "c"
    assert extract_error_detail(b'{"type": "error", "error": {"type": "t", "message": "m"}}').type == "t"
    cf = extract_error_detail(
        b'{"success": false, "errors": [{"code": 5007, "message": "a"}, {"code": 1, "message": "b"}]}'
    )
    assert cf.codes == ("5007", "1")
    assert cf.message == "a; b"
    assert extract_error_detail(b"plain text").message == "plain text"
    assert extract_error_detail(b"").message == ""


# --- Retry-After -------------------------------------------------------------------------------


def test_retry_after_delta_seconds() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now_s=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now_s=now) == 0.0


def test_retry_after_ms_wins() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after(httpx.Headers({"Retry-After-Ms": "250"})) == 0.25


@pytest.mark.parametrize("value", ["soon", "-3", "nan", ""])
def test_retry_after_invalid(value: str) -> None:
    assert parse_retry_after({"Retry-After": value}) is None


def test_classified_error_carries_retry_after() -> None:
    err = classify_response("openai", 429, {"retry-after": "3"}, fixture("openai_error_rate_limit.json"))
    assert isinstance(err, RateLimitError)
    assert err.retry_after_s == 3.0
    err = classify_response("anthropic", 529, {"retry-after": "2"}, fixture("anthropic_error_overloaded.json"))
    assert isinstance(err, ProviderServerError)
    assert err.retry_after_s == 2.0


# --- redaction and transport errors -------------------------------------------------------------


def test_redact_removes_secret_and_key_shapes() -> None:
    secret = "cf-token-ABCDEFGHIJKLMNOP"
    text = redact(f"token {secret} Bearer abc.def sk-live-123456 x-api-key: zzz9 abcd********wxyz", [secret, None])
    assert secret not in text
    assert "abc.def" not in text
    assert "sk-live" not in text
    assert "zzz9" not in text
    assert "****" not in text


def test_transport_error_mapping() -> None:
    req = httpx.Request("POST", "http://x")
    assert isinstance(
        classify_transport_error("p", httpx.ReadTimeout("t", request=req), timeout_s=1), ProviderTimeoutError
    )
    assert isinstance(
        classify_transport_error("p", httpx.ConnectError("c", request=req), timeout_s=1), ProviderTimeoutError
    )
    assert isinstance(
        classify_transport_error("p", httpx.ReadError("r", request=req), timeout_s=1), ProviderServerError
    )
    dropped = httpx.RemoteProtocolError("Server disconnected without sending a response.", request=req)
    assert isinstance(classify_transport_error("p", dropped, timeout_s=1), ProviderServerError)
    # httpx-aiohttp reports a reset as ConnectTimeout caused by the aiohttp error: the cause decides.
    wrapped = httpx.ConnectTimeout("reset")
    wrapped.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert isinstance(classify_transport_error("p", wrapped, timeout_s=1), ProviderServerError)
    refused = httpx.ConnectTimeout("refused")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert isinstance(classify_transport_error("p", refused, timeout_s=1), ProviderTimeoutError)


# --- request mapping (no I/O) ----------------------------------------------------------------------


def test_anthropic_payload_mapping() -> None:
    call = make_call(
        "claude-3-5-haiku-20241022",
        ("system", "Rule one."),
        ("assistant", "Earlier answer."),
        ("user", "First."),
        ("user", "Second."),
        ("system", "Rule two."),
        ("user", "   "),
        ("assistant", "Prefill "),
        stop=["END"],
        user="u-1",
        temperature=1.5,
    )
    payload = anthropic_mod.build_payload(call)
    assert payload["system"] == "Rule one.\n\nRule two."
    assert payload["messages"] == [
        {"role": "user", "content": anthropic_mod.LEADING_USER_TURN},
        {"role": "assistant", "content": "Earlier answer."},
        {"role": "user", "content": "First.\n\nSecond."},
        {"role": "assistant", "content": "Prefill"},
    ]
    assert payload["max_tokens"] == 100
    assert payload["temperature"] == 1.0  # clamped to the API's 0..1
    assert payload["stop_sequences"] == ["END"]
    assert payload["metadata"] == {"user_id": "u-1"}


def test_anthropic_top_p_with_default_temperature_sends_only_top_p() -> None:
    payload = anthropic_mod.build_payload(make_call("claude-3-5-haiku-20241022", temperature=1.0, top_p=0.9))
    assert "temperature" not in payload
    assert payload["top_p"] == 0.9
    payload = anthropic_mod.build_payload(make_call("claude-3-5-haiku-20241022", temperature=0.2, top_p=0.9))
    assert (payload["temperature"], payload["top_p"]) == (0.2, 0.9)


def test_anthropic_payload_without_turns_is_invalid() -> None:
    with pytest.raises(InvalidRequestError):
        anthropic_mod.build_payload(make_call("claude-3-5-haiku-20241022", ("system", "only system"), ("user", "")))


def test_openai_and_cloudflare_payload_mapping() -> None:
    call = make_call("gpt-4o", ("user", "hi"), temperature=0.3, top_p=0.5, stop=["x"], user="u")
    payload = openai_mod.build_payload(call)
    assert payload == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.5,
        "stop": ["x"],
        "user": "u",
    }
    payload = cloudflare_mod.build_payload(call)
    assert payload == {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.5,
    }
