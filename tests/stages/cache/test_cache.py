"""Response cache: key, stores (in-process and Redis), write rules, hit path, coalescing, stats (issue 6).

No broker here: the stage and the recorder are driven directly; Redis is the real one (``redis_url``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.client.cache_control import fold_cache_stats
from pipeline.runtime.runner import Emit, MessageContext
from pipeline.stores.cache_store import (
    MemoryCacheStore,
    OutageLog,
    RedisCacheStore,
    decode_answer,
    encode_answer,
    redis_location,
)
from schemas import AIRequest, CacheClear, CacheStats, CacheStatsRequest, CostEvent, Envelope, Outcome, Usage
from schemas.cache import CachedAnswer
from schemas.response import AIResponse, Attempt, ErrorInfo
from stages.cache.stage import CacheLookupStage
from stages.recorder.stage import RecorderStage
from stages.rules.cache_key import NON_GENERATION_FIELDS, OPTIONAL_GENERATION_FIELDS, cache_key, canonical_fields
from stages.rules.pricing import PriceTable
from tests.harness import fast_config

T = Topics("unit.")
CTX = MessageContext(record=Record(T.requests, 0, 0, None, b""), stage="cache")
USAGE = Usage(prompt_tokens=12, completion_tokens=30, total_tokens=42)


def req(**kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": "r", "model": "gpt-3.5-turbo", "prompt": "hello", "max_tokens": 64}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


def answer(content: str = "an answer", **kw: Any) -> CachedAnswer:
    data: dict[str, Any] = {
        "content": content,
        "provider": "openai",
        "model": "gpt-4o-mini",
        "usage": USAGE,
        "cost_usd": 0.0000198,
        "stored_at_ms": 1,
    }
    data.update(kw)
    return CachedAnswer(**data)


class FakeClock:
    """A monotonic clock the test moves by hand (s)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def is_hit(outputs: list[Emit]) -> bool:
    assert len(outputs) == 1
    assert outputs[0].topic in (T.stage_record, T.stage_budget)
    return outputs[0].topic == T.stage_record


# --- the key ---------------------------------------------------------------------------------


def test_the_key_covers_every_request_field_but_the_listed_non_generation_ones() -> None:
    fields = set(AIRequest.__struct_fields__)
    assert NON_GENERATION_FIELDS == {
        "id",
        "user",
        "metadata",
        "cache",
        "timeout_ms",
        "stream",
        "stream_resume",
        "stream_topic",
    }
    optional = set(OPTIONAL_GENERATION_FIELDS)
    assert set(canonical_fields(req())) == fields - NON_GENERATION_FIELDS - {"prompt"} - optional
    # pinned: the recipe of KEY_VERSION 1 must not drift (a change needs a new version)
    assert cache_key(msgspec.convert({"id": "a", "model": "gpt-3.5-turbo", "prompt": "hello"}, AIRequest)) == (
        "v1:7decf6974cf83c759bf6cbd2eec2f88f161839ff3012f88e6acf28d443e7aa5c"
    )


