"""`aipipe tail` lines: one readable line for every value type on every topic."""

from __future__ import annotations

import typing
from datetime import UTC, datetime

import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.cli.lines import TEXT_CHARS, formatter
from schemas import AIRequest, AIResponse, CostEvent, DeadLetter, Envelope
from schemas.events import (
    BudgetAlert,
    BudgetStatus,
    BudgetWindow,
    CacheClear,
    CacheStats,
    CacheStatsRequest,
    CancelRequest,
    CircuitSnapshot,
    CircuitTransition,
    ControlEvent,
    Health,
    ReservationRelease,
    SetBudget,
    SetStrategy,
)
from schemas.response import ErrorInfo, Usage
from schemas.stream import StreamChunk

AT = datetime(2026, 12, 6, 7, 0, 0, tzinfo=UTC)
TOPICS = Topics()

CONTROL_SAMPLES: dict[type, object] = {
    Health: Health(provider="openai", model="gpt-4o", ok=False, error_type="rate_limit", status_code=429,
                   latency_ms=12.0, retry_after_s=2.0, request_id="r-1", at=AT),
    CircuitTransition: CircuitTransition(provider="openai", from_state="CLOSED", to_state="OPEN",
                                         reason="5 failures", cool_off_s=30.0, at=AT),
    CircuitSnapshot: CircuitSnapshot(states={"openai": "OPEN", "anthropic": "CLOSED"}, at=AT),
    BudgetAlert: BudgetAlert(scope="global", window="daily", threshold_pct=80, spent_usd=8.1, limit_usd=10.0, at=AT),
    BudgetStatus: BudgetStatus(scope="user:alice", windows={
        "daily": BudgetWindow(limit_usd=5.0, spent_usd=1.25, reserved_usd=0.5, resets_at=AT)}, at=AT),
    CacheStats: CacheStats(hits=3, misses=4, entries=2, evictions=0, bytes=900, replica="c1", store="redis",
                           in_reply_to="q-1", at=AT),
    ReservationRelease: ReservationRelease(request_id="r-2", scope="global", amount_usd=0.002, at=AT),
    SetStrategy: SetStrategy(name="weighted", weights={"openai": 2.0, "anthropic": 1.0}, at=AT),
    SetBudget: SetBudget(scope="global", daily_usd=5.0, monthly_usd=None),
    CacheClear: CacheClear(request_id="q-2"),
    CacheStatsRequest: CacheStatsRequest(request_id="q-3", at=AT),
    CancelRequest: CancelRequest(request_id="r-5", at=AT),
}


def _record(topic: str, value: object | bytes, key: bytes | None = b"r-1") -> Record:
    raw = value if isinstance(value, bytes) else msgspec.json.encode(value)
    return Record(topic=topic, partition=0, offset=7, key=key, value=raw, timestamp_ms=int(AT.timestamp() * 1000))


def test_every_control_event_type_has_a_readable_line() -> None:
    types = set(typing.get_args(ControlEvent))
    assert types == set(CONTROL_SAMPLES), "a control event type has no sample here: add one"
    line = formatter(TOPICS, TOPICS.control)
    lines = {t.__name__: line(_record(TOPICS.control, v, key=b"*")) for t, v in CONTROL_SAMPLES.items()}
    for name, text in lines.items():
        assert text.startswith("2026-12-06T07:00:00.000Z  "), (name, text)
        assert "{" not in text, (name, text)  # never the raw JSON
        assert "\n" not in text
    assert lines["Health"].endswith("health   openai/gpt-4o rate_limit 429 retry-after 2s 12ms (attempt r-1)")
    assert "openai: CLOSED -> OPEN (5 failures, cool-off 30s)" in lines["CircuitTransition"]
    assert "anthropic=CLOSED, openai=OPEN" in lines["CircuitSnapshot"]
    assert "global daily reached 80%: $8.1000 of $10.00" in lines["BudgetAlert"]
    assert "user:alice: daily $1.2500+0.5000 reserved of $5.00" in lines["BudgetStatus"]
    assert "set_budget global: daily $5.00, weekly unchanged, monthly unlimited" in lines["SetBudget"]
    assert "set_strategy weighted anthropic=1,openai=2" in lines["SetStrategy"]
    assert "hits=3 misses=4" in lines["CacheStats"]
    assert "release  r-2 global $0.002000" in lines["ReservationRelease"]
    assert lines["CancelRequest"].endswith("command  cancel_request r-5")
    assert lines["CacheClear"].endswith("cache_clear (q-2)")  # no `at`: the record's time leads the line


