"""Response cache through the whole pipeline (issue 6): on both buses, with Redis, and from the CLI and the manager."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

from pipeline import create_ai_provider_manager
from pipeline.cli import cache_commands as cli_cache
from pipeline.cli.main import build_parser
from schemas import AIRequest, AIResponse, CostEvent
from stages.cache.stage import CacheLookupStage
from tests.harness import Harness, harness

pytestmark = pytest.mark.kafka


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"question {rid}", "max_tokens": 64}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.005)


def cache_stage(h: Harness) -> CacheLookupStage:
    stage = h.pipeline.stages["cache"]
    assert isinstance(stage, CacheLookupStage)
    return stage


async def cost_events(h: Harness, ids: list[str]) -> dict[str, CostEvent]:
    wanted = {i.encode() for i in ids}
    records = await h.read_all(h.topics.costs, until=lambda rs: wanted <= {r.key for r in rs})
    return {e.id: e for e in h.decode(records, CostEvent) if e.id in ids}


async def test_twenty_identical_requests_make_one_provider_call(pipe: Harness, emu: Any) -> None:
    stage = cache_stage(pipe)
    prompt = unique("coalesce")
    ids = [f"co-{pipe.kind}-{i}-{uuid.uuid4().hex[:6]}" for i in range(20)]
    responses: dict[str, AIResponse] = {}

    async def one(rid: str) -> None:
        responses[rid] = await pipe.client.request(request(rid, prompt=prompt))

    emu.hold(20)  # one call waits for the release; 20 calls (no coalescing) would release themselves
    async with anyio.create_task_group() as tg:
        for rid in ids:
            tg.start_soon(one, rid)
        await emu.wait_for_calls(1, timeout_s=10)
        await until(lambda: stage.waiting == 19)  # all 20 taken in: one at the provider, 19 waiting
        assert sum(emu.counts().values()) == 1 and not responses
        emu.release()
    assert sorted(responses) == sorted(ids)
    answered = [r for r in responses.values() if not r.cached]
    hits = [r for r in responses.values() if r.cached]
    assert len(answered) == 1 and len(hits) == 19
    leader = answered[0]
    assert leader.status == "ok" and leader.cost_usd > 0 and len(leader.attempts) == 1
    for hit in hits:
        assert hit.status == "ok" and hit.cost_usd == 0 and hit.attempts == []
        assert (hit.content, hit.provider, hit.model, hit.usage) == (
            leader.content,
            leader.provider,
            leader.model,
            leader.usage,
        )
    assert sum(emu.counts().values()) == 1
    costs = await cost_events(pipe, ids)
    assert len(costs) == 20
    assert costs[leader.id].cost_usd == leader.cost_usd and not costs[leader.id].cached
    assert all(costs[h.id].cached and costs[h.id].cost_usd == 0 for h in hits)
    assert all(costs[h.id].saved_usd == pytest.approx(leader.cost_usd) for h in hits)


async def test_when_the_leader_fails_its_waiters_go_on_as_misses(pipe: Harness, emu: Any) -> None:
    stage = cache_stage(pipe)
    prompt = unique("leader fails")
    emu.faults.schedule("cloudflare", {"status": 400})  # invalid_request: no retry, no fallback
    emu.hold(5)
    ids = [f"lf-{pipe.kind}-{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
    responses: dict[str, AIResponse] = {}

    async def one(rid: str) -> None:
        responses[rid] = await pipe.client.request(request(rid, prompt=prompt))

    async with anyio.create_task_group() as tg:
        for rid in ids:
            tg.start_soon(one, rid)
        await emu.wait_for_calls(1, timeout_s=10)
        await until(lambda: stage.waiting == 4)
        emu.release()
    failed = [r for r in responses.values() if r.status == "error"]
    went_on = [r for r in responses.values() if r.status == "ok"]
    assert len(failed) == 1 and failed[0].error is not None and failed[0].error.type == "invalid_request"
    assert len(went_on) == 4 and all(not r.cached and len(r.attempts) == 1 for r in went_on)
    assert emu.counts()["cloudflare"] == 5


@pytest.mark.parametrize("fault", [{"status": 500}, {"action": "empty_content"}], ids=["error", "empty-200"])
async def test_errors_and_empty_answers_are_not_cached(pipe: Harness, emu: Any, fault: dict[str, Any]) -> None:
    prompt = unique(f"not cached {fault}")
    for provider in ("cloudflare", "openai", "anthropic"):
        emu.faults.set(provider, {"default": fault})
    first = await pipe.client.request(request(f"nc1-{uuid.uuid4().hex[:8]}", prompt=prompt))
    assert first.status == "error"
    calls = sum(emu.counts().values())
    assert calls > 0
    emu.reset()
    again = await pipe.client.request(request(f"nc2-{uuid.uuid4().hex[:8]}", prompt=prompt))
    assert again.status == "ok" and again.cached is False and again.cost_usd > 0
    assert emu.counts()["cloudflare"] == 1  # the repeat reached the provider again


async def test_bypass_and_ttl_zero_neither_read_nor_write(pipe: Harness, emu: Any) -> None:
    prompt = unique("bypass")

    async def ask(**kw: Any) -> AIResponse:
        return await pipe.client.request(request(f"bp-{uuid.uuid4().hex[:10]}", prompt=prompt, **kw))

    assert not (await ask(cache={"bypass": True})).cached
    assert not (await ask(cache={"ttl_s": 0})).cached
    assert not (await ask()).cached  # neither of those stored anything
    assert not (await ask(cache={"bypass": True})).cached  # stored now, but bypass does not look
    assert (await ask()).cached
    assert emu.counts()["cloudflare"] == 4


@pytest.mark.parametrize("pipe", ["kafka"], indirect=True)
async def test_cli_cache_stats_and_clear(
    pipe: Harness, emu: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pipe.bootstrap
    monkeypatch.setenv("AIPIPE_KAFKA_BOOTSTRAP", pipe.bootstrap)
    monkeypatch.setenv("AIPIPE_TOPIC_PREFIX", pipe.topics.prefix)
    prompt = unique("cli")
    for i in range(2):
        await pipe.client.request(request(f"cli-{i}-{uuid.uuid4().hex[:6]}", prompt=prompt))
    stage = cache_stage(pipe)
    parser = build_parser()
    args = parser.parse_args(["cache", "stats", "--json"])
    assert args.func is cli_cache._cache
    assert await args.func(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [r["replica"] for r in stats["replicas"]] == [stage.replica]
    assert stats["hits"] == stage.counters.hits >= 1 and stats["misses"] == stage.counters.misses >= 1
    assert stats["entries"] >= 1 and stats["bytes"] > 0
    assert stats["hit_rate"] == pytest.approx(stats["hits"] / (stats["hits"] + stats["misses"]), abs=1e-6)

    assert await cli_cache._cache(argparse.Namespace(verb="stats", json=False, timeout_s=3.0)) == 0
    table = capsys.readouterr().out
    assert "hit rate" in table and "total" in table and stage.replica in table

    assert await cli_cache._cache(argparse.Namespace(verb="clear", json=True, timeout_s=3.0)) == 0
    cleared = json.loads(capsys.readouterr().out)
    assert cleared["entries"] == 0 and len(cleared["replicas"]) == 1
    again = await pipe.client.request(request(f"cli-after-{uuid.uuid4().hex[:6]}", prompt=prompt))
    assert again.cached is False


async def test_cli_without_cache_replicas_fails_clearly(
    kafka_bootstrap: str, unique_prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIPIPE_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("AIPIPE_TOPIC_PREFIX", unique_prefix)
    assert await cli_cache._cache(argparse.Namespace(verb="stats", json=False, timeout_s=0.5)) == 1
    assert "no cache replica answered within 0.5 s" in capsys.readouterr().err


async def test_manager_cache_stats_and_clear() -> None:
    env = {"AIPIPE_EMULATE": "1", "AIPIPE_TOPIC_PREFIX": "mgrcache."}
    async with create_ai_provider_manager("development", env) as manager:
        prompt = unique("manager")
        first = await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": prompt, "max_tokens": 32})
        second = await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": prompt, "max_tokens": 32})
        assert (first.cached, second.cached) == (False, True)
        stats = await manager.get_cache_stats()
        assert {k: stats[k] for k in ("hits", "misses", "hit_rate", "entries", "evictions")} == {
            "hits": 1,
            "misses": 1,
            "hit_rate": 0.5,
            "entries": 1,
            "evictions": 0,
        }
        assert stats["bytes"] > 0 and len(stats["replicas"]) == 1
        await manager.clear_cache()
        assert (await manager.get_cache_stats())["entries"] == 0
        third = await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": prompt, "max_tokens": 32})
        assert third.cached is False


# --- Redis: one cache for every replica ------------------------------------------------------------


@pytest.mark.redis
async def test_redis_an_answer_through_one_replica_is_a_hit_through_another(unflushed_redis_url: str) -> None:
    prefix = f"rc-{uuid.uuid4().hex[:6]}."
    env = {"AIPIPE_REDIS_URL": unflushed_redis_url}
    async with harness("memory", prefix, extra_env=env) as a, harness("memory", prefix, extra_env=env) as b:
        prompt = unique("shared")
        ra = await a.client.request(request("x1", prompt=prompt))
        rb = await b.client.request(request("x2", prompt=prompt))
        assert ra.status == rb.status == "ok" and not ra.cached and rb.cached
        assert (rb.content, rb.provider, rb.model, rb.cost_usd) == (ra.content, ra.provider, ra.model, 0)
        assert sum(a.emulator.counts().values()) == 1 and sum(b.emulator.counts().values()) == 0

        # coalescing across replicas: B's requests wait for A's call
        stage_b = cache_stage(b)
        await until(lambda: getattr(b.pipeline.cache_store, "listening", False))
        prompt = unique("coalesced across replicas")
        a.emulator.hold(10)
        responses: dict[str, AIResponse] = {}

        async def one(h: Harness, rid: str) -> None:
            responses[rid] = await h.client.request(request(rid, prompt=prompt))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, a, "y-lead")
            await a.emulator.wait_for_calls(1, timeout_s=10)
            for i in range(5):
                tg.start_soon(one, b, f"y{i}")
            await until(lambda: stage_b.waiting == 5)
            a.emulator.release()
        assert not responses["y-lead"].cached
        assert all(responses[f"y{i}"].cached and responses[f"y{i}"].cost_usd == 0 for i in range(5))
        assert sum(a.emulator.counts().values()) == 2 and sum(b.emulator.counts().values()) == 0
        sa, sb = await cache_stage(a).stats(), await stage_b.stats()
        assert sa.store == sb.store == "redis" and sa.entries == sb.entries == 2