async def test_each_generation_field_changes_the_answer_and_json_key_order_does_not() -> None:
    store = MemoryCacheStore()
    stage = CacheLookupStage(T, store, coalesce=False)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    base = req(prompt=None, messages=messages, temperature=0.2, top_p=0.9, stop=["END"])
    await store.set(cache_key(base), answer(), 60)

    same = msgspec.json.decode(
        b'{"stop": ["END"], "top_p": 0.9, "messages": [{"content": "be brief", "role": "system"},'
        b' {"content": "hi", "role": "user"}, {"content": "hello", "role": "assistant"},'
        b' {"role": "user", "content": "and?"}], "temperature": 0.2, "max_tokens": 64,'
        b'  "model": "gpt-3.5-turbo", "id": "other-id", "user": "bob", "metadata": {"x": 1},'
        b' "cache": {"ttl_s": 5}, "timeout_ms": 1000}',
        type=AIRequest,
    )
    assert is_hit(await stage.handle(same, CTX))
    variants = {
        "model": {"model": "chat-small"},
        "temperature": {"temperature": 0.3},
        "max_tokens": {"max_tokens": 65},
        "top_p": {"top_p": 0.8},
        "stop": {"stop": ["STOP"]},
        "providers": {"providers": ["openai"]},
        "message order": {"messages": [messages[0], messages[2], messages[1], messages[3]]},
        "a role": {"messages": [messages[0], messages[1], {"role": "user", "content": "hello"}, messages[3]]},
        "a content": {"messages": [*messages[:3], {"role": "user", "content": "and? "}]},
    }
    for name, change in variants.items():
        data = msgspec.to_builtins(base) | change
        assert not is_hit(await stage.handle(msgspec.convert(data, AIRequest), CTX)), name
    assert stage.counters.hits == 1 and stage.counters.misses == len(variants)
    # defaults spelled out, a one-element stop string and a prompt as one user message are the same request
    assert cache_key(req()) == cache_key(req(temperature=1, stop=None))
    assert cache_key(req(stop="END")) == cache_key(req(stop=["END"]))
    assert cache_key(req(prompt=None, messages=[{"role": "user", "content": "hello"}])) == cache_key(req())


# --- the in-process store ----------------------------------------------------------------------


async def test_lru_bound_keeps_max_size_entries_and_counts_evictions() -> None:
    store = MemoryCacheStore(max_size=100)
    for i in range(1000):
        assert await store.set(f"k{i}", answer(f"answer {i}"), 3600)
        if i == 50:
            assert await store.get("k0") is not None  # k0 used: the least recently used is now k1
    size = await store.size()
    assert (size.entries, size.evictions) == (100, 900)
    assert await store.get("k999") is not None and await store.get("k900") is not None
    assert await store.get("k899") is None and await store.get("k1") is None
    assert size.bytes == sum(
        len(encode_answer(answer(f"answer {i}"), threshold_bytes=1024, compress=True)) for i in range(900, 1000)
    )
    assert await store.clear() == 100
    assert await store.size() == type(size)(entries=0, bytes=0, evictions=900)  # a clear is not an eviction


async def test_ttl_per_entry_with_an_injected_clock() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(timer=clock)
    await store.set("short", answer("s"), 5)
    await store.set("long", answer("l"), 3600)
    assert not await store.set("never", answer("n"), 0)
    clock.now += 4.999
    assert await store.get("short") is not None
    clock.now += 0.001
    assert await store.get("short") is None
    assert await store.get("long") is not None and await store.get("never") is None
    assert (await store.size()).entries == 1 and (await store.size()).evictions == 0  # an expiry is not an eviction


def test_values_are_compressed_above_the_threshold_only() -> None:
    small, big = answer("short"), answer("word " * 2000)
    assert encode_answer(small, threshold_bytes=1024, compress=True)[:1] == b"J"
    packed = encode_answer(big, threshold_bytes=1024, compress=True)
    assert packed[:1] == b"Z" and len(packed) < len(msgspec.json.encode(big)) / 10
    assert decode_answer(packed) == big
    assert encode_answer(big, threshold_bytes=1024, compress=False)[:1] == b"J"
    with pytest.raises(ValueError, match="corrupt"):
        decode_answer(b"Z" + b"not zlib")


# --- write rules and the hit path (the recorder) --------------------------------------------


def recorder(store: MemoryCacheStore) -> RecorderStage:
    return RecorderStage(T, fast_config(), PriceTable.load(), store)


def envelope(request: AIRequest, outcome: Outcome) -> Envelope:
    now = int(time.time() * 1000)
    return Envelope(
        id=request.id,
        request=request,
        received_at_ms=now - 25,
        deadline_at_ms=now + 60_000,
        cache_key=cache_key(request),
        outcome=outcome,
    )


