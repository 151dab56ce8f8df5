"""The official openai and anthropic SDKs against the emulator, and the emulator's own controls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anthropic
import httpx
import msgspec
import openai
import pytest
import pytest_asyncio

from pipeline.emulator import (
    EmulatorServer,
    FaultProfile,
    FaultStep,
    emulator_env,
    load_profile,
    parse_profile,
    prompt_tokens,
    reply_text,
    text_tokens,
)

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"
CF_MODEL = "@cf/meta/llama-3.1-8b-instruct"
KEY = "sk-test-emulator-key-000111222333"


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


def test_emulator_env() -> None:
    assert emulator_env("http://127.0.0.1:8900/") == {
        "OPENAI_BASE_URL": "http://127.0.0.1:8900/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8900",
        "CLOUDFLARE_BASE_URL": "http://127.0.0.1:8900/client/v4",
    }


# --- OpenAI SDK -------------------------------------------------------------------------------


async def test_openai_sdk_success(oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(
        model=OPENAI_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Kafka?"}],
        max_tokens=100,
        temperature=0.2,
    )
    completion = raw.parse()
    text, _ = reply_text("openai", OPENAI_MODEL, "What is Kafka?", 100)
    assert completion.choices[0].message.content == text
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == OPENAI_MODEL
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens(["Be brief.", "What is Kafka?"])
    assert completion.usage.completion_tokens == text_tokens(text)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion._request_id is not None and completion._request_id.startswith("req_")
    assert raw.headers["x-ratelimit-remaining-requests"].isdigit()
    assert raw.headers["x-ratelimit-limit-tokens"] == "2000000"


async def test_openai_sdk_models(oai: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in oai.models.list()]
    assert OPENAI_MODEL in ids and "gpt-4.1" in ids


async def test_openai_sdk_401(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    emulator.faults.schedule("openai", {"status": 401})
    with pytest.raises(openai.AuthenticationError) as info:
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert KEY not in str(info.value.body)  # masked like the real API: first 8 and last 4 characters
    assert "sk-test-" in str(info.value.body)


async def test_openai_sdk_missing_key_is_401(emulator: EmulatorServer) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            emulator.env["OPENAI_BASE_URL"] + "/chat/completions",
            json={"model": OPENAI_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "x-request-id" in response.headers


async def test_openai_sdk_404_unknown_model(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    assert "`gpt-9` does not exist" in info.value.message


async def test_openai_sdk_429_retry_after(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    emulator.faults.schedule("openai", {"status": 429, "retry_after_s": 3})
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "rate_limit_exceeded"


async def test_openai_sdk_500(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    emulator.faults.schedule("openai", {"status": 500})
    with pytest.raises(openai.InternalServerError) as info:
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 500


async def test_openai_sdk_400_context_length(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    emulator.faults.schedule("openai", {"kind": "context_length"})
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "context_length_exceeded"


# --- Anthropic SDK ---------------------------------------------------------------------------


async def test_anthropic_sdk_success(claude: anthropic.AsyncAnthropic) -> None:
    raw = await claude.messages.with_raw_response.create(
        model=ANTHROPIC_MODEL,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "What is Kafka?"}],
    )
    message = await raw.parse()
    text, _ = reply_text("anthropic", ANTHROPIC_MODEL, "What is Kafka?", 100)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == prompt_tokens(["Be brief.", "What is Kafka?"])
    assert message.usage.output_tokens == text_tokens(text)
    assert message.usage.cache_read_input_tokens == 0
    assert message._request_id is not None and message._request_id.startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "10000"
    assert raw.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")


async def test_anthropic_sdk_models(claude: anthropic.AsyncAnthropic) -> None:
    ids = [m.id async for m in claude.models.list()]
    assert ANTHROPIC_MODEL in ids


async def test_anthropic_sdk_401(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    emulator.faults.schedule("anthropic", {"status": 401})
    with pytest.raises(anthropic.AuthenticationError) as info:
        await claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401


async def test_anthropic_sdk_404_unknown_model(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        await claude.messages.create(model="claude-9", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model: claude-9"},
        "request_id": info.value.request_id,
    }


async def test_anthropic_sdk_429_retry_after(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    emulator.faults.schedule("anthropic", {"status": 429, "retry_after_s": 7})
    with pytest.raises(anthropic.RateLimitError) as info:
        await claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.headers["retry-after"] == "7"


async def test_anthropic_sdk_500(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    emulator.faults.schedule("anthropic", {"status": 500})
    with pytest.raises(anthropic.InternalServerError) as info:
        await claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 500


async def test_anthropic_sdk_529_overloaded(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    emulator.faults.schedule("anthropic", {"kind": "overloaded"})
    with pytest.raises(anthropic.InternalServerError) as info:
        await claude.messages.create(model=ANTHROPIC_MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529
    overloaded = getattr(anthropic, "OverloadedError", None)
    if overloaded is not None:
        assert isinstance(info.value, overloaded)


async def test_anthropic_validation_like_the_api(emulator: EmulatorServer, http: httpx.AsyncClient) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    missing_max = await http.post(
        "/v1/messages",
        headers=headers,
        json={"model": ANTHROPIC_MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert missing_max.status_code == 400
    assert missing_max.json()["error"] == {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    assert missing_max.headers["request-id"].startswith("req_")
    first_assistant = await http.post(
        "/v1/messages",
        headers=headers,
        json={"model": ANTHROPIC_MODEL, "max_tokens": 5, "messages": [{"role": "assistant", "content": "hi"}]},
    )
    assert first_assistant.status_code == 400
    no_key = await http.post(
        "/v1/messages",
        headers={"anthropic-version": "2023-06-01", "x-api-key": ""},
        json={"model": ANTHROPIC_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    assert [c.status for c in emulator.calls("anthropic")] == [400, 400, 401]


async def test_cloudflare_wire_format(http: httpx.AsyncClient) -> None:
    response = await http.post(
        f"/client/v4/accounts/acc/ai/run/{CF_MODEL}",
        headers={"authorization": "Bearer tok"},
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64},
    )
    body = response.json()
    assert response.status_code == 200
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    assert body["result"]["response"] == reply_text("cloudflare", CF_MODEL, "hi", 64)[0]
    assert body["result"]["usage"]["prompt_tokens"] == prompt_tokens(["hi"])
    assert response.headers["cf-ray"].endswith("-EMU")
    unauthorized = await http.post(f"/client/v4/accounts/acc/ai/run/{CF_MODEL}", json={"prompt": "hi"})
    assert unauthorized.status_code == 401
    assert unauthorized.json() == {
        "result": None,
        "success": False,
        "errors": [{"code": 10000, "message": "Authentication error"}],
        "messages": [],
    }


# --- controls: Python -------------------------------------------------------------------------


async def test_hold_makes_sdk_calls_concurrent(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    emulator.hold(4)
    tasks = [
        asyncio.create_task(
            oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": str(i)}])
        )
        for i in range(3)
    ]
    held = await emulator.wait_for_calls(3, "openai", timeout_s=5)
    assert all(c.held and c.outcome == "pending" for c in held)
    assert not any(t.done() for t in tasks)
    assert emulator.state.holding() == 3
    assert emulator.release() == 3
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert [r.choices[0].message.content for r in results] == [
        reply_text("openai", OPENAI_MODEL, str(i), 16_384)[0] for i in range(3)
    ]


async def test_hold_released_by_nth_call(emulator: EmulatorServer, claude: anthropic.AsyncAnthropic) -> None:
    emulator.hold(2, provider="anthropic")

    async def ask() -> str:
        m = await claude.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
        return m.content[0].text  # type: ignore[union-attr]

    first = asyncio.create_task(ask())
    await emulator.wait_for_calls(1, "anthropic", timeout_s=5)
    assert not first.done()
    second = await asyncio.wait_for(ask(), timeout=5)
    assert await asyncio.wait_for(first, timeout=5) == second


async def test_wait_for_calls_times_out(emulator: EmulatorServer) -> None:
    with pytest.raises(TimeoutError, match="0 of 1 calls to cloudflare"):
        await emulator.wait_for_calls(1, "cloudflare", timeout_s=0.05)


async def test_fixed_latency_lower_bound(emulator: EmulatorServer, oai: openai.AsyncOpenAI) -> None:
    emulator.faults.set("openai", {"latency": {"dist": "fixed", "ms": 150}})
    started = time.monotonic()
    await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - started >= 0.15


def test_seeded_probabilities_are_reproducible() -> None:
    from pipeline.emulator import FaultController

    profile = {"seed": 42, "providers": {"openai": {"probabilities": {"500": 0.3, "429": 0.2, "hang": 0.1}}}}
    runs = []
    for _ in range(2):
        faults = FaultController(profile)
        runs.append([(s.resolved_action(), s.status) for s in (faults.next_step("openai", "m") for _ in range(200))])
    assert runs[0] == runs[1]
    statuses = [s for _, s in runs[0]]
    assert 40 <= statuses.count(500) <= 80  # ~60 expected
    assert 20 <= statuses.count(429) <= 60  # ~40 expected
    assert 5 <= sum(a == "hang" for a, _ in runs[0]) <= 35  # ~20 expected


def test_distribution_latencies_stay_in_range() -> None:
    from pipeline.emulator import FaultController

    faults = FaultController(
        {"seed": 1, "providers": {"anthropic": {"latency": {"dist": "uniform", "min_ms": 10, "max_ms": 20}}}}
    )
    draws = [faults.latency_s("anthropic", "m", FaultStep()) for _ in range(100)]
    assert all(0.010 <= d <= 0.020 for d in draws)
    faults.set("anthropic", {"latency": {"dist": "normal", "mean_ms": 5, "stddev_ms": 50}})
    assert all(d >= 0 for d in (faults.latency_s("anthropic", "m", FaultStep()) for _ in range(100)))


def test_schedule_order_model_before_provider_then_default() -> None:
    from pipeline.emulator import FaultController

    faults = FaultController()
    faults.set("openai", {"default": {"status": 503}})
    faults.schedule("openai", {"status": 429})
    faults.schedule("openai", {"action": "reset"}, model="gpt-4o")
    assert faults.next_step("openai", "gpt-4o").resolved_action() == "reset"
    assert faults.next_step("openai", "gpt-4o").status == 429
    assert faults.next_step("openai", "gpt-4o").status == 503
    assert faults.next_step("anthropic", "x").resolved_action() == "ok"
    assert faults.pending("openai") == 0


def test_profile_validation_errors_name_the_path() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"providers\.openai\.schedule\[0\]\.status"):
        parse_profile({"providers": {"openai": {"schedule": [{"status": 42}]}}})
    with pytest.raises(msgspec.ValidationError, match="neither a status code"):
        parse_profile({"providers": {"openai": {"probabilities": {"often": 0.5}}}})
    with pytest.raises(msgspec.ValidationError, match="sum to"):
        parse_profile({"providers": {"openai": {"probabilities": {"500": 0.7, "429": 0.6}}}})
    # any deployment may be a target (DESIGN A10), but not a name no deployment can have, nor an unknown rule
    with pytest.raises(msgspec.ValidationError, match=r"at `key` in `\$\.providers`"):
        parse_profile({"providers": {"bad name!": {}}})
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `bogus` - at `\$\.providers\.gemini`"):
        parse_profile({"providers": {"gemini": {"bogus": 1}}})
    with pytest.raises(msgspec.ValidationError, match="max_ms"):
        parse_profile({"providers": {"openai": {"latency": {"dist": "uniform", "min_ms": 5, "max_ms": 1}}}})


def test_toml_profile(tmp_path: Path) -> None:
    path = tmp_path / "faults.toml"
    path.write_text(
        """
