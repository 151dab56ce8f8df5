"""The CLI as people use it (issue 17, item 8), against one `aipipe run --emulate` for the module."""

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

from schemas.request import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TIMEOUT_MS

pytestmark = pytest.mark.kafka

AIPIPE = [sys.executable, "-m", "pipeline.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIPIPE_", "OPENAI_", "ANTHROPIC_", "CLOUDFLARE_", "LOG_LEVEL", "COLUMNS"))}
    env.update({"AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIPIPE, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def running(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`aipipe run --emulate` on the session broker under a topic prefix of its own."""
    base = tmp_path_factory.mktemp("cli-as-used")
    prefix = f"cli{int(time.time() * 1000) % 10**9}."
    env = _env(AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap, AIPIPE_TOPIC_PREFIX=prefix, AIPIPE_HOME=str(base / "home"))
    log = (base / "run.log").open("wb")
    proc = subprocess.Popen([*AIPIPE, "run", "--emulate"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield env
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        text = (base / "run.log").read_text()
        assert code == 0, text
        assert "Traceback" not in text, text


def _send(env: dict[str, str], *args: str) -> dict[str, object]:
    out = _cli(env, "send", "Name three rivers in Europe.", "--model", "gpt-3.5-turbo", "--json", *args)
    assert out.returncode == 0, out.stderr
    value: dict[str, object] = json.loads(out.stdout)
    return value


def _budget(env: dict[str, str], scope: str) -> dict[str, object]:
    out = _cli(env, "budget", "status", scope, "--json")
    assert out.returncode == 0, out.stderr
    (report,) = json.loads(out.stdout)
    return {w: report[w]["limit_usd"] for w in ("daily", "weekly", "monthly")}


def test_budget_set_changes_only_the_windows_it_names(running: dict[str, str]) -> None:
    scope = "user:cli-merge"
    assert _cli(running, "budget", "set", scope, "--daily", "5").returncode == 0
    out = _cli(running, "budget", "set", scope, "--monthly", "100")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"budget {scope}: monthly $100") and "daily" not in out.stdout
    assert _budget(running, scope) == {"daily": 5.0, "weekly": None, "monthly": 100.0}
    again = _cli(running, "budget", "set", scope, "--monthly", "100")  # the same limit: still acknowledged
    assert again.returncode == 0 and "(applied by a budget gate)" in again.stdout, again.stdout
    assert _cli(running, "budget", "set", scope, "--daily", "none").returncode == 0  # one window removed
    assert _budget(running, scope) == {"daily": None, "weekly": None, "monthly": 100.0}

    nothing = _cli(running, "budget", "set", scope)  # no window: a usage error, nothing published
    assert nothing.returncode == 2 and "--clear" in nothing.stderr
    assert _budget(running, scope) == {"daily": None, "weekly": None, "monthly": 100.0}

    both = _cli(running, "budget", "set", scope, "--clear", "--daily", "1")
    assert both.returncode == 2
    cleared = _cli(running, "budget", "set", scope, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert _budget(running, scope) == {"daily": None, "weekly": None, "monthly": None}


def test_send_takes_the_request_defaults_and_tail_prints_a_line_per_value(
    running: dict[str, str], tmp_path: Path
) -> None:
    rid = "cli-defaults-1"
    answer = _send(running, "--id", rid)
    assert answer["status"] == "ok"

    out = tmp_path / "requests.jsonl"
    replay = _cli(running, "replay", "requests", "--since", "2026-01-01T00:00:00Z", "--idle-s", "1", "--out", str(out))
    assert replay.returncode == 0, replay.stderr
    (request,) = [json.loads(line) for line in out.read_text().splitlines() if f'"{rid}"' in line]
    assert request.get("max_tokens", DEFAULT_MAX_TOKENS) == DEFAULT_MAX_TOKENS == 1024  # the README's defaults
    assert request.get("timeout_ms", DEFAULT_TIMEOUT_MS) == DEFAULT_TIMEOUT_MS == 60_000
    assert request.get("temperature", DEFAULT_TEMPERATURE) == DEFAULT_TEMPERATURE

    for topic, must in (("requests", "  request  "), ("stage.execute", "  envelope "), ("responses", "  response "),
                        ("costs", "  cost     "), ("control", "  ")):
        line = _cli(running, "tail", topic, "--from-beginning", "--limit", "1", timeout=60)
        assert line.returncode == 0, line.stderr
        assert line.stderr == "", line.stderr  # no log history
        (text,) = line.stdout.splitlines()
        assert must in text and "{" not in text, (topic, text)
        raw = _cli(running, "tail", topic, "--from-beginning", "--limit", "1", "--json", timeout=60)
        assert isinstance(json.loads(raw.stdout), dict)
    response = _cli(running, "tail", "responses", "--from-beginning", "--limit", "1").stdout
    assert " ok " in response and "ms " in response and "$" in response and '"' in response


def test_status_and_strategy_show_print_their_output_and_no_log_history(running: dict[str, str]) -> None:
    for args in (("status",), ("strategy", "show"), ("costs",), ("budget", "status")):
        out = _cli(running, *args)
        assert out.returncode == 0, (args, out.stderr)
        assert out.stderr == "", (args, out.stderr)
        assert " INFO " not in out.stdout and "aipipe." not in out.stdout.splitlines()[0], (args, out.stdout)


def test_replay_says_how_many_records_it_read(running: dict[str, str]) -> None:
    _send(running, "--id", "cli-replay-1")
    out = _cli(running, "replay", "responses", "--since", "2026-01-01T00:00:00Z", "--idle-s", "1")
    assert out.returncode == 0, out.stderr
    read = [line for line in out.stderr.splitlines() if line.startswith("read ")]
    assert read and read[-1].endswith(f"records of {running['AIPIPE_TOPIC_PREFIX']}responses"), out.stderr
    count = int(read[-1].split()[1])
    assert count >= 1
    assert out.stdout.startswith(f"{count} records of ")


def test_a_response_is_keyed_with_the_requests_own_key_bytes(running: dict[str, str]) -> None:
    prefix = running["AIPIPE_TOPIC_PREFIX"]
    bootstrap = running["AIPIPE_KAFKA_BOOTSTRAP"]
    cases = {  # response id -> (key bytes sent, key bytes expected on the response)
        "kb-binary": (b"\xff\xfe\x00tenant-7", b"\xff\xfe\x00tenant-7"),  # not UTF-8
        "kb-other": (b"session-42", b"session-42"),  # a key that is not the id
        "kb-none": (None, b"kb-none"),  # no key: keyed by the id
    }
    producer = Producer({"bootstrap.servers": bootstrap})
    for rid, (key, _) in cases.items():
        body = {"id": rid, "model": "gpt-3.5-turbo", "prompt": "Say hello.", "max_tokens": 16}
        producer.produce(f"{prefix}requests", key=key, value=json.dumps(body).encode())
    producer.produce(f"{prefix}requests", key=b"\xfe\xfe-bad", value=b"not json")  # invalid: answered too
    assert producer.flush(10) == 0

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{prefix}keys", "enable.auto.commit": False})
    topic = f"{prefix}responses"
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    keys: dict[str, bytes | None] = {}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (len(set(keys) & set(cases)) < len(cases) or b"bad" not in
                                               b"".join(k or b"" for k in keys.values())):
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            keys.setdefault(json.loads(msg.value())["id"], msg.key())
    finally:
        consumer.close()
    for rid, (_, expected) in cases.items():
        assert keys.get(rid) == expected, (rid, keys.get(rid))
    assert b"\xfe\xfe-bad" in keys.values()  # the invalid request's error response keeps its raw key


def test_every_unreadable_file_argument_is_named(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    missing = tmp_path / "missing.toml"
    env = _env(AIPIPE_HOME=str(tmp_path / "home"), AIPIPE_KAFKA_BOOTSTRAP="127.0.0.1:1",
               AIPIPE_KAFKA_START_TIMEOUT_S="1")
    for path in (missing, tmp_path, binary, bad):
        for args, extra in ((("status",), {"AIPIPE_CONFIG": str(path)}),
                            (("emulator", "--profile", str(path), "--port", "0"), {}),
                            (("replay", "costs", "--since", "2026-01-01", "--reprice", str(path)), {}),
                            (("serve", "--port", "0"), {"AIPIPE_API_KEYS": str(path)})):
            out = _cli({**env, **extra}, *args, timeout=30)
            assert out.returncode != 0, (args, path)
            assert str(path) in out.stderr, (args, path, out.stderr)
            assert "Traceback" not in out.stderr, (args, path, out.stderr)
    out = _cli(env, "replay", "costs", "--since", "2026-01-01", "--out", str(tmp_path / "no-dir" / "x.jsonl"),
               "--idle-s", "0.5", timeout=30)
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_the_demo_table_fits_80_columns_and_is_whole_when_wide(tmp_path: Path) -> None:
    for columns, widest in (("80", 80), ("160", 160)):
        out = _cli(_env(COLUMNS=columns, AIPIPE_HOME=str(tmp_path / f"home{columns}")), "demo", "--count", "2",
                   timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert max(len(line) for line in lines) <= widest, out.stdout
        header = next(line for line in lines if "provider" in line and "status" in line)
        assert ("latency" in header) == (columns == "160"), header  # the narrow table drops columns
