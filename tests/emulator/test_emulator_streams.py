"""The emulator's streams in the three wire formats, judged by the official SDKs and the adapters."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx
import msgspec
import openai
import pytest
import pytest_asyncio

from pipeline.emulator import EmulatorServer, FaultStep, emulator_env
from pipeline.emulator.wire import full_reply
from pipeline.errors import ProviderServerError
from schemas.request import Message
from stages.providers.anthropic import AnthropicAdapter
from stages.providers.base import CONTINUE_INSTRUCTION, ProviderCall, StreamDelta, StreamEnd
from stages.providers.cloudflare import CloudflareAdapter
from stages.providers.openai import OpenAIAdapter

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku-20241022"
CF_MODEL = "@cf/meta/llama-3.1-8b-instruct"
KEY = "sk-test-emulator-key-000111222333"
WORDS = 30


@pytest_asyncio.fixture(scope="module")
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(profile={"reply_words": WORDS}) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _fresh(emulator: EmulatorServer) -> Iterator[None]:
    emulator.reset()
    yield
    emulator.reset()


def _adapters(url: str) -> dict[str, object]:
    env = emulator_env(url)
    return {
        "openai": OpenAIAdapter(env["OPENAI_BASE_URL"], KEY),
        "anthropic": AnthropicAdapter(env["ANTHROPIC_BASE_URL"], KEY),
        "cloudflare": CloudflareAdapter(env["CLOUDFLARE_BASE_URL"], KEY, "acct"),
    }


MODELS = {"openai": OPENAI_MODEL, "anthropic": ANTHROPIC_MODEL, "cloudflare": CF_MODEL}


async def _collect(adapter: object, call: ProviderCall) -> tuple[list[str], StreamEnd]:
    deltas: list[str] = []
    end: StreamEnd | None = None
    async with httpx.AsyncClient() as client:
        async for item in adapter.stream(client, call, 10.0):  # type: ignore[attr-defined]
            if isinstance(item, StreamDelta):
                deltas.append(item.text)
            else:
                end = item
    assert end is not None
    return deltas, end


async def test_openai_sdk_reads_the_stream_with_usage(emulator: EmulatorServer) -> None:
    async with openai.AsyncOpenAI(base_url=emulator.env["OPENAI_BASE_URL"], api_key=KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
    assert text == full_reply("openai", OPENAI_MODEL, "stream please", words=WORDS)
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == -(-len(text) // 4)
    assert emulator.calls()[0].stream and emulator.calls()[0].chunks_sent == WORDS + 5


async def test_openai_sdk_stream_options_without_stream_is_a_400(emulator: EmulatorServer) -> None:
    async with openai.AsyncOpenAI(base_url=emulator.env["OPENAI_BASE_URL"], api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model=OPENAI_MODEL,
                messages=[{"role": "user", "content": "x"}],
                stream_options={"include_usage": True},
            )


async def test_anthropic_sdk_stream_helper(emulator: EmulatorServer) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=emulator.env["ANTHROPIC_BASE_URL"], api_key=KEY, max_retries=0
    ) as client:
        async with client.messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=500, messages=[{"role": "user", "content": "stream please"}]
        ) as stream:
            pieces = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
    text = "".join(pieces)
    assert text == full_reply("anthropic", ANTHROPIC_MODEL, "stream please", words=WORDS)
    assert len(pieces) == WORDS + 5
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == -(-len(text) // 4)


@pytest.mark.parametrize("wire", ["openai", "anthropic", "cloudflare"])
async def test_adapter_streams_every_format(emulator: EmulatorServer, wire: str) -> None:
    adapter = _adapters(emulator.url)[wire]
    call = ProviderCall(model=MODELS[wire], messages=[Message(role="user", content="hi")], max_tokens=500)
    deltas, end = await _collect(adapter, call)
    assert "".join(deltas) == full_reply(wire, MODELS[wire], "hi", words=WORDS)  # type: ignore[arg-type]
    assert end.usage is not None and end.usage.completion_tokens == -(-len("".join(deltas)) // 4)
    assert end.finish_reason == "stop"


@pytest.mark.parametrize("wire", ["openai", "anthropic", "cloudflare"])
@pytest.mark.parametrize("fault", ["stream_cut_after", "stream_malformed_after"])
async def test_a_broken_stream_raises_after_its_deltas(emulator: EmulatorServer, wire: str, fault: str) -> None:
    emulator.faults.set(wire, {"default": {fault: 4}})
    adapter = _adapters(emulator.url)[wire]
    call = ProviderCall(model=MODELS[wire], messages=[Message(role="user", content="hi")], max_tokens=500)
    deltas: list[str] = []
    async with httpx.AsyncClient() as client:
        with pytest.raises(ProviderServerError):
            async for item in adapter.stream(client, call, 10.0):  # type: ignore[attr-defined]
                assert isinstance(item, StreamDelta)  # never a clean end
                deltas.append(item.text)
    assert len(deltas) == 4
    outcome = {"stream_cut_after": "stream_cut", "stream_malformed_after": "stream_malformed"}[fault]
    (record,) = await emulator.wait_for_calls(1, finished=True)
    assert record.outcome == outcome


@pytest.mark.parametrize("first", ["openai", "anthropic", "cloudflare"])
@pytest.mark.parametrize("second", ["openai", "anthropic", "cloudflare"])
async def test_a_continuation_gets_exactly_the_rest(emulator: EmulatorServer, first: str, second: str) -> None:
    full = full_reply(first, MODELS[first], "tell me", words=WORDS)  # type: ignore[arg-type]
    partial = full[: full.index(" ", 70) + 1]  # cut after a word, its trailing space kept as streamed
    call = ProviderCall(
        model=MODELS[second],
        messages=[Message(role="user", content="tell me")],
        max_tokens=500,
        continuation=partial,
    )
    deltas, _ = await _collect(_adapters(emulator.url)[second], call)
    assert partial + "".join(deltas) == full
    assert emulator.calls()[0].continuation


async def test_a_wrong_continuation_shows_as_repeated_text(emulator: EmulatorServer) -> None:
    """Without the continuation turn the emulator answers afresh: the joined text repeats the header."""
    full = full_reply("openai", OPENAI_MODEL, "tell me", words=WORDS)
    partial = full[:60]
    call = ProviderCall(
        model=OPENAI_MODEL,
        messages=[Message(role="user", content="tell me"), Message(role="assistant", content=partial)],
        max_tokens=500,
    )
    deltas, _ = await _collect(_adapters(emulator.url)["openai"], call)
    assert (partial + "".join(deltas)).count("emulator reply from") == 2
    assert CONTINUE_INSTRUCTION not in "".join(deltas)


async def test_first_chunk_delay_holds_the_first_delta_not_the_headers(emulator: EmulatorServer) -> None:
    emulator.faults.set("anthropic", {"default": {"first_chunk_delay_ms": 300}})
    adapter = _adapters(emulator.url)["anthropic"]
    call = ProviderCall(model=ANTHROPIC_MODEL, messages=[Message(role="user", content="hi")], max_tokens=500)
    started = time.perf_counter()
    deltas, _ = await _collect(adapter, call)
    assert time.perf_counter() - started >= 0.3
    assert "".join(deltas) == full_reply("anthropic", ANTHROPIC_MODEL, "hi", words=WORDS)


async def test_fault_step_fields_validate() -> None:
    with pytest.raises(msgspec.ValidationError, match="stream_cut_after"):
        msgspec.convert({"stream_cut_after": -1}, FaultStep)
