"""The Redis budget store against a real Redis: atomic reserve across replicas, settle once per id,
release, expiry, status and alert claims (the same answers as the in-process ledger)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anyio
import pytest
import redis.asyncio as aioredis

from pipeline.stores.budget_store import MemoryBudgetStore, RedisBudgetStore, from_units, to_units
from stages.rules.ledger import AlertKey, BudgetLedger, Limits

pytestmark = pytest.mark.redis

D = Decimal
SCOPES = ("global", "user:alice")


@pytest.fixture
async def namespace(unflushed_redis_url: str) -> AsyncIterator[str]:
    ns = f"test-{secrets.token_hex(4)}."
    yield ns
    client = aioredis.Redis.from_url(unflushed_redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"aipipe:{{{ns}}}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _store(redis_url: str, namespace: str, **limits: str) -> RedisBudgetStore:
    ledger = BudgetLedger()
    ledger.set_limits("user:alice", Limits(**{k: D(v) for k, v in limits.items()}))
    return RedisBudgetStore(redis_url, namespace=namespace, ledger=ledger)


def test_units_round_trip() -> None:
    assert to_units(D("0.05")) == 500_000_000
    assert from_units(b"500000000") == D("0.05")
    assert to_units(D("1e-11"), "ROUND_CEILING") == 1  # reservations round up, never to 0


async def test_two_replicas_racing_for_the_last_ten_cents_admit_exactly_two(
    unflushed_redis_url: str, namespace: str
) -> None:
    redis_url = unflushed_redis_url
    a = _store(redis_url, namespace, daily="1.00")
    b = _store(redis_url, namespace, daily="1.00")
    now = datetime.now(UTC)
    later = now + timedelta(minutes=1)
    try:
        assert await a.settle("seed", SCOPES, D("0.90"), now, now)
        admitted: list[str] = []

        async def one(store: RedisBudgetStore, rid: str) -> None:
            if (await store.reserve(rid, SCOPES, D("0.05"), now, later)).admitted:
                admitted.append(rid)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, a if i % 2 else b, f"r{i}")
        assert len(admitted) == 2
        status = await b.status("user:alice", now)
        assert status["daily"].spent_usd == D("0.90") and status["daily"].reserved_usd == D("0.10")
        refused = await a.reserve("late", SCOPES, D("0.05"), now, later)
        assert not refused.admitted and refused.scope == "user:alice" and refused.window == "daily"
        assert (refused.spent_usd, refused.reserved_usd, refused.limit_usd) == (D("0.90"), D("0.10"), D("1.00"))
        # both settle on every replica (each reads ai.costs): counted once
        for rid in admitted:
            assert await a.settle(rid, (*SCOPES, "openai"), D("0.05"), now, now)
            assert not await b.settle(rid, (*SCOPES, "openai"), D("0.05"), now, now)
        status = await a.status("user:alice", now)
        assert status["daily"].spent_usd == D("1.00") and status["daily"].reserved_usd == 0
        assert (await a.status("openai", now))["monthly"].spent_usd == D("0.10")
        # a redelivered reservation of an already settled id holds nothing
        assert (await a.reserve(admitted[0], SCOPES, D("0.05"), now, later)).admitted
        assert (await a.status("user:alice", now))["daily"].reserved_usd == 0
    finally:
        await a.aclose()
        await b.aclose()


async def test_release_expiry_and_alert_claims(unflushed_redis_url: str, namespace: str) -> None:
    redis_url = unflushed_redis_url
    store = _store(redis_url, namespace, daily="0.10")
    other = _store(redis_url, namespace, daily="0.10")
    now = datetime.now(UTC)
    try:
        assert (await store.reserve("a", SCOPES, D("0.06"), now, now + timedelta(seconds=1))).admitted
        assert not (await store.reserve("b", SCOPES, D("0.06"), now, now + timedelta(minutes=1))).admitted
        assert await store.release("a")
        assert not await store.release("a")
        assert (await store.reserve("b", SCOPES, D("0.06"), now, now + timedelta(seconds=1))).admitted
        # past its deadline the reservation no longer counts
        later = now + timedelta(seconds=2)
        assert await store.expire(later) == {"global", "user:alice"}
        assert (await store.status("user:alice", later))["daily"].reserved_usd == 0
        assert (await store.reserve("c", SCOPES, D("0.06"), later, later + timedelta(minutes=1))).admitted
        key = AlertKey("user:alice", "daily", now.replace(hour=0, minute=0, second=0, microsecond=0), 50)
        assert await store.claim_alert(key)
        assert not await other.claim_alert(key)
    finally:
        await store.aclose()
        await other.aclose()


async def test_memory_store_gives_the_same_answers() -> None:
    ledger = BudgetLedger()
    ledger.set_limits("user:alice", Limits(daily=D("1.00")))
    store = MemoryBudgetStore(ledger)
    now = datetime.now(UTC)
    later = now + timedelta(minutes=1)
    assert await store.settle("seed", SCOPES, D("0.90"), now, now)
    verdicts = [(await store.reserve(f"r{i}", SCOPES, D("0.05"), now, later)).admitted for i in range(20)]
    assert verdicts.count(True) == 2
    assert (await store.status("user:alice", now))["daily"].reserved_usd == D("0.10")
    key = AlertKey("user:alice", "daily", now, 80)
    assert await store.claim_alert(key) and not await store.claim_alert(key)
