"""End to end: requests in, responses out, through every stage, on both buses (DESIGN B4)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import msgspec
import pytest

from pipeline.bus.protocol import Outgoing
from schemas import AIRequest, AIResponse, CostEvent, DeadLetter
from tests.harness import Harness

pytestmark = pytest.mark.kafka


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"question {rid}", "max_tokens": 64}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


async def test_fifty_requests_get_fifty_valid_responses(pipe: Harness, emu: Any) -> None:
    ids = [f"fifty-{pipe.kind}-{i}" for i in range(50)]
    responses: dict[str, AIResponse] = {}

    async def one(rid: str) -> None:
        responses[rid] = await pipe.client.request(request(rid))

    async with anyio.create_task_group() as tg:
        for rid in ids:
            tg.start_soon(one, rid)
    assert sorted(responses) == sorted(ids)
    for rid, resp in responses.items():
        assert resp.id == rid
        assert resp.status == "ok", resp.error
        assert resp.content
        assert resp.provider == "cloudflare"  # lowest priority number
        assert resp.model == "@cf/meta/llama-3.1-8b-instruct"
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0
        assert resp.cost_usd > 0
        assert resp.cached is False
        assert [(a.provider, a.outcome) for a in resp.attempts] == [("cloudflare", "ok")]
    assert emu.counts().get("cloudflare") == 50


async def test_fallback_after_failures_lists_every_attempt(pipe: Harness, emu: Any) -> None:
    emu.faults.schedule("cloudflare", {"status": 500}, {"status": 503}, {"status": 502})
    resp = await pipe.client.request(request(f"fallback-{pipe.kind}"))
    assert resp.status == "ok"
    assert resp.provider == "openai" and resp.model == "gpt-3.5-turbo"
    assert [(a.provider, a.outcome, a.status_code) for a in resp.attempts] == [
        ("cloudflare", "error", 500),
        ("cloudflare", "error", 503),
        ("cloudflare", "error", 502),
        ("openai", "ok", 200),
    ]
    assert {a.error_type for a in resp.attempts[:3]} == {"server_error"}


async def test_rate_limit_with_long_retry_after_falls_back_at_once(pipe: Harness, emu: Any) -> None:
    emu.faults.schedule("cloudflare", {"status": 429, "retry_after_s": 60})
    with anyio.fail_after(10):
        resp = await pipe.client.request(request(f"ratelimit-{pipe.kind}"))
    assert resp.status == "ok" and resp.provider == "openai"
    assert [(a.provider, a.error_type) for a in resp.attempts] == [("cloudflare", "rate_limit"), ("openai", None)]


async def test_repeat_is_a_cache_hit_with_zero_cost_and_a_saving(pipe: Harness, emu: Any) -> None:
    first = await pipe.client.request(request(f"cache-a-{pipe.kind}", prompt="the same question"))
    second = await pipe.client.request(request(f"cache-b-{pipe.kind}", prompt="the same question"))
    assert first.status == second.status == "ok"
    assert second.cached is True and first.cached is False
    assert second.content == first.content and second.provider == first.provider
    assert second.cost_usd == 0 and second.attempts == []
    assert emu.counts().get("cloudflare") == 1
    costs = pipe.decode(
        await pipe.read_all(pipe.topics.costs, until=lambda rs: sum(r.key == second.id.encode() for r in rs) >= 1),
        CostEvent,
    )
    hit = [c for c in costs if c.id == second.id]
    assert len(hit) == 1 and hit[0].cached and hit[0].cost_usd == 0
    assert hit[0].saved_usd == pytest.approx(first.cost_usd)


async def test_every_answer_has_one_cost_event(pipe: Harness, emu: Any) -> None:
    ids = [f"costs-{pipe.kind}-{i}" for i in range(5)]
    for rid in ids:
        assert (await pipe.client.request(request(rid, user="alice"))).status == "ok"
    wanted = {rid.encode() for rid in ids}
    records = await pipe.read_all(pipe.topics.costs, until=lambda rs: wanted <= {r.key for r in rs})
    events = [e for e in pipe.decode(records, CostEvent) if e.id in ids]
    assert sorted(e.id for e in events) == sorted(ids)
    assert all(e.user == "alice" and e.cost_usd > 0 and e.price_source == "table" for e in events)


async def test_unknown_model_gets_model_not_found(pipe: Harness, emu: Any) -> None:
    resp = await pipe.client.request(request(f"nomodel-{pipe.kind}", model="gpt-17"))
    assert resp.status == "error" and resp.error is not None
    assert resp.error.type == "model_not_found" and "gpt-17" in resp.error.message
    assert emu.counts() == {} or sum(emu.counts().values()) == 0


async def test_not_json_goes_to_dead_letter_and_its_key_gets_invalid_request(pipe: Harness, emu: Any) -> None:
    key = f"poison-{pipe.kind}"
    raw = b"\x00this is not json{"
    await pipe.bus.publish(Outgoing(pipe.topics.requests, raw, key=key.encode()))
    good = await pipe.client.request(request(f"after-poison-{pipe.kind}"))
    assert good.status == "ok"
    letters = pipe.decode(
        await pipe.read_all(pipe.topics.deadletter, until=lambda rs: any(r.key == key.encode() for r in rs)),
        DeadLetter,
    )
    mine = [d for d in letters if d.key == key]
    assert len(mine) == 1
    assert mine[0].raw == raw and mine[0].source_topic == pipe.topics.requests and mine[0].stage == "cache"
    assert mine[0].offset >= 0 and mine[0].reason
    responses = pipe.decode(
        await pipe.read_all(pipe.topics.responses, until=lambda rs: any(r.key == key.encode() for r in rs)),
        AIResponse,
    )
    answer = [r for r in responses if r.id == key]
    assert answer and answer[0].status == "error" and answer[0].error is not None
    assert answer[0].error.type == "invalid_request"


async def test_valid_json_that_fails_validation_is_answered_with_its_id(pipe: Harness, emu: Any) -> None:
    rid = f"badtemp-{pipe.kind}"
    body = json.dumps({"id": rid, "model": "gpt-3.5-turbo", "prompt": "x", "temperature": 7}).encode()
    await pipe.bus.publish(Outgoing(pipe.topics.requests, body, key=None))
    responses = pipe.decode(
        await pipe.read_all(pipe.topics.responses, until=lambda rs: any(rid.encode() in r.value for r in rs)),
        AIResponse,
    )
    answer = [r for r in responses if r.id == rid]
    assert len(answer) == 1 and answer[0].error is not None
    assert answer[0].error.type == "invalid_request" and "temperature" in answer[0].error.message


async def test_all_providers_failing_gives_one_all_providers_failed(pipe: Harness, emu: Any) -> None:
    for provider in ("cloudflare", "openai", "anthropic"):
        emu.faults.set(provider, {"default": {"status": 500}})
    resp = await pipe.client.request(request(f"allfail-{pipe.kind}"))
    assert resp.status == "error" and resp.error is not None
    assert resp.error.type == "all_providers_failed"
    assert [a.provider for a in resp.attempts] == ["cloudflare"] * 3 + ["openai"] * 3 + ["anthropic"] * 3
    assert sum(emu.counts().values()) == 9


async def test_limits_give_invalid_request_naming_the_limit(pipe: Harness, emu: Any) -> None:
    big = json.dumps({"id": f"huge-{pipe.kind}", "model": "gpt-3.5-turbo", "prompt": "x" * 1_100_000}).encode()
    await pipe.bus.publish(Outgoing(pipe.topics.requests, big, key=None))
    many = json.dumps({"id": f"many-{pipe.kind}", "model": "gpt-3.5-turbo",
                       "messages": [{"role": "user", "content": "hi"}] * 1001}).encode()
    await pipe.bus.publish(Outgoing(pipe.topics.requests, many, key=f"many-{pipe.kind}".encode()))
    too_long = await pipe.client.request(request(f"maxtok-{pipe.kind}", max_tokens=50_000))
    assert too_long.error is not None and too_long.error.type == "invalid_request"
    assert "max_tokens_per_request" in too_long.error.message
    wanted = {f"huge-{pipe.kind}", f"many-{pipe.kind}"}
    responses = pipe.decode(
        await pipe.read_all(pipe.topics.responses,
                            until=lambda rs: wanted <= {r.key.decode() for r in rs if r.key}),
        AIResponse,
    )
    by_id = {r.id: r for r in responses if r.id in wanted}
    assert by_id[f"huge-{pipe.kind}"].error is not None
    assert "limit is 1048576 bytes" in by_id[f"huge-{pipe.kind}"].error.message
    assert by_id[f"many-{pipe.kind}"].error is not None
    assert "messages" in by_id[f"many-{pipe.kind}"].error.message
    assert sum(emu.counts().values()) == 0


async def test_a_key_that_is_not_the_request_id_keeps_its_bytes_on_the_answer(pipe: Harness, emu: Any) -> None:
    key = f"tenant-7-\xff-{pipe.kind}".encode("latin-1")  # not the id, and not UTF-8
    rid = f"body-{pipe.kind}"
    body = json.dumps({"id": rid, "model": "gpt-3.5-turbo", "prompt": "x"}).encode()
    await pipe.bus.publish(Outgoing(pipe.topics.requests, body, key=key))
    records = await pipe.read_all(pipe.topics.responses, until=lambda rs: any(r.key == key for r in rs))
    mine = [r for r in records if r.key == key]
    (answer,) = pipe.decode(mine, AIResponse)
    assert answer.id == rid and answer.status == "ok", answer
    costs = await pipe.read_all(pipe.topics.costs, until=lambda rs: any(r.key == key for r in rs))
    assert [r for r in costs if r.key == key]


async def test_allow_list_errors_name_the_real_cause(pipe: Harness, emu: Any) -> None:
    bogus = await pipe.client.request(request(f"allow-bogus-{pipe.kind}", providers=["bogus"]))
    assert bogus.error is not None and bogus.error.type == "invalid_request"
    assert "unknown provider(s) in `providers`: bogus" in bogus.error.message