def ok(content: str | None = "a complete answer", usage: Usage = USAGE) -> Outcome:
    return Outcome(
        status="ok",
        content=content,
        provider="openai",
        model="gpt-4o-mini",
        usage=usage,
        attempts=[Attempt(provider="openai", model="gpt-4o-mini", outcome="ok", status_code=200)],
    )


@pytest.mark.parametrize(
    ("name", "request_kw", "outcome"),
    [
        ("error", {}, Outcome(status="error", error=ErrorInfo(type="server_error", message="boom"))),
        ("empty content", {}, ok("")),
        ("blank content", {}, ok("  \n")),
        ("no usage", {}, ok(usage=Usage())),
        ("bypass", {"cache": {"bypass": True}}, ok()),
        ("ttl 0", {"cache": {"ttl_s": 0}}, ok()),
    ],
)
async def test_only_complete_successful_answers_are_stored(
    name: str, request_kw: dict[str, Any], outcome: Outcome
) -> None:
    store = MemoryCacheStore()
    request = req(id=f"w-{name}", **request_kw)
    await recorder(store).handle(envelope(request, outcome), CTX)
    assert await store.get(cache_key(request)) is None, name
    good = req(id="w-good")
    await recorder(store).handle(envelope(good, ok()), CTX)
    assert (await store.get(cache_key(good))) is not None


async def test_per_request_ttl_overrides_the_default() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(timer=clock)
    short, default = req(id="t1", prompt="one", cache={"ttl_s": 2}), req(id="t2", prompt="two")
    rec = recorder(store)
    await rec.handle(envelope(short, ok()), CTX)
    await rec.handle(envelope(default, ok()), CTX)
    clock.now += 2.5
    assert await store.get(cache_key(short)) is None
    assert await store.get(cache_key(default)) is not None  # default_ttl_s 3600


async def test_a_hit_is_answered_free_with_the_original_provider_and_a_saving_priced_from_the_table() -> None:
    store = MemoryCacheStore()
    rec = recorder(store)
    first = req(id="h1")
    out1 = await rec.handle(envelope(first, ok()), CTX)
    cost1 = next(o.value for o in out1 if isinstance(o.value, CostEvent))
    stage = CacheLookupStage(T, store)
    hit = await stage.handle(req(id="h2"), CTX)
    assert is_hit(hit)
    out2 = await rec.handle(hit[0].value, CTX)
    response = next(o.value for o in out2 if isinstance(o.value, AIResponse))
    cost2 = next(o.value for o in out2 if isinstance(o.value, CostEvent))
    assert response.status == "ok" and response.cached is True and response.cost_usd == 0
    assert (response.provider, response.model, response.content) == ("openai", "gpt-4o-mini", "a complete answer")
    assert response.attempts == [] and response.usage == USAGE and response.latency_ms >= 0
    assert cost2.cached and cost2.cost_usd == 0 and cost2.price_source == "table"
    # gpt-4o-mini: $0.15 / $0.60 per million input / output tokens
    assert cost2.saved_usd == cost1.cost_usd == pytest.approx((12 * 0.15 + 30 * 0.60) / 1e6)


# --- coalescing (in-process) -----------------------------------------------------------------


