"""`aipipe archive stats` and `replay`/`audit --source archive`, on an archive written by the archive's own writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import msgspec

from pipeline.bus.protocol import Record
from pipeline.bus.topics import Topics
from pipeline.stores.archive_store import FileArchive, archive_line
from schemas.events import CostEvent
from schemas.response import Usage

AIPIPE = [sys.executable, "-m", "pipeline.cli"]
T = Topics("ai.")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env["AIPIPE_HOME"] = str(home)
    return env


async def _archive(home: Path) -> datetime:
    archive = FileArchive(home / "archive", T, flush_ms=5)
    at = datetime.now(UTC) - timedelta(minutes=5)
    ts = int(at.timestamp() * 1000)
    for i in range(3):
        rid = f"a-{i}"
        request = {"id": rid, "model": "gpt-4o", "prompt": "hi"}
        response = {
            "id": rid,
            "status": "ok",
            "content": "hello",
            "provider": "openai",
            "model": "gpt-4o",
            "cost_usd": 0.001,
        }
        cost = CostEvent(
            id=rid, user=None, provider="openai", model="gpt-4o", usage=Usage(total_tokens=3), cost_usd=0.001, at=at
        )
        for topic, value in (
            (T.requests, json.dumps(request).encode()),
            (T.responses, json.dumps(response).encode()),
            (T.costs, msgspec.json.encode(cost)),
        ):
            record = Record(topic=topic, partition=0, offset=i, key=rid.encode(), value=value, timestamp_ms=ts + i)
            await archive.write(topic, archive_line(record, "embedded-test"))
    await archive.aclose()
    return at


def test_archive_stats_and_audit_of_the_archive_need_no_broker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    at = anyio.run(_archive, home)
    env = _env(home)
    stats = subprocess.run([*AIPIPE, "archive", "stats", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    days = json.loads(stats.stdout)["days"]
    assert {(d["topic"], d["records"], d["closed"]) for d in days} == {
        (T.requests, 3, False),
        (T.responses, 3, False),
        (T.costs, 3, False),
    }
    table = subprocess.run([*AIPIPE, "archive", "stats"], env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "ai.costs" in table.stdout and "total" in table.stdout
    since = (at - timedelta(minutes=1)).isoformat()
    audit = subprocess.run(
        [*AIPIPE, "audit", "--since", since, "--source", "archive", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert audit.returncode == 0, audit.stderr
    report = json.loads(audit.stdout)
    assert (report["requests"], report["responses"], report["cost_events"], report["clean"]) == (3, 3, 3, True)
    # auto with no broker running: the archive alone, said once on stderr
    auto = subprocess.run(
        [*AIPIPE, "replay", "costs", "--since", since, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert auto.returncode == 0, auto.stderr
    assert json.loads(auto.stdout)["records"] == 3 and "reading the archive only" in auto.stderr
    broker = subprocess.run(
        [*AIPIPE, "replay", "costs", "--since", since, "--source", "broker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broker.returncode == 1 and "no broker" in broker.stderr


def test_archive_stats_of_an_empty_archive_says_so(tmp_path: Path) -> None:
    out = subprocess.run([*AIPIPE, "archive", "stats"], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "is empty" in out.stdout
    bad = subprocess.run([*AIPIPE, "archive"], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