def test_a_response_line_has_id_status_provider_cost_latency_and_the_answer_start() -> None:
    answer = "The Danube, the Rhine and the Loire. " * 10
    ok = AIResponse(id="r-1", status="ok", content=answer, provider="openai", model="gpt-4o", cost_usd=0.00012,
                    latency_ms=812.4, usage=Usage(prompt_tokens=10, completion_tokens=20, total_tokens=30))
    text = formatter(TOPICS, TOPICS.responses)(_record(TOPICS.responses, ok))
    assert text.startswith("2026-12-06T07:00:00.000Z  response r-1 ok openai/gpt-4o $0.00012000 812ms ")
    assert f'"{" ".join(answer.split())[:TEXT_CHARS]}..."' in text
    failed = AIResponse(id="r-2", status="error", error=ErrorInfo(type="timeout", message="deadline passed"))
    text = formatter(TOPICS, TOPICS.responses)(_record(TOPICS.responses, failed))
    assert 'response r-2 error -/- $0.00000000 0ms timeout: "deadline passed"' in text


@pytest.mark.parametrize("topic", TOPICS.all())
def test_every_topic_has_a_line_and_an_unreadable_value_is_shown_as_text(topic: str) -> None:
    samples: dict[str, object] = {
        TOPICS.requests: AIRequest(id="r-1", model="gpt-4o", prompt="Name three rivers.", user="alice"),
        TOPICS.costs: CostEvent(id="r-1", user="alice", provider="openai", model="gpt-4o",
                                usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3), cost_usd=0.001,
                                at=AT),
        TOPICS.deadletter: DeadLetter(source_topic=TOPICS.requests, partition=1, offset=9, key="r-9",
                                      reason="not JSON", stage="cache", raw=b"\xff" * 10, at=AT),
        TOPICS.responses: AIResponse(id="r-1", status="ok", content="hi"),
        TOPICS.control: CONTROL_SAMPLES[Health],
        TOPICS.stream: StreamChunk(id="r-1", seq=3, generation="g1", delta="Danube", provider="openai",
                                   model="gpt-4o", attempt=1, at=AT),
    }
    value = samples.get(topic, Envelope(id="r-1", received_at_ms=0, deadline_at_ms=1))
    line = formatter(TOPICS, topic)
    text = line(_record(topic, value))
    assert text.startswith("2026-12-06T07:00:00.000Z  ") and "{" not in text, text
    if topic == TOPICS.deadletter:
        assert "ai.requests@1/9 key=r-9 stage=cache 10 bytes" in text
    elif topic == TOPICS.control:
        assert "openai/gpt-4o rate_limit 429" in text
    elif topic == TOPICS.stream:
        assert "chunk    r-1 gen=g1 #3 openai/gpt-4o attempt=1 'Danube'" in text
    else:
        assert "r-1" in text
    bad = line(_record(topic, b"\xffnot json at all"))
    assert "unreadable" in bad and "not json at all" in bad


def test_control_characters_in_a_value_never_reach_the_terminal() -> None:
    request = AIRequest(id="id\nnl", model="bad\nmodel\x1b[2J", prompt="line one\n\x1b[31mred", user="eve\nmallory")
    text = formatter(TOPICS, TOPICS.requests)(_record(TOPICS.requests, request))
    assert "\n" not in text and "\x1b" not in text
    assert "id\\nnl" in text and "bad\\nmodel\\x1b[2J" in text and "eve\\nmallory" in text


def test_tool_calls_are_shown_in_responses_and_chunks() -> None:
    from datetime import UTC, datetime

    from pipeline.cli.lines import _chunk, _response
    from schemas.request import FunctionCall, ToolCall
    from schemas.response import AIResponse
    from schemas.stream import FunctionDelta, StreamChunk, ToolCallDelta

    call = ToolCall(id="call_1", function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'))
    line = _response(AIResponse(id="r", status="ok", provider="openai", model="gpt-4o", tool_calls=[call]))
    assert line.endswith('finish=tool_calls get_weather({"city":"Paris"}) id=call_1')
    piece = FunctionDelta(name="get_weather", arguments="{")
    delta = ToolCallDelta(index=0, id="call_1", type="function", function=piece)
    at = datetime.now(UTC)
    chunk = StreamChunk(id="r", seq=0, generation="g", delta="", attempt=0, tool_call_deltas=[delta], at=at)
    assert _chunk(chunk).endswith("'' tool[0] get_weather id=call_1 +'{'")
