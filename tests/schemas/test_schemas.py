"""Wire formats: field names, constraints and decoders (DESIGN A3, A4)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import (
    AIRequest,
    AIResponse,
    CircuitTransition,
    ControlEvent,
    CostEvent,
    DeadLetter,
    Health,
    SetStrategy,
    Usage,
)

REQ = msgspec.json.Decoder(AIRequest)


def test_request_minimal_prompt_gets_defaults() -> None:
    req = REQ.decode(b'{"id": "r1", "model": "gpt-3.5-turbo", "prompt": "hi"}')
    assert req.max_tokens == 1024
    assert req.temperature == 1.0
    assert req.timeout_ms == 60_000
    assert [(m.role, m.content) for m in req.chat_messages()] == [("user", "hi")]


def test_request_with_messages_and_all_fields() -> None:
    raw = {
        "id": "r2",
        "model": "chat-small",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "user": "alice",
        "metadata": {"team": "growth"},
        "cache": {"ttl_s": 60, "bypass": False},
        "timeout_ms": 5000,
        "providers": ["openai", "anthropic"],
    }
    req = REQ.decode(json.dumps(raw).encode())
    assert req.user == "alice"
    assert req.providers == ["openai", "anthropic"]
    assert req.cache is not None and req.cache.ttl_s == 60
    assert json.loads(msgspec.json.encode(req))["messages"][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"id": "x", "model": "m"}, "exactly one of `prompt` or `messages`"),
        ({"id": "x", "model": "m", "prompt": "p", "messages": [{"role": "user", "content": "c"}]}, "exactly one"),
        ({"id": "x", "model": "m", "prompt": "p", "max_tokens": 0}, "max_tokens"),
        ({"id": "x", "model": "m", "prompt": "p", "temperature": 2.5}, "temperature"),
        ({"id": "x", "model": "m", "prompt": "p", "temperature": -0.1}, "temperature"),
        ({"id": "x", "model": "m", "prompt": "p", "top_p": 0}, "top_p"),
        ({"id": "", "model": "m", "prompt": "p"}, "id"),
        ({"model": "m", "prompt": "p"}, "id"),
        ({"id": "x", "model": "m", "prompt": "p", "max_token": 5}, "max_token"),
        ({"id": "x", "model": "m", "messages": [{"role": "robot", "content": "c"}]}, "role"),
        ({"id": "x", "model": "m", "messages": [{"role": "system", "content": "c"}]}, "user or assistant"),
        ({"id": "x", "model": "m", "messages": []}, "user or assistant"),
        ({"id": "x", "model": "m", "prompt": "p", "timeout_ms": 0}, "timeout_ms"),
    ],
)
def test_request_constraints_fail_with_a_named_field(body: dict[str, object], fragment: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=fragment.replace("`", ".")):
        REQ.decode(json.dumps(body).encode())


def test_response_json_field_names_and_seed_aliases() -> None:
    resp = AIResponse(
        id="r1",
        status="ok",
        content="hello",
        provider="openai",
        model="gpt-4o-mini",
        usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cached_prompt_tokens=2),
        cost_usd=0.0000123,
        latency_ms=12.5,
    )
    data = json.loads(msgspec.json.encode(resp))
    assert set(data) == {
        "id",
        "status",
        "content",
        "provider",
        "model",
        "usage",
        "cost_usd",
        "latency_ms",
        "cached",
        "attempts",
        "error",
        "generation",
        "stream_chunks",
        "tool_calls",
        "finish_reason",
    }
    assert set(data["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_prompt_tokens",
        "cache_creation_prompt_tokens",
    }
    assert resp.cost == 0.0000123
    assert resp.tokens_used == 15


def test_control_events_are_a_tagged_union() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event = CircuitTransition(provider="openai", from_state="CLOSED", to_state="OPEN", reason="5 failures", at=at)
    raw = msgspec.json.encode(event)
    data = json.loads(raw)
    assert data["type"] == "circuit_transition"
    assert data["at"] == "2026-01-02T03:04:05Z"
    decoded = msgspec.json.decode(raw, type=ControlEvent)
    assert decoded == event
    cmd = msgspec.json.decode(
        b'{"type": "set_strategy", "name": "weighted", "weights": {"openai": 1}}', type=ControlEvent
    )
    assert isinstance(cmd, SetStrategy) and cmd.weights == {"openai": 1.0}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"type": "nonsense"}', type=ControlEvent)
    health = Health(provider="anthropic", model="m", ok=False, error_type="rate_limit", status_code=429, at=at)
    assert json.loads(msgspec.json.encode(health))["source"] == "attempt"


def test_cost_event_and_dead_letter_shapes() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    cost = CostEvent(id="r", user=None, provider="openai", model="m", usage=Usage(), cost_usd=0.001, at=at)
    assert json.loads(msgspec.json.encode(cost))["price_source"] == "table"
    letter = DeadLetter(
        source_topic="ai.requests", partition=1, offset=7, key="k", reason="bad", stage="cache", raw=b"\xff\x00", at=at
    )
    data = json.loads(msgspec.json.encode(letter))
    assert data["raw"] == "/wA="
    assert msgspec.json.decode(msgspec.json.encode(letter), type=DeadLetter).raw == b"\xff\x00"