async def test_waiters_get_the_leaders_answer_or_go_on_when_it_fails() -> None:
    store = MemoryCacheStore()
    stage = CacheLookupStage(T, store)
    rec = recorder(store)
    results: dict[str, list[Emit]] = {}

    async def send(rid: str) -> None:
        results[rid] = await stage.handle(req(id=rid, prompt="coalesce me"), CTX)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "lead")
        with anyio.fail_after(5):
            while "lead" not in results:
                await anyio.lowlevel.checkpoint()
        for i in range(5):
            tg.start_soon(send, f"wait{i}")
        with anyio.fail_after(5):
            while stage.waiting < 5:
                await anyio.sleep(0.001)
        leader = results["lead"][0].value
        assert not is_hit(results["lead"]) and leader.cache_key
        await rec.handle(msgspec.structs.replace(leader, outcome=ok()), CTX)
    assert all(is_hit(results[f"wait{i}"]) for i in range(5))
    assert (stage.counters.hits, stage.counters.misses, stage.coalesced, stage.waiting) == (5, 1, 5, 0)

    results.clear()
    await store.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "lead2")
        with anyio.fail_after(5):
            while "lead2" not in results:
                await anyio.lowlevel.checkpoint()
        tg.start_soon(send, "wait-a")
        tg.start_soon(send, "wait-b")
        with anyio.fail_after(5):
            while stage.waiting < 2:
                await anyio.sleep(0.001)
        failed = Outcome(status="error", error=ErrorInfo(type="all_providers_failed", message="down"))
        await rec.handle(msgspec.structs.replace(results["lead2"][0].value, outcome=failed), CTX)
    assert not is_hit(results["wait-a"]) and not is_hit(results["wait-b"])


async def test_a_claim_that_is_never_finished_expires_and_frees_its_waiters() -> None:
    store = MemoryCacheStore()
    assert await store.claim("k", "lead", ttl_ms=50)
    assert await store.claim("k", "lead", ttl_ms=50)  # a redelivered leader keeps its claim
    assert not await store.claim("k", "other", ttl_ms=50)
    started = time.monotonic()
    with anyio.fail_after(2):
        assert await store.wait_done("k", timeout_s=10)
    assert time.monotonic() - started >= 0.04
    assert await store.claim("k", "other", ttl_ms=1000)  # expired: the next request leads
    assert not await store.wait_done("k", timeout_s=0.01)  # timed out: the caller goes on as a miss


# --- stats and commands ----------------------------------------------------------------------


async def test_stats_and_commands_on_a_stage() -> None:
    store = MemoryCacheStore()
    stage = CacheLookupStage(T, store, replica="r1")
    await store.set("a", answer(), 60)
    stage.counters.hits, stage.counters.misses = 3, 1
    stats = await stage.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.evictions, stats.replica, stats.store) == (
        3,
        1,
        1,
        0,
        "r1",
        "memory",
    )
    assert stats.bytes == len(encode_answer(answer(), threshold_bytes=1024, compress=True))
    old = stage.started_at - timedelta(minutes=5)
    stage.on_control(CacheClear(at=old))  # replayed history: ignored
    stage.on_control(CacheStats(hits=0, misses=0, entries=0, evictions=0, bytes=0, at=old))  # not a command
    published: list[Emit] = []

    async def publish(e: Emit) -> None:
        published.append(e)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stage.background, publish)
        stage.on_control(CacheStatsRequest(request_id="q1", at=datetime.now(UTC)))
        stage.on_control(CacheClear(request_id="c1", at=datetime.now(UTC)))
        with anyio.fail_after(5):
            while len(published) < 2:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    replies = [e.value for e in published]
    assert all(e.topic == T.control and e.key == "*" for e in published)
    assert [(r.in_reply_to, r.entries) for r in replies] == [("q1", 1), ("c1", 0)]


async def test_periodic_stats() -> None:
    stage = CacheLookupStage(T, MemoryCacheStore(), stats_interval_s=0.01)
    published: list[Emit] = []

    async def publish(e: Emit) -> None:
        published.append(e)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(stage.background, publish)
            while len(published) < 3:
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    assert all(isinstance(e.value, CacheStats) and e.value.in_reply_to is None for e in published)


