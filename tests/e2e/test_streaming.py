"""Streaming end to end (DESIGN A9) on both buses: chunks, failover before the first chunk, interruption,
resume on the next candidate, cancellation, time limits, cache hits and cost lines."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
import pytest_asyncio

from pipeline.client.replay import audit
from pipeline.client.stream_handle import StreamHandle
from pipeline.emulator.wire import full_reply
from pipeline.errors import StreamCancelledError, StreamInterruptedError
from schemas import AIRequest
from schemas.events import ControlEvent, CostEvent, Health
from schemas.response import AIResponse
from schemas.stream import StreamChunk
from tests.conftest import in_own_task
from tests.harness import Harness, fast_config, harness

pytestmark = pytest.mark.kafka

WORDS = 40
CF_MODEL = "@cf/meta/llama-3.1-8b-instruct"
OPENAI_MODEL = "gpt-3.5-turbo"


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {
        "id": rid,
        "model": "gpt-3.5-turbo",
        "prompt": f"stream {rid}",
        "max_tokens": 500,
        "stream": True,
        "cache": {"bypass": True},
    }
    data.update(kw)
    return msgspec.convert(data, AIRequest)


def called(emu: Any) -> dict[str, int]:
    return {p: n for p, n in emu.counts().items() if n}


def rid(name: str, kind: str) -> str:
    return f"st-{name}-{kind}-{uuid.uuid4().hex[:6]}"


async def collect(handle: StreamHandle) -> tuple[list[StreamChunk], AIResponse]:
    chunks: list[StreamChunk] = []
    with anyio.fail_after(20):
        async for chunk in handle:
            chunks.append(chunk)
    assert handle.response is not None
    return chunks, handle.response


async def cost_of(h: Harness, request_id: str) -> CostEvent:
    records = await h.read_all(
        h.topics.costs, until=lambda rs: any(r.key == request_id.encode() for r in rs), timeout_s=10
    )
    events = [e for e in h.decode(records, CostEvent) if e.id == request_id]
    assert len(events) == 1
    return events[0]


@pytest.fixture
def long_answers(emu: Any) -> Any:
    emu.faults.load({"reply_words": WORDS})
    return emu


async def test_a_stream_arrives_in_chunks_and_the_response_ends_it(pipe: Harness, long_answers: Any) -> None:
    req = request(rid("basic", pipe.kind))
    chunks, response = await collect(await pipe.client.stream(req))
    text = "".join(c.delta for c in chunks)
    assert response.status == "ok" and response.provider == "cloudflare"
    assert text == response.content == full_reply("cloudflare", CF_MODEL, req.prompt or "", words=WORDS)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert {c.generation for c in chunks} == {response.generation}
    assert response.stream_chunks == len(chunks) >= 1
    assert all(c.provider == "cloudflare" and c.model == CF_MODEL and c.attempt == 0 for c in chunks)
    assert response.attempts[0].first_chunk_ms is not None and response.attempts[0].chunks == len(chunks)
    (call,) = long_answers.calls()
    assert call.stream and call.outcome == "ok"


async def test_streamed_and_plain_requests_with_the_same_usage_cost_the_same(pipe: Harness, emu: Any) -> None:
    plain_id, streamed_id = rid("plain", pipe.kind), rid("streamed", pipe.kind)
    plain = await pipe.client.request(request(plain_id, stream=False, prompt="same prompt", providers=["openai"]))
    _, streamed = await collect(
        await pipe.client.stream(request(streamed_id, prompt="same prompt", providers=["openai"]))
    )
    assert streamed.content == plain.content
    assert streamed.usage == plain.usage and streamed.cost_usd == plain.cost_usd > 0
    plain_cost, streamed_cost = await cost_of(pipe, plain_id), await cost_of(pipe, streamed_id)
    assert streamed_cost.cost_usd == plain_cost.cost_usd and streamed_cost.usage_source == "provider"
    assert [(line.provider, line.cost_usd) for line in streamed_cost.lines] == [("openai", plain_cost.cost_usd)]


async def test_a_failure_before_the_first_chunk_falls_back_unseen(pipe: Harness, long_answers: Any) -> None:
    long_answers.faults.schedule("cloudflare", {"status": 500}, {"status": 500}, {"status": 500})
    req = request(rid("before", pipe.kind))
    chunks, response = await collect(await pipe.client.stream(req))
    assert response.status == "ok" and response.provider == "openai"
    assert {c.provider for c in chunks} == {"openai"}
    assert "".join(c.delta for c in chunks) == full_reply("openai", OPENAI_MODEL, req.prompt or "", words=WORDS)
    assert [(a.provider, a.outcome) for a in response.attempts][-1] == ("openai", "ok")
    assert chunks[0].attempt == len(response.attempts) - 1


async def test_a_malformed_event_before_any_text_falls_back(pipe: Harness, long_answers: Any) -> None:
    long_answers.faults.set("cloudflare", {"default": {"stream_malformed_after": 0}})
    chunks, response = await collect(await pipe.client.stream(request(rid("malformed0", pipe.kind))))
    assert response.status == "ok" and response.provider == "openai"
    assert {c.provider for c in chunks} == {"openai"}


async def test_a_cut_after_text_is_stream_interrupted_with_the_partial_and_its_cost(
    pipe: Harness, long_answers: Any
) -> None:
    long_answers.faults.set("cloudflare", {"default": {"stream_cut_after": 6}})
    req = request(rid("cut", pipe.kind))
    handle = await pipe.client.stream(req)
    seen: list[StreamChunk] = []
    with pytest.raises(StreamInterruptedError) as caught:
        with anyio.fail_after(20):
            async for chunk in handle:
                seen.append(chunk)
    response = handle.response
    assert response is not None and response.status == "error" and response.error is not None
    assert response.error.type == "stream_interrupted"
    partial = "".join(c.delta for c in seen)
    full = full_reply("cloudflare", CF_MODEL, req.prompt or "", words=WORDS)
    assert partial == response.content == caught.value.partial and full.startswith(partial) and partial != full
    assert called(long_answers) == {"cloudflare": 1}  # no fallback without stream_resume
    assert response.attempts[-1].chunks and response.attempts[-1].outcome == "error"
    cost = await cost_of(pipe, req.id)
    assert cost.status == "stream_interrupted" and cost.usage_source == "estimated"
    assert cost.usage.completion_tokens > 0 and cost.cost_usd == response.cost_usd > 0
    assert [line.provider for line in cost.lines] == ["cloudflare"]


async def test_with_resume_the_next_candidate_finishes_the_answer_and_each_is_charged(
    pipe: Harness, long_answers: Any
) -> None:
    long_answers.faults.set("cloudflare", {"default": {"stream_cut_after": 6}})
    req = request(rid("resume", pipe.kind), stream_resume=True)
    chunks, response = await collect(await pipe.client.stream(req))
    text = "".join(c.delta for c in chunks)
    full = full_reply("cloudflare", CF_MODEL, req.prompt or "", words=WORDS)
    assert response.status == "ok" and text == response.content == full  # no repeated text
    assert text.count("emulator reply from") == 1
    assert [(a.provider, a.outcome, a.resumed) for a in response.attempts] == [
        ("cloudflare", "error", False),
        ("openai", "ok", True),
    ]
    assert {c.provider for c in chunks} == {"cloudflare", "openai"}
    assert next(c.attempt for c in chunks if c.provider == "openai") == 1
    assert long_answers.calls("openai")[0].continuation
    cost = await cost_of(pipe, req.id)
    assert [line.provider for line in cost.lines] == ["cloudflare", "openai"]
    # the continuation may only generate what is left of max_tokens
    assert long_answers.calls("openai")[0].max_tokens == req.max_tokens - cost.lines[0].usage.completion_tokens
    assert sum(line.cost_usd for line in cost.lines) == pytest.approx(cost.cost_usd, abs=1e-9)
    assert cost.provider == "openai" and cost.status == "ok"


async def test_a_cached_answer_for_a_streaming_request_is_one_chunk_with_usage(pipe: Harness, emu: Any) -> None:
    prompt = f"cached stream {pipe.kind} {uuid.uuid4().hex[:6]}"
    first = await pipe.client.request(request(rid("c1", pipe.kind), stream=False, prompt=prompt, cache=None))
    assert first.status == "ok" and not first.cached
    chunks, response = await collect(await pipe.client.stream(request(rid("c2", pipe.kind), prompt=prompt, cache=None)))
    assert response.cached and response.content == first.content and response.usage == first.usage
    assert len(chunks) == 1 and chunks[0].cached and chunks[0].delta == first.content
    assert chunks[0].attempt is None and response.attempts == []  # no call produced it
    assert response.stream_chunks == 1 and chunks[0].generation == response.generation


async def test_a_stream_topic_outside_the_stream_topics_is_refused(pipe: Harness, emu: Any) -> None:
    req = request(rid("badtopic", pipe.kind), stream_topic=pipe.topics.control)
    response = await pipe.client.request(req)
    assert response.status == "error" and response.error is not None
    assert response.error.type == "invalid_request" and "stream_topic" in response.error.message
    assert called(emu) == {}


async def test_closing_the_reader_cancels_the_call_and_charges_what_was_generated(
    pipe: Harness, long_answers: Any
) -> None:
    long_answers.faults.set("cloudflare", {"default": {"chunk_interval_ms": 40}})
    req = request(rid("cancel", pipe.kind))
    handle = await pipe.client.stream(req)
    with anyio.fail_after(10):
        async for chunk in handle:
            if chunk.seq >= 1:
                break
    await handle.aclose()
    (call,) = await long_answers.wait_for_calls(1, finished=True, timeout_s=10)
    assert call.outcome == "client_disconnected" and call.chunks_sent < WORDS
    cost = await cost_of(pipe, req.id)
    assert cost.status == "cancelled" and cost.cost_usd > 0


async def test_the_manager_style_reader_raises_the_typed_error_before_any_text(pipe: Harness, emu: Any) -> None:
    for p in ("cloudflare", "openai", "anthropic"):
        emu.faults.set(p, {"default": {"status": 500}})
    handle = await pipe.client.stream(request(rid("allfail", pipe.kind)))
    with pytest.raises(Exception) as caught:
        await collect(handle)
    assert not isinstance(caught.value, StreamInterruptedError)
    assert getattr(caught.value, "error_type", None) == "all_providers_failed"


# --- time limits, on a pipeline of their own ----------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def timed() -> AsyncIterator[Harness]:
    config = fast_config(stream={"idle_timeout_ms": 400, "flush_ms": 20})
    config = msgspec.structs.replace(
        config,
        providers={
            name: msgspec.structs.replace(cfg, timeout_ms=600, first_chunk_timeout_ms=400)
            for name, cfg in config.providers.items()
        },
    )
    async with in_own_task(lambda: harness("memory", f"st-timed-{uuid.uuid4().hex[:6]}.", config=config)) as h:
        yield h


async def test_a_slow_first_chunk_times_out_and_falls_back(timed: Harness) -> None:
    timed.emulator.reset()
    timed.emulator.faults.set("cloudflare", {"default": {"first_chunk_delay_ms": 2000}})
    chunks, response = await collect(await timed.client.stream(request(rid("slowfirst", "mem"))))
    assert response.status == "ok" and response.provider == "openai"
    assert response.attempts[0].provider == "cloudflare" and response.attempts[0].error_type == "timeout"
    assert response.attempts[0].reason == "first_chunk_timeout"
    assert {c.provider for c in chunks} == {"openai"}


async def test_a_stall_after_text_is_interrupted_by_the_idle_timeout(timed: Harness) -> None:
    timed.emulator.reset()
    timed.emulator.faults.set("cloudflare", {"default": {"stream_stall_after": 3, "hang_s": 5}})
    handle = await timed.client.stream(request(rid("stall", "mem")))
    with pytest.raises(StreamInterruptedError):
        await collect(handle)
    assert handle.response is not None and handle.response.error is not None
    assert handle.response.error.reason == "idle_timeout"
    assert called(timed.emulator) == {"cloudflare": 1}


async def test_a_deadline_that_cuts_a_flowing_stream_is_not_the_providers_failure(timed: Harness) -> None:
    timed.emulator.reset()
    timed.emulator.faults.load({"reply_words": 60, "providers": {"cloudflare": {"default": {"chunk_interval_ms": 50}}}})
    req = request(rid("deadline", "mem"), timeout_ms=1500)
    handle = await timed.client.stream(req)
    with pytest.raises(StreamInterruptedError):
        await collect(handle)
    response = handle.response
    assert response is not None and response.error is not None and response.error.reason == "deadline"
    assert "reached the request's deadline after" in response.error.message
    assert called(timed.emulator) == {"cloudflare": 1}
    control = timed.decode(await timed.read_all(timed.topics.control, timeout_s=2), ControlEvent)
    assert not [e for e in control if isinstance(e, Health) and e.request_id == req.id]  # nothing for the breaker


async def test_a_healthy_stream_longer_than_the_attempt_timeout_is_never_cut(timed: Harness) -> None:
    timed.emulator.reset()
    timed.emulator.faults.load({"reply_words": 30, "providers": {"cloudflare": {"default": {"chunk_interval_ms": 50}}}})
    with anyio.fail_after(20):
        chunks, response = await collect(await timed.client.stream(request(rid("long", "mem"))))
    assert response.status == "ok" and response.provider == "cloudflare"
    assert response.attempts[0].latency_ms > 600  # longer than timeout_ms, gaps below the idle timeout
    assert "".join(c.delta for c in chunks) == response.content


async def test_the_audit_finds_every_stream_equal_to_its_answer(pipe: Harness, long_answers: Any) -> None:
    long_answers.faults.schedule("cloudflare", {"stream_cut_after": 5})  # the first resumed, the others whole
    ids = [rid(f"audit{i}", pipe.kind) for i in range(3)]
    for request_id in ids:
        await collect(await pipe.client.stream(request(request_id, stream_resume=True)))
    wanted = {i.encode() for i in ids}
    responses = pipe.decode(
        await pipe.read_all(pipe.topics.responses, until=lambda rs: wanted <= {r.key for r in rs}), AIResponse
    )
    chunks = pipe.decode(await pipe.read_all(pipe.topics.stream), StreamChunk)
    mine = [r for r in responses if r.id in ids]
    report = audit([], mine, [], [c for c in chunks if c.id in ids])
    assert report.streams == 3 and report.stream_mismatches == []
    assert any(a.resumed for r in mine for a in r.attempts)
    broken = msgspec.structs.replace(mine[0], content=(mine[0].content or "") + " extra")
    assert audit([], [broken], [], chunks).stream_mismatches == [broken.id]


async def test_a_cancel_sent_before_the_executor_took_the_request_stops_it_before_any_call(
    pipe: Harness, long_answers: Any
) -> None:
    req = request(rid("early-cancel", pipe.kind))
    await pipe.client.cancel(req.id)  # e.g. a reader that left while no executor ran
    control = await pipe.read_all(pipe.topics.control, until=lambda rs: any(req.id.encode() in r.value for r in rs))
    assert any(req.id.encode() in r.value for r in control)
    handle = await pipe.client.stream(req)
    with pytest.raises(StreamCancelledError):
        await collect(handle)
    assert called(long_answers) == {}  # no provider generated anything for nobody
