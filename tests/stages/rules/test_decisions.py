"""Shared rules: cache key, routing, budget ledger windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec
import pytest

from pipeline.runtime.config import config_from_mapping, preset
from schemas import AIRequest
from stages.rules.cache_key import cache_key
from stages.rules.ledger import BudgetLedger, Limits, window_end, window_start
from stages.rules.routing import order_by_priority, resolve


def req(**kw: object) -> AIRequest:
    base: dict[str, object] = {"id": "a", "model": "gpt-3.5-turbo", "prompt": "hello"}
    base.update(kw)
    return msgspec.convert(base, AIRequest)


# --- cache key --------------------------------------------------------------------------------

def test_cache_key_ignores_field_order_whitespace_and_non_generation_fields() -> None:
    a = msgspec.json.decode(b'{"id":"1","model":"m","prompt":"p","temperature":0.5}', type=AIRequest)
    b = msgspec.json.decode(b'{ "temperature" : 0.5 ,\n "prompt":"p", "model":"m", "id":"2", "user":"bob"}',
                            type=AIRequest)
    assert cache_key(a) == cache_key(b)
    assert cache_key(req()) == cache_key(req(temperature=1.0))  # the default, spelled out


@pytest.mark.parametrize(
    "change",
    [
        {"model": "chat-small"},
        {"temperature": 0.3},
        {"max_tokens": 99},
        {"top_p": 0.5},
        {"stop": ["END"]},
        {"prompt": "hello!"},
        {"providers": ["openai"]},
    ],
)
def test_cache_key_changes_with_each_generation_field(change: dict[str, object]) -> None:
    assert cache_key(req()) != cache_key(req(**change))


def test_cache_key_message_order_and_roles_matter() -> None:
    m1 = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    m2 = [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]
    m3 = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    keys = {cache_key(req(prompt=None, messages=m)) for m in (m1, m2, m3)}
    assert len(keys) == 3
    # a prompt is the one user message it stands for
    assert cache_key(req(prompt=None, messages=[{"role": "user", "content": "hello"}])) == cache_key(req())


# --- routing ----------------------------------------------------------------------------------

def test_model_group_resolves_to_each_providers_model_in_priority_order() -> None:
    config = preset("production")
    res = resolve(config, req(model="gpt-3.5-turbo"))
    ordered = order_by_priority(res.candidates, config.providers)
    assert [(c.provider, c.model) for c in ordered] == [
        ("cloudflare", "@cf/meta/llama-3.1-8b-instruct"),
        ("openai", "gpt-3.5-turbo"),
        ("anthropic", "claude-3-5-haiku-20241022"),
    ]


def test_concrete_model_served_by_one_provider_and_unknown_model() -> None:
    config = preset("production")
    res = resolve(config, req(model="gpt-4o"))
    assert [(c.provider, c.model) for c in res.candidates] == [("openai", "gpt-4o")]
    missing = resolve(config, req(model="no-such-model"))
    assert missing.error_type == "model_not_found" and "no-such-model" in missing.message


def test_allow_list_orders_and_filters_and_max_tokens_limit() -> None:
    config = preset("production")
    res = resolve(config, req(providers=["anthropic", "openai"]))
    assert [c.provider for c in res.candidates] == ["anthropic", "openai"]
    too_big = resolve(config, req(max_tokens=100_000))
    assert too_big.error_type == "invalid_request" and "max_tokens_per_request" in too_big.message


# --- ledger -----------------------------------------------------------------------------------

def test_windows_align_to_calendar_boundaries_in_a_time_zone() -> None:
    utc = ZoneInfo("UTC")
    tokyo = ZoneInfo("Asia/Tokyo")
    at = datetime(2026, 3, 4, 16, 30, tzinfo=UTC)  # Wednesday; 01:30 Thursday in Tokyo
    assert window_start("daily", at, utc) == datetime(2026, 3, 4, tzinfo=utc)
    assert window_start("daily", at, tokyo) == datetime(2026, 3, 5, tzinfo=tokyo)
    assert window_start("weekly", at, utc) == datetime(2026, 3, 2, tzinfo=utc)  # Monday
    assert window_start("monthly", at, utc) == datetime(2026, 3, 1, tzinfo=utc)
    assert window_end("monthly", datetime(2026, 12, 31, tzinfo=UTC), utc) == datetime(2027, 1, 1, tzinfo=utc)
    assert window_end("daily", at, tokyo) == datetime(2026, 3, 6, tzinfo=tokyo)


def test_ledger_reserves_settles_releases_and_refuses() -> None:
    ledger = BudgetLedger()
    now = datetime(2026, 5, 5, 12, tzinfo=UTC)
    later = now + timedelta(minutes=1)
    ledger.set_limits("user:alice", Limits(daily=Decimal("1.00")))
    ledger.settle("old", ("global", "user:alice"), Decimal("0.90"), now)
    assert ledger.reserve("r1", ("global", "user:alice"), Decimal("0.05"), now, later).admitted
    assert ledger.reserve("r2", ("global", "user:alice"), Decimal("0.05"), now, later).admitted
    refused = ledger.reserve("r3", ("global", "user:alice"), Decimal("0.05"), now, later)
    assert not refused.admitted and refused.scope == "user:alice" and refused.window == "daily"
    assert ledger.settle("r1", ("global", "user:alice"), Decimal("0.04"), now)
    assert not ledger.settle("r1", ("global", "user:alice"), Decimal("0.04"), now)  # idempotent
    assert ledger.spent("user:alice", "daily", now) == Decimal("0.94")
    assert ledger.release("r2")
    assert ledger.reserve("r4", ("user:alice",), Decimal("0.06"), now, later).admitted
    # next day: a fresh window
    assert ledger.spent("user:alice", "daily", now + timedelta(days=1)) == 0
    # reservations expire at the request's deadline
    assert ledger.reserved("user:alice", later + timedelta(seconds=1)) == 0


# --- routing (model limits) ----------------------------------------------------------------

def test_candidates_whose_model_cannot_output_max_tokens_are_dropped() -> None:
    config = preset("production")
    # gpt-3.5-turbo outputs at most 4,096 tokens, claude-3-5-haiku 8,192, llama-3.1-8b 7,968 (catalog)
    res = resolve(config, req(model="gpt-3.5-turbo", max_tokens=4096))
    assert {c.provider for c in res.candidates} == {"cloudflare", "openai", "anthropic"}
    wide = config_from_mapping({"providers": {p: {"max_tokens_per_request": 100_000}
                                              for p in ("openai", "anthropic", "cloudflare")}}, base=config)
    res = resolve(wide, req(model="gpt-3.5-turbo", max_tokens=8000))
    assert [c.provider for c in res.candidates] == ["anthropic"]
    none = resolve(wide, req(model="gpt-3.5-turbo", max_tokens=9000))
    assert none.error_type == "invalid_request" and "maximum output" in none.message and "8192" in none.message