def test_fold_sums_replicas_and_counts_a_shared_store_once() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)

    def s(
        replica: str, store: Literal["memory", "redis"], hits: int, misses: int, entries: int, sec: int = 0
    ) -> CacheStats:
        return CacheStats(
            hits=hits,
            misses=misses,
            entries=entries,
            evictions=entries // 2,
            bytes=entries * 10,
            replica=replica,
            store=store,
            at=at + timedelta(seconds=sec),
        )

    summary = fold_cache_stats(
        [s("m1", "memory", 3, 1, 4), s("m2", "memory", 1, 3, 6), s("m1", "memory", 0, 0, 0, sec=-5)]
    )  # an older report of m1 is ignored
    assert (summary.hits, summary.misses, summary.hit_rate, summary.entries, summary.evictions, summary.bytes) == (
        4,
        4,
        0.5,
        10,
        5,
        100,
    )
    shared = fold_cache_stats([s("r1", "redis", 9, 1, 50, sec=1), s("r2", "redis", 1, 9, 48)])
    assert (shared.hits, shared.misses, shared.entries, shared.bytes) == (10, 10, 50, 500)
    assert fold_cache_stats([]).hit_rate == 0.0


def test_outage_is_logged_once_and_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog("Redis cache at h:1/0", retry_after_s=1.0, clock=clock)
    caplog.set_level(logging.INFO, logger="aipipe.cache")
    assert outage.should_try()
    for _ in range(5):
        outage.failed(ConnectionError("refused"))
    assert not outage.should_try()  # skipped for retry_after_s, no waiting on a dead server
    clock.now += 1.0
    assert outage.should_try()
    outage.ok()
    outage.ok()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "unreachable" in messages[0] and "reachable again" in messages[1]
    assert outage.outages == 1


def test_redis_url_parsing_never_echoes_the_password() -> None:
    where = redis_location("rediss://user:s3cr%40t@cache.example:6380/3")
    assert (where["endpoint"], where["port"], where["db"], where["password"], where["ssl"]) == (
        "cache.example",
        6380,
        3,
        "s3cr@t",
        True,
    )
    assert where["connection_pool_kwargs"] == {"username": "user"}
    with pytest.raises(ValueError, match="redis://") as info:
        redis_location("http://user:pw@host/0")
    assert "pw" not in str(info.value)
    with pytest.raises(ValueError, match="integer"):
        redis_location("redis://host/zero")


# --- Redis -----------------------------------------------------------------------------------

pytest_redis = pytest.mark.redis


@contextlib.asynccontextmanager
async def redis_store(url: str, namespace: str, **kw: Any) -> Any:
    kw.setdefault("op_timeout_s", 5.0)  # the machine may be loaded; outages are tested with a dead port
    store = RedisCacheStore(url, namespace=namespace, **kw)
    try:
        yield store
    finally:
        await store.aclose()


@pytest_redis
async def test_redis_store_round_trip_lru_bound_and_evictions(unflushed_redis_url: str) -> None:
    ns = f"aipipe:{{t-lru-{secrets.token_hex(4)}}}"
    async with redis_store(unflushed_redis_url, ns, max_size=100) as store:
        for i in range(1000):
            assert await store.set(f"k{i}", answer(f"answer {i}"), 3600)
            if i == 50:
                assert await store.get("k0") is not None  # touched: k1 is now the least recently used
        size = await store.size()
        assert (size.entries, size.evictions) == (100, 900)
        assert size.bytes == sum(
            len(encode_answer(answer(f"answer {i}"), threshold_bytes=1024, compress=True)) for i in range(900, 1000)
        )
        assert await store.get("k999") == answer("answer 999")
        assert await store.get("k1") is None and await store.get("k899") is None
        big = answer("word " * 2000)
        await store.set("big", big, 60)
        assert await store.get("big") == big
        raw = await store._client.get(f"{ns}:v:big")
        assert raw[:1] == b"Z" and len(raw) < 2000
        assert await store.clear() == 100
        assert (await store.size()).entries == 0 and await store.get("big") is None


@pytest_redis
async def test_redis_store_ttl_expiry(unflushed_redis_url: str) -> None:
    async with redis_store(unflushed_redis_url, f"aipipe:{{t-ttl-{secrets.token_hex(4)}}}") as store:
        await store.set("short", answer(), 0.15)
        await store.set("long", answer(), 60)
        assert await store.get("short") is not None
        with anyio.fail_after(3):
            while await store.get("short") is not None:
                await anyio.sleep(0.02)
        size = await store.size()
        assert (size.entries, size.evictions) == (1, 0)
        assert await store.get("long") is not None


