"""How long a restore takes with a month of archived traffic at 10 requests/s (DESIGN A11).

    .venv/bin/python bench/restore_time.py [--rate 10] [--days 30] [--hours-today 20]

Writes an archive as ``aipipe run`` leaves it after ``--days`` closed days and
``--hours-today`` hours of today at ``--rate`` requests/s, in a temporary
directory: for each request a request, a response, a cost event and a
``health`` event (what the archive stage writes), plus a budget command and a
strategy switch. Closed days are written as the archive closes them (their
summaries, and a compressed file of their records); today is an open JSON
Lines file per topic. Then it times ``plan_restore`` (what ``aipipe run``
does before its stages start, minus publishing) and prints what it read.

Closed days are read only through their summaries, so their size does not
change the restore time; today's ``control`` and ``costs`` files are read
whole and the last hour of ``requests`` and ``responses`` is found by a
binary search. Generating a closed day's records would take as long as
writing them, so by default each closed day's compressed file holds one
hour of records (the restore does not open it); ``--full-days`` writes
them whole.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from pipeline.assembly.restore import plan_restore
from pipeline.bus.topics import Topics
from pipeline.runtime.config import preset
from pipeline.stores.archive_store import FileArchive
from schemas.archive import ArchiveLine, ControlSummary, CostSummary
from schemas.events import CostEvent, CostLine, Health, SetBudget, SetStrategy
from schemas.response import Usage
from stages.rules.archive_state import ControlFold, CostRollup

T = Topics("ai.")
ENC = msgspec.json.Encoder()
USAGE = Usage(prompt_tokens=120, completion_tokens=80, total_tokens=200)


def _records(start: datetime, seconds: int, rate: int) -> dict[str, list[bytes]]:
    """The archive lines of ``seconds`` of traffic from ``start`` at ``rate`` requests/s, per topic."""
    out: dict[str, list[bytes]] = {t: [] for t in (T.requests, T.responses, T.costs, T.control)}
    offset = 0
    base_ms = int(start.timestamp() * 1000)
    for i in range(seconds * rate):
        ts = base_ms + i * 1000 // rate
        at = datetime.fromtimestamp(ts / 1000, UTC)
        rid = f"req-{ts}-{i}"
        user = f"user-{i % 200}"
        request = {
            "id": rid,
            "model": "gpt-4o-mini",
            "prompt": "Explain the difference between TCP and UDP. " * 6,
            "user": user,
            "max_tokens": 256,
        }
        response = {
            "id": rid,
            "status": "ok",
            "content": "TCP is connection-oriented ... " * 8,
            "provider": "openai",
            "model": "gpt-4o-mini",
            "usage": msgspec.to_builtins(USAGE),
            "cost_usd": 0.000066,
            "latency_ms": 420.0,
        }
        cost = CostEvent(
            id=rid,
            user=user,
            provider="openai",
            model="gpt-4o-mini",
            usage=USAGE,
            cost_usd=0.000066,
            at=at,
            lines=[CostLine(provider="openai", model="gpt-4o-mini", usage=USAGE, cost_usd=0.000066)],
        )
        health = Health(
            provider="openai",
            model="gpt-4o-mini",
            ok=True,
            status_code=200,
            latency_ms=410.0,
            request_id=rid,
            at=at,
            usage=USAGE,
            cost_usd=0.000066,
        )
        partition = i % 6
        for topic, value in ((T.requests, request), (T.responses, response), (T.costs, cost), (T.control, health)):
            line = ArchiveLine(
                broker_id="embedded-bench",
                partition=partition,
                offset=offset,
                timestamp_ms=ts,
                key=rid,
                headers={"aipipe-schema": "3"},
            )
            line.value = msgspec.Raw(ENC.encode(value))
            out[topic].append(ENC.encode(line))
        offset += 1
    return out


def main(args: argparse.Namespace) -> int:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if args.archive:  # time an archive written by an earlier run again
        return _time(Path(args.archive), today, args)
    root = Path(tempfile.mkdtemp(prefix="aipipe-restore-")) / "archive"
    written = time.monotonic()
    fold = ControlFold()
    commands = [
        SetBudget(scope="user:user-1", daily_usd=5.0, at=today - timedelta(days=args.days)),
        SetStrategy(name="cost_optimized", at=today - timedelta(days=args.days)),
    ]
    for command in commands:
        fold.add(command)
    total = 0
    for back in range(args.days, 0, -1):
        day = today - timedelta(days=back)
        name = day.date().isoformat()
        hours = 24 if args.full_days else 1
        records = _records(day, hours * 3600, args.rate)
        rollup = CostRollup()
        for line in records[T.costs]:
            event = msgspec.json.decode(msgspec.json.decode(line, type=ArchiveLine).raw_value(), type=CostEvent)
            for hour in range(24 // hours):  # one hour written stands for every hour of the day
                rollup.add(msgspec.structs.replace(event, at=event.at + timedelta(hours=hour)))
        for topic, lines in records.items():
            folder = root / topic
            folder.mkdir(parents=True, exist_ok=True)
            with gzip.open(folder / f"{name}.jsonl.gz", "wb") as f:
                f.write(b"\n".join(lines) + b"\n")
            (folder / f"{name}.meta.json").write_bytes(ENC.encode({"records": args.rate * 86400}))
        (root / T.costs / f"{name}.summary.json").write_bytes(
            ENC.encode(CostSummary(day=name, records=args.rate * 86400, buckets=rollup.to_buckets()))
        )
        summary: ControlSummary = fold.summary(name, args.rate * 86400)
        (root / T.control / f"{name}.summary.json").write_bytes(ENC.encode(summary))
        total += args.rate * 86400
    for hour in range(args.hours_today):  # an hour at a time, appended: memory stays small
        records = _records(today + timedelta(hours=hour), 3600, args.rate)
        for topic, lines in records.items():
            with (root / topic / f"{today.date().isoformat()}.jsonl").open("ab") as f:
                f.write(b"\n".join(lines) + b"\n")
    total += args.rate * args.hours_today * 3600
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(
        f"archive written in {time.monotonic() - written:.0f} s: {args.days} closed days + {args.hours_today} h "
        f"today at {args.rate} requests/s = {total:,} requests; {size / 2**20:.0f} MiB on disk at {root}"
    )
    return _time(root, today, args)


def _time(root: Path, today: datetime, args: argparse.Namespace) -> int:
    archive = FileArchive(root, T)
    config = preset("development")
    timings = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        at = today + timedelta(hours=args.hours_today, minutes=1)  # a restart just after the last record
        plan = plan_restore(archive, T, config, at, close_days=False)
        timings.append(time.perf_counter() - started)
    print(
        f"restore plan: {min(timings):.2f} s best of {args.repeat} ({', '.join(f'{t:.2f}' for t in timings)}): "
        f"{plan.summary()}"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=10, help="requests per second")
    parser.add_argument("--days", type=int, default=30, help="closed days")
    parser.add_argument("--hours-today", type=int, default=20, help="hours of today's open files")
    parser.add_argument("--full-days", action="store_true", help="write every closed day whole (slow, large)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--archive", help="time this archive (written by an earlier run) instead of writing one")
    sys.exit(main(parser.parse_args()))