seed = 3
extra_models = { openai = ["my-finetune"] }

[providers.openai]
probabilities = { "500" = 0.25 }
latency = { dist = "fixed", ms = 20 }

[[providers.openai.schedule]]
status = 429
retry_after_s = 2

[providers.anthropic.models."claude-3-5-haiku-20241022"]
default = { action = "hang", hang_s = 1.5 }
""",
        encoding="utf-8",
    )
    profile = load_profile(path)
    assert isinstance(profile, FaultProfile)
    assert profile.seed == 3
    openai_faults = profile.providers["openai"]
    assert openai_faults is not None
    assert openai_faults.schedule == [FaultStep(status=429, retry_after_s=2)]
    assert openai_faults.probabilities == {"500": 0.25}
    anthropic_faults = profile.providers["anthropic"]
    assert anthropic_faults is not None
    assert anthropic_faults.models["claude-3-5-haiku-20241022"].default == FaultStep(action="hang", hang_s=1.5)
    assert profile.extra_models["openai"] == ["my-finetune"]


async def test_profile_at_start_and_reset_returns_to_it() -> None:
    profile = parse_profile(
        {"providers": {"openai": {"schedule": [{"status": 503}]}}, "extra_models": {"openai": ["my-finetune"]}}
    )
    async with EmulatorServer(profile=profile) as emu:
        async with openai.AsyncOpenAI(base_url=emu.env["OPENAI_BASE_URL"], api_key=KEY, max_retries=0) as client:
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="my-finetune", messages=[{"role": "user", "content": "a"}])
            ok = await client.chat.completions.create(model="my-finetune", messages=[{"role": "user", "content": "a"}])
            assert ok.model == "my-finetune"
            emu.reset()
            assert emu.calls() == []
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="my-finetune", messages=[{"role": "user", "content": "a"}])


# --- controls: HTTP admin endpoints ----------------------------------------------------------------


async def test_admin_faults_calls_reset(
    emulator: EmulatorServer, http: httpx.AsyncClient, oai: openai.AsyncOpenAI
) -> None:
    profile = {"providers": {"openai": {"schedule": [{"status": 429, "retry_after_ms": 250}]}}}
    assert (await http.post("/_emulator/faults", json=profile)).json() == {"ok": True}
    current = (await http.get("/_emulator/faults")).json()
    assert current["providers"]["openai"]["schedule"][0]["status"] == 429
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.headers["retry-after-ms"] == "250"
    await oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "hi"}])

    calls = (await http.get("/_emulator/calls", params={"provider": "openai"})).json()
    assert calls["counts"]["openai"] == 2
    assert [c["status"] for c in calls["calls"]] == [429, 200]
    assert calls["calls"][0]["error_kind"] == "rate_limit"
    assert "authorization" not in str(calls).lower() and KEY not in str(calls)

    schedule = {"provider": "openai", "steps": [{"action": "empty_content"}]}
    assert (await http.post("/_emulator/schedule", json=schedule)).status_code == 200
    assert emulator.faults.pending("openai") == 1
    assert (await http.post("/_emulator/reset")).json() == {"ok": True}
    assert emulator.calls() == [] and emulator.faults.pending("openai") == 0


async def test_admin_rejects_bad_bodies(http: httpx.AsyncClient) -> None:
    bad = await http.post("/_emulator/faults", json={"providers": {"openai": {"schedule": [{"status": "x"}]}}})
    assert bad.status_code == 400
    assert "$.providers.openai.schedule[0].status" in bad.json()["error"]
    assert (await http.post("/_emulator/hold", json={"n": 0})).status_code == 400
    assert (await http.get("/_emulator/calls", params={"provider": "bad name!"})).status_code == 400


async def test_admin_hold_and_release(
    emulator: EmulatorServer, http: httpx.AsyncClient, oai: openai.AsyncOpenAI
) -> None:
    assert (await http.post("/_emulator/hold", json={"n": 10, "provider": "openai"})).json() == {"ok": True}
    task = asyncio.create_task(
        oai.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "a"}])
    )
    await emulator.wait_for_calls(1, "openai", timeout_s=5)
    assert not task.done()
    assert (await http.post("/_emulator/release")).json() == {"ok": True, "released": 1}
    result = await asyncio.wait_for(task, timeout=5)
    assert result.choices[0].message.content


async def test_stop_ends_hanging_calls_quickly() -> None:
    emu = EmulatorServer()
    await emu.start()
    emu.faults.schedule("openai", {"action": "hang"})
    async with openai.AsyncOpenAI(
        base_url=emu.env["OPENAI_BASE_URL"], api_key=KEY, max_retries=0, timeout=30
    ) as client:
        task = asyncio.create_task(
            client.chat.completions.create(model=OPENAI_MODEL, messages=[{"role": "user", "content": "a"}])
        )
        await emu.wait_for_calls(1, "openai", timeout_s=5)
        started = time.monotonic()
        await emu.stop()
        assert time.monotonic() - started < 2.0
        with pytest.raises(openai.APIConnectionError):
            await asyncio.wait_for(task, timeout=5)
    with pytest.raises(RuntimeError):
        _ = emu.url
