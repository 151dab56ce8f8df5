"""Replay by time range, re-pricing, and the audit reconciliation (issue: delivery, replay, audit)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.client.replay import audit, parse_time, read_range, reprice, stream_topics_of
from schemas import AIRequest, AIResponse, CostEvent, Usage
from schemas.events import CostLine
from schemas.response import ErrorInfo
from schemas.stream import StreamChunk
from stages.rules.pricing import PriceTable
from tests.harness import Harness

AT = datetime(2026, 11, 1, tzinfo=UTC)


def _event(
    rid: str, provider: str, model: str, prompt: int, completion: int, cost: float, cached: bool = False
) -> CostEvent:
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    return CostEvent(
        id=rid, user=None, provider=provider, model=model, usage=usage, cost_usd=cost, cached=cached, at=AT
    )


PRICES = """
[openai."m1"]
usd_per_mtok_input = 1.0
usd_per_mtok_output = 4.0
source = "test"
as_of = 2026-11-01

[anthropic."m2"]
usd_per_mtok_input = 2.0
usd_per_mtok_output = 10.0
source = "test"
as_of = 2026-11-01
"""


def test_reprice_with_doubled_output_prices_gives_exact_totals() -> None:
    base = PriceTable.loads(PRICES)
    doubled = PriceTable.loads(PRICES.replace("4.0", "8.0").replace("10.0", "20.0"))
    events = [
        _event("a", "openai", "m1", 1000, 500, 0.003),  # 1000*1 + 500*4 = 3000 per M
        _event("b", "openai", "m1", 2000, 1000, 0.006),
        _event("c", "anthropic", "m2", 100, 100, 0.0012),  # 100*2 + 100*10
        _event("d", "anthropic", "m2", 100, 100, 0.0, cached=True),
    ]
    same = reprice(events, base)
    assert same.new_total_usd == same.old_total_usd == Decimal("0.0102")
    report = reprice(events, doubled)
    lines = {(ln.provider, ln.model): ln for ln in report.lines.values()}
    assert lines[("openai", "m1")].new_usd == Decimal("0.015")  # 3000+6000 -> 1000+4000 + 2000+8000
    assert lines[("anthropic", "m2")].new_usd == Decimal("0.0022")
    assert lines[("anthropic", "m2")].events == 2
    assert report.new_total_usd == Decimal("0.0172")
    assert report.to_dict()["new_total_usd"] == 0.0172


def _rec(key: str, value: bytes = b"{}") -> Record:
    return Record(topic="ai.requests", partition=0, offset=0, key=key.encode(), value=value)


def test_audit_finds_missing_conflicting_and_cost_problems() -> None:
    ok = AIResponse(id="a", status="ok", content="x", provider="openai", model="m")
    requests = [_rec(i) for i in ("a", "b", "c", "d", "e")]
    responses = [
        ok,
        msgspec.structs.replace(ok),  # identical duplicate: allowed
        AIResponse(id="b", status="ok", content="y", provider="openai", model="m"),
        AIResponse(id="b", status="ok", content="DIFFERENT", provider="openai", model="m"),
        AIResponse(id="c", status="ok", content="z", provider="anthropic", model="m", cached=True),
        AIResponse(id="d", status="error"),
    ]
    costs = [
        _event("a", "openai", "m", 1, 1, 0.5),
        _event("b", "openai", "m", 1, 1, 0.25),
        _event("b", "openai", "m", 1, 1, 0.25),
    ]
    report = audit(requests, responses, costs)
    assert report.requests == 5 and report.responses == 4
    assert report.missing_responses == ["e"]
    assert report.conflicting == ["b"]
    assert report.duplicate_responses == ["a"]
    assert report.missing_costs == ["c"]
    assert report.extra_costs == ["b"]
    assert report.totals_usd == {"openai": 0.75}
    assert not report.clean
    again = audit(
        [
            _rec("a", b'{"prompt": "one"}'),
            _rec("a", b'{"prompt": "one"}'),
            _rec("b", b'{"prompt": "x"}'),
            _rec("b", b'{"prompt": "y"}'),
        ],
        [ok],
        [],
    )
    assert again.reused_ids == ["b"]


def test_audit_counts_interrupted_streams_and_splits_continued_answers_by_line() -> None:
    cut = AIResponse(
        id="s1", status="error", content="part", cost_usd=0.1, error=ErrorInfo(type="stream_interrupted", message="cut")
    )
    resumed = AIResponse(id="s2", status="ok", content="whole", provider="openai", model="m", cost_usd=0.3)
    unbilled = AIResponse(
        id="s3", status="error", content="part", cost_usd=0.2, error=ErrorInfo(type="cancelled", message="gone")
    )
    lines = [
        CostLine(provider="cloudflare", model="c", usage=Usage(), cost_usd=0.1),
        CostLine(provider="openai", model="m", usage=Usage(), cost_usd=0.2),
    ]
    costs = [
        msgspec.structs.replace(_event("s1", "cloudflare", "c", 1, 1, 0.1), status="stream_interrupted"),
        msgspec.structs.replace(_event("s2", "openai", "m", 1, 1, 0.3), lines=lines),
        _event("zz", "openai", "m", 1, 1, 0.5),  # no response at all: an orphan
    ]
    report = audit([_rec(i) for i in ("s1", "s2", "s3")], [cut, resumed, unbilled], costs)
    assert report.orphan_costs == ["zz"]
    assert report.missing_costs == ["s3"]  # a cancelled stream that cost something has no cost event
    assert report.totals_usd == {"cloudflare": 0.2, "openai": 0.7}


def test_audit_checks_each_stream_against_its_final_generation() -> None:
    def chunk(rid: str, gen: str, seq: int, delta: str) -> StreamChunk:
        return StreamChunk(id=rid, seq=seq, generation=gen, delta=delta, at=AT)

    good = AIResponse(id="g", status="ok", content="Hello world", generation="B", stream_chunks=2)
    short = AIResponse(id="s", status="ok", content="abc", generation="A", stream_chunks=2)
    plain = AIResponse(id="p", status="ok", content="not streamed")
    chunks = [
        chunk("g", "A", 0, "Hel"),  # an earlier generation (a redelivery): not the record
        chunk("g", "B", 0, "Hello "),
        chunk("g", "B", 0, "Hello "),  # a repeat: counted once
        chunk("g", "B", 1, "world"),
        chunk("s", "A", 0, "ab"),  # its second chunk never arrived
    ]
    report = audit([_rec(i) for i in "gsp"], [good, short, plain], [], chunks)
    assert report.streams == 2 and report.stream_mismatches == ["s"] and not report.clean
    topics = Topics("ai.")
    records = [
        _rec("x", b'{"id": "x", "stream_topic": "ai.stream.serve-h-1"}'),
        _rec("y", b'{"stream_topic": "ai.control"}'),
    ]
    assert stream_topics_of(records, topics) == {"ai.stream", "ai.stream.serve-h-1"}


def test_parse_time_accepts_dates_and_zones() -> None:
    assert parse_time("2026-11-29") == datetime(2026, 11, 29, tzinfo=UTC)
    assert parse_time("2026-11-29T10:00:00+09:00") == datetime(2026, 11, 29, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


@pytest.mark.kafka
@pytest.mark.parametrize("pipe", ["kafka"], indirect=True)
async def test_replay_and_audit_over_the_live_topics(pipe: Harness, emu: Any, tmp_path: Path) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    ids = [f"audit-{i}" for i in range(6)]
    for rid in ids:
        req = msgspec.convert({"id": rid, "model": "chat-small", "prompt": f"audit {rid}"}, AIRequest)
        assert (await pipe.client.request(req)).status == "ok"
    records = await read_range(pipe.bus, pipe.topics.costs, start, None, idle_s=0.5)
    mine = [r for r in records if r.key and r.key.decode(errors="replace") in ids]  # other tests may use odd keys
    assert len(mine) == len(ids)
    # nothing before `since`: a window in the past is empty
    assert (
        await read_range(pipe.bus, pipe.topics.costs, start - timedelta(days=2), start - timedelta(days=1), idle_s=0.5)
        == []
    )

    env = {
        "AIPIPE_KAFKA_BOOTSTRAP": pipe.bootstrap or "",
        "AIPIPE_TOPIC_PREFIX": pipe.topics.prefix,
        "PATH": "/usr/bin:/bin",
        "AIPIPE_HOME": str(tmp_path),
    }
    out_file = anyio.Path(tmp_path / "costs.jsonl")
    cli = [sys.executable, "-m", "pipeline.cli"]
    replay = await anyio.run_process(
        [*cli, "replay", "costs", "--since", start.isoformat(), "--out", str(out_file), "--idle-s", "0.5", "--json"],
        env=env,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr.decode()
    lines = [json.loads(x) for x in (await out_file.read_text()).splitlines()]
    assert {x["id"] for x in lines} >= set(ids)

    result = await anyio.run_process(
        [*cli, "audit", "--since", start.isoformat(), "--idle-s", "0.5", "--json"], env=env, check=False
    )
    report = json.loads(result.stdout)
    assert report["missing_responses"] == [] and report["missing_costs"] == [] and report["extra_costs"] == []
    assert report["clean"] is True and result.returncode == 0
    assert report["ok"] >= len(ids)