@pytest_redis
async def test_redis_replicas_share_answers_and_claims(unflushed_redis_url: str) -> None:
    ns = f"aipipe:{{t-share-{secrets.token_hex(4)}}}"
    async with redis_store(unflushed_redis_url, ns) as a, redis_store(unflushed_redis_url, ns, poll_s=30) as b:
        await a.set("q", answer("shared"), 60)
        assert (await b.get("q")) == answer("shared")
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.listen)
            with anyio.fail_after(5):
                while not b.listening:
                    await anyio.sleep(0.005)
            assert await a.claim("k", "lead", ttl_ms=20_000)
            assert not await b.claim("k", "other", ttl_ms=20_000)
            woke: list[float] = []

            async def waiter() -> None:
                assert await b.wait_done("k", timeout_s=20)
                woke.append(time.monotonic())

            tg.start_soon(waiter)
            tg.start_soon(waiter)
            with anyio.fail_after(5):
                while b._waiters.get("k") is None or b._waiters["k"].count < 2:
                    await anyio.sleep(0.005)
            await a.finish("k", "other")  # not the leader: nothing happens
            await a.finish("k", "lead")
            finished = time.monotonic()
            with anyio.fail_after(5):  # poll_s is 30 s: only the published message can wake them this fast
                while len(woke) < 2:
                    await anyio.sleep(0.005)
            assert max(woke) - finished < 2
            assert await b.claim("k", "next", ttl_ms=1000)
            tg.cancel_scope.cancel()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is needed on PATH for the outage test")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest_redis
async def test_redis_down_counts_as_miss_logs_once_and_recovery_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aipipe.cache")
    port = _free_port()
    async with redis_store(f"redis://127.0.0.1:{port}/0", "aipipe:{t-outage}", retry_after_s=0.05) as store:
        with redis_server(port, tmp_path):
            assert await store.set("k", answer(), 60)
            assert await store.get("k") is not None
        for _ in range(5):  # down: a miss, a dropped write, a claim that leads, no waiting
            assert await store.get("k") is None
            assert not await store.set("k2", answer(), 60)
            assert await store.claim("c", "x", 1000) and await store.claim("c", "y", 1000)
            assert await store.wait_done("c", 5)
            await anyio.sleep(0.06)
        assert (await store.size()).entries == 0
        down = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(down) == 1 and down[0].levelno == logging.WARNING
        assert str(port) in down[0].getMessage()
        with redis_server(port, tmp_path):
            with anyio.fail_after(5):  # Redis is skipped for retry_after_s after the last failure
                while not await store.set("k3", answer(), 60):
                    await anyio.sleep(0.01)
            assert await store.get("k3") is not None
        up = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(up) == 1
        assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


@pytest_redis
async def test_with_redis_down_the_stage_passes_requests_on_and_the_recorder_still_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aipipe.cache")
    async with redis_store(f"redis://127.0.0.1:{_free_port()}/0", "aipipe:{t-down}", op_timeout_s=1.0) as store:
        stage = CacheLookupStage(T, store)
        rec = RecorderStage(T, fast_config(), PriceTable.load(), store)
        for i in range(3):  # identical requests: each a miss, none waits on another
            with anyio.fail_after(2):
                out = await stage.handle(req(id=f"down{i}", prompt="redis is down"), CTX)
            assert not is_hit(out) and out[0].value.cache_key
            answered = await rec.handle(msgspec.structs.replace(out[0].value, outcome=ok()), CTX)
            response = next(o.value for o in answered if isinstance(o.value, AIResponse))
            assert response.status == "ok" and response.content == "a complete answer" and not response.cached
        assert (stage.counters.hits, stage.counters.misses, stage.waiting) == (0, 3, 0)
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
