"""The archive on disk: group-commit writes, reads by time once per record, kill -9 leftovers, closing days."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import msgspec
import pytest

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.stores.archive_store import FileArchive, archive_line, as_record
from schemas.archive import ControlSummary, CostSummary
from schemas.events import CostEvent, SetBudget, SetStrategy
from schemas.response import Usage

T = Topics("ai.")
DAY_MS = 86_400_000


def _record(topic: str, offset: int, ts: int, value: bytes, key: bytes | None = b"k", partition: int = 0) -> Record:
    return Record(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=(("traceparent", b"00-abc"), ("bin", b"\xff\x00")),
        timestamp_ms=ts,
    )


def test_a_line_keeps_json_values_and_the_exact_bytes_of_anything_else() -> None:
    pretty = _record(T.requests, 1, 5, b'{\n  "id": "r1"\n}', key=b"\xfe")
    line = archive_line(pretty, "b1")
    encoded = msgspec.json.encode(line)
    assert b"\n" not in encoded and json.loads(encoded)["value"] == {"id": "r1"}
    back = as_record(T.requests, msgspec.json.decode(encoded, type=type(line)))
    assert back.key == b"\xfe" and back.header("bin") == b"\xff\x00" and json.loads(back.value) == {"id": "r1"}
    garbage = archive_line(_record(T.requests, 2, 5, b"\x00not json"), "b1")
    assert as_record(T.requests, msgspec.json.decode(msgspec.json.encode(garbage), type=type(line))).value == (
        b"\x00not json"
    )


async def test_writes_wait_for_the_group_commit_and_reads_count_each_record_once(tmp_path: Path) -> None:
    archive = FileArchive(tmp_path, T, flush_ms=50)
    now = int(datetime.now(UTC).timestamp() * 1000)
    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(archive.write, T.costs, archive_line(_record(T.costs, i, now + i, b'{"n": %d}' % i), "b1"))
    # a redelivery after a crash archives the same record again; a new broker restarts offsets at 0
    await archive.write(T.costs, archive_line(_record(T.costs, 0, now, b'{"n": 0}'), "b1"))
    await archive.write(T.costs, archive_line(_record(T.costs, 0, now + 500, b'{"n": "new"}'), "b2"))
    await archive.aclose()
    assert archive.lines_written == 302
    values = [json.loads(line.raw_value())["n"] for line in archive.read(T.costs)]
    assert len(values) == 301 and values.count(0) == 1 and "new" in values
    assert [json.loads(x.raw_value())["n"] for x in archive.read(T.costs, since_ms=now + 290, until_ms=now + 295)] == [
        290,
        291,
        292,
        293,
        294,
    ]
    [stats] = archive.stats()
    assert (stats.topic, stats.records, stats.closed) == (T.costs, 302, False)


async def test_a_half_written_last_line_is_skipped_and_the_next_append_starts_a_new_line(tmp_path: Path) -> None:
    archive = FileArchive(tmp_path, T, flush_ms=10)
    now = int(datetime.now(UTC).timestamp() * 1000)
    await archive.write(T.responses, archive_line(_record(T.responses, 0, now, b'{"id": "a"}'), "b1"))
    await archive.aclose()
    [path] = (tmp_path / T.responses).glob("*.jsonl")
    with path.open("ab") as f:
        f.write(b'{"broker_id":"b1","partition":0,"offs')  # kill -9 in the middle of a write
    reopened = FileArchive(tmp_path, T, flush_ms=10)
    await reopened.write(T.responses, archive_line(_record(T.responses, 2, now + 1, b'{"id": "c"}'), "b1"))
    await reopened.aclose()
    ids = [json.loads(x.raw_value())["id"] for x in reopened.read(T.responses)]
    assert ids == ["a", "c"] and reopened.skipped_lines == 1


def _cost(rid: str, at: datetime, usd: float, user: str = "alice") -> bytes:
    event = CostEvent(
        id=rid,
        user=user,
        provider="openai",
        model="gpt-4o",
        usage=Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
        cost_usd=usd,
        at=at,
    )
    return msgspec.json.encode(event)


async def test_closing_a_day_compresses_it_and_summarizes_costs_and_control(tmp_path: Path) -> None:
    archive = FileArchive(tmp_path, T, flush_ms=10)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    ts = int(yesterday.timestamp() * 1000)
    for i in range(10):
        await archive.write(T.costs, archive_line(_record(T.costs, i, ts + i, _cost(f"r{i}", yesterday, 0.25)), "b1"))
    commands = [
        SetBudget(scope="user:alice", daily_usd=5.0, at=yesterday),
        SetBudget(scope="user:alice", monthly_usd=50.0, at=yesterday + timedelta(seconds=1)),
        SetStrategy(name="cost_optimized", at=yesterday),
    ]
    for i, command in enumerate(commands):
        await archive.write(T.control, archive_line(_record(T.control, i, ts + i, msgspec.json.encode(command)), "b1"))
    await archive.aclose()
    closed = archive.close_days(datetime.now(UTC))
    assert sorted(t for t, _ in closed) == [T.control, T.costs]
    day = yesterday.date().isoformat()
    assert not (tmp_path / T.costs / f"{day}.jsonl").exists()
    with gzip.open(tmp_path / T.costs / f"{day}.jsonl.gz") as f:
        assert len(f.read().splitlines()) == 10
    costs = msgspec.json.decode((tmp_path / T.costs / f"{day}.summary.json").read_bytes(), type=CostSummary)
    assert costs.records == 10 and sum(b.cost_usd for b in costs.buckets) == pytest.approx(2.5)
    assert sum(b.requests for b in costs.buckets) == 10
    control = msgspec.json.decode((tmp_path / T.control / f"{day}.summary.json").read_bytes(), type=ControlSummary)
    assert control.budgets == {"user:alice": {"daily": 5.0, "monthly": 50.0}}
    assert control.strategy is not None and control.strategy.name == "cost_optimized"
    assert [s.records for s in archive.stats() if s.topic == T.costs] == [10]
    assert len(list(archive.read(T.costs))) == 10  # a closed day still reads
    # retention: a 400-day topic keeps yesterday; with 0 days left it goes, but not the latest control summary
    archive.retention_days = {"costs": 1, "control": 1}
    assert archive.apply_retention(datetime.now(UTC) + timedelta(days=3)) > 0
    assert archive.days(T.costs) == []
    assert archive.control_summary_before(T.control, "9999-12-31") is not None


async def _two_days_of_costs(tmp_path: Path) -> tuple[FileArchive, str]:
    archive = FileArchive(tmp_path, T, flush_ms=10)
    yesterday = datetime.now(UTC) - timedelta(days=1)
    ts = int(yesterday.timestamp() * 1000)
    for i in range(4):
        await archive.write(T.costs, archive_line(_record(T.costs, i, ts + i, _cost(f"r{i}", yesterday, 0.5)), "b1"))
    await archive.aclose()
    return archive, yesterday.date().isoformat()


def _spent(archive: FileArchive, day: str) -> float:
    return sum(b.cost_usd for s in archive.cost_summaries(T.costs, day) for b in s.buckets)


@pytest.mark.parametrize("crash_after", ["rename", "staged", "gzip"])
async def test_a_day_close_interrupted_by_a_crash_is_finished_once(tmp_path: Path, crash_after: str) -> None:
    archive, day = await _two_days_of_costs(tmp_path)
    folder = tmp_path / T.costs
    finish = archive._finish_closing
    calls = []

    def crashing(topic: str, d: str) -> None:  # the state a kill -9 leaves at each step
        calls.append(d)
        closing = folder / f"{d}.closing"
        if crash_after == "rename":
            return
        if crash_after == "staged":
            (folder / f"{d}.close.new").write_bytes(b'{"meta": {"records": 99}, "summary": null}')
            return
        # killed after the .gz got the lines, before the .closing file was removed
        kept = closing.read_bytes()
        finish(topic, d)
        (folder / f"{d}.summary.json").unlink()
        (folder / f"{d}.meta.json").unlink()
        closing.write_bytes(kept)
        (folder / f"{d}.close.new").write_bytes(b'{"meta": {"records": 99}, "summary": null}')

    archive._finish_closing = crashing  # type: ignore[method-assign]
    archive.close_days(datetime.now(UTC))
    assert calls == [day]
    archive._finish_closing = finish  # type: ignore[method-assign]
    reopened = FileArchive(tmp_path, T)
    reopened.recover()
    assert not (folder / f"{day}.closing").exists() and not (folder / f"{day}.close.new").exists()
    assert _spent(reopened, day) == pytest.approx(2.0)  # four events of $0.50, once
    assert [s.records for s in reopened.stats() if s.topic == T.costs] == [4]
    reopened.recover()  # again: nothing changes
    assert _spent(reopened, day) == pytest.approx(2.0)


async def test_a_missing_or_corrupt_summary_is_rebuilt_and_stray_entries_are_skipped(tmp_path: Path) -> None:
    archive, day = await _two_days_of_costs(tmp_path)
    archive.close_days(datetime.now(UTC))
    (tmp_path / T.costs / f"{day}.summary.json").write_bytes(b"{bad json")
    (tmp_path / T.costs / "2026-12-04.jsonl").mkdir()  # a directory named like a day file
    (tmp_path / T.costs / "notaday.jsonl").write_bytes(b"{}\n")
    (tmp_path / T.costs / "2026-02-30.jsonl").write_bytes(b"{}\n")
    reopened = FileArchive(tmp_path, T)
    assert reopened.days(T.costs) == [day]
    assert _spent(reopened, day) == pytest.approx(2.0)  # rebuilt from the day's records
    assert _spent(FileArchive(tmp_path, T), day) == pytest.approx(2.0)  # and written back
    assert len(list(reopened.read(T.costs))) == 4
    assert reopened.close_days(datetime.now(UTC)) == []
