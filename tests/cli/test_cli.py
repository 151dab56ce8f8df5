"""The CLI as users run it: `aipipe run --emulate` in one process, clients in others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

pytestmark = pytest.mark.kafka

AIPIPE = [sys.executable, "-m", "pipeline.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPIPE_", "OPENAI_", "ANTHROPIC_", "CLOUDFLARE_"))}
    env.update({"LOG_LEVEL": "INFO", "AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "aipipe-home"


def _start_run(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen([*AIPIPE, "run", "--emulate"], env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture
def running(kafka_bootstrap: str, unique_prefix: str, home: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """`aipipe run --emulate` against the session broker, under a fresh topic prefix."""
    env = _env(AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap, AIPIPE_TOPIC_PREFIX=unique_prefix, AIPIPE_HOME=str(home))
    proc = _start_run(env, tmp_path / "run.log")
    try:
        yield env
    finally:
        code = _stop(proc)
        log = (tmp_path / "run.log").read_text()
        assert code == 0, log
        assert "Traceback" not in log, log


def test_confluent_kafka_producer_and_consumer_see_fifty_answers(running: dict[str, str]) -> None:
    prefix = running["AIPIPE_TOPIC_PREFIX"]
    bootstrap = running["AIPIPE_KAFKA_BOOTSTRAP"]
    ids = [f"ck-{i}" for i in range(50)]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, rid in enumerate(ids):
        body = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"MT-Bench style question number {i}",
                "max_tokens": 64}
        producer.produce(f"{prefix}requests", key=rid.encode(), value=json.dumps(body).encode())
    assert producer.flush(10) == 0

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}reader", "enable.auto.commit": False})
    deadline = time.monotonic() + 90
    meta = None
    while time.monotonic() < deadline:
        meta = consumer.list_topics(f"{prefix}responses", timeout=5).topics.get(f"{prefix}responses")
        if meta is not None and meta.partitions:
            break
        time.sleep(0.2)
    assert meta is not None
    consumer.assign([TopicPartition(f"{prefix}responses", p, OFFSET_BEGINNING) for p in meta.partitions])
    seen: dict[str, dict[str, object]] = {}
    try:
        while len(seen) < len(ids) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            value = json.loads(msg.value())
            assert msg.key().decode() == value["id"]
            seen.setdefault(value["id"], value)
    finally:
        consumer.close()
    assert sorted(seen) == sorted(ids)
    for value in seen.values():
        assert value["status"] == "ok"
        assert set(value) >= {"id", "status", "content", "provider", "model", "usage", "cost_usd", "latency_ms",
                              "cached", "attempts", "error"}
        assert value["cost_usd"] > 0 and value["content"]


def test_send_gets_its_answer_from_a_running_pipeline(running: dict[str, str]) -> None:
    out = subprocess.run(
        [*AIPIPE, "send", "Name three rivers in Europe.", "--model", "chat-small", "--json"],
        env=running, capture_output=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr.decode()
    value = json.loads(out.stdout)
    assert value["status"] == "ok" and value["provider"] == "cloudflare" and value["content"]


def test_send_stream_prints_the_answer_and_tail_shows_its_chunks(running: dict[str, str]) -> None:
    plain = subprocess.run(
        [*AIPIPE, "send", "Stream me rivers.", "--model", "chat-small", "--json", "--no-cache"],
        env=running, capture_output=True, timeout=90,
    )
    assert plain.returncode == 0, plain.stderr.decode()
    out = subprocess.run(
        [*AIPIPE, "send", "Stream me rivers.", "--model", "chat-small", "--stream", "--no-cache", "--id", "cli-st-1"],
        env=running, capture_output=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode() == json.loads(plain.stdout)["content"] + "\n"
    assert b"-- cloudflare/" in out.stderr
    tail = subprocess.run(
        [*AIPIPE, "tail", "stream", "--from-beginning", "--limit", "1"], env=running, capture_output=True, timeout=60
    )
    assert tail.returncode == 0, tail.stderr.decode()
    assert "chunk    cli-st-1 gen=" in tail.stdout.decode() and "#0 cloudflare/" in tail.stdout.decode()


def test_send_resume_without_stream_is_a_usage_error(home: Path) -> None:
    out = subprocess.run([*AIPIPE, "send", "hi", "--model", "gpt-3.5-turbo", "--resume"],
                         env=_env(AIPIPE_HOME=str(home)), capture_output=True, timeout=30)
    assert out.returncode == 2 and b"--resume needs --stream" in out.stderr


def test_send_with_an_unknown_model_exits_1_with_the_reason(running: dict[str, str]) -> None:
    out = subprocess.run([*AIPIPE, "send", "hi", "--model", "no-such-model"], env=running,
                         capture_output=True, timeout=90)
    assert out.returncode == 1
    assert b"model_not_found" in out.stderr


def test_send_with_nothing_running_fails_fast_and_clearly(home: Path) -> None:
    started = time.monotonic()
    out = subprocess.run([*AIPIPE, "send", "hi", "--model", "gpt-3.5-turbo"], env=_env(AIPIPE_HOME=str(home)),
                         capture_output=True, timeout=30)
    assert out.returncode == 1
    assert b"no broker: start `aipipe run` or set AIPIPE_KAFKA_BOOTSTRAP" in out.stderr
    assert time.monotonic() - started < 10


def test_run_starts_an_embedded_broker_that_send_and_tail_find(home: Path, tmp_path: Path) -> None:
    env = _env(AIPIPE_HOME=str(home))
    proc = _start_run(env, tmp_path / "run.log")
    try:
        deadline = time.monotonic() + 30
        while not (home / "broker").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            time.sleep(0.1)
        address = (home / "broker").read_text().strip()
        assert address.startswith("127.0.0.1:")
        out = subprocess.run([*AIPIPE, "send", "Say hello.", "--model", "gpt-3.5-turbo", "--json"], env=env,
                             capture_output=True, timeout=90)
        assert out.returncode == 0, out.stderr.decode()
        rid = json.loads(out.stdout)["id"]
        tail = subprocess.run([*AIPIPE, "tail", "responses", "--from-beginning", "--limit", "1", "--json"],
                              env=env, capture_output=True, timeout=60)
        assert tail.returncode == 0, tail.stderr.decode()
        assert json.loads(tail.stdout)["id"] == rid
    finally:
        code = _stop(proc)
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log
    assert address in log.splitlines()[0] or address in log
    assert not (home / "broker").exists()  # the process that started the broker removed the file


def test_usage_errors_exit_2() -> None:
    out = subprocess.run([*AIPIPE, "send"], capture_output=True, timeout=30, env=_env())
    assert out.returncode == 2
    out = subprocess.run([*AIPIPE, "tail", "nonsense"], capture_output=True, timeout=30,
                         env=_env(AIPIPE_KAFKA_BOOTSTRAP="127.0.0.1:1"))
    assert out.returncode == 2 and b"unknown topic" in out.stderr
    for bad in (["send", "hi", "--model", "m", "--max-tokens", "0"],
                ["send", "hi", "--model", "m", "--temperature", "5"],
                ["replay", "costs", "--since", "yesterday"], ["tail", "responses", "--limit", "0"],
                ["audit", "--since", "2026-11-29", "--until", "2020-01-01"]):
        out = subprocess.run([*AIPIPE, *bad], capture_output=True, timeout=30,
                             env=_env(AIPIPE_KAFKA_BOOTSTRAP="127.0.0.1:1"))
        assert out.returncode == 2, (bad, out.stderr)
    version = subprocess.run([*AIPIPE, "--version"], capture_output=True, timeout=30, env=_env())
    assert version.returncode == 0 and version.stdout.startswith(b"aipipe ")


def test_unreachable_bootstrap_fails_after_the_start_timeout_naming_the_address(home: Path) -> None:
    started = time.monotonic()
    out = subprocess.run(
        [*AIPIPE, "send", "hi", "--model", "gpt-3.5-turbo"],
        env=_env(AIPIPE_HOME=str(home), AIPIPE_KAFKA_BOOTSTRAP="127.0.0.1:1", AIPIPE_KAFKA_START_TIMEOUT_S="1.5"),
        capture_output=True, timeout=30,
    )
    assert out.returncode == 1
    assert b"no Kafka broker answered at 127.0.0.1:1 within 1.5 s" in out.stderr
    assert 1.0 < time.monotonic() - started < 15
