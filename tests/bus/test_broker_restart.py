"""A broker restart while the stages run: they reconnect and go on answering."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from pipeline.bus.embedded import EmbeddedBroker
from pipeline.errors import ProviderTimeoutError
from schemas import AIRequest
from tests.harness import harness

pytestmark = pytest.mark.kafka


def _req(rid: str) -> AIRequest:
    return msgspec.convert({"id": rid, "model": "gpt-3.5-turbo", "prompt": f"restart {rid}"}, AIRequest)


async def test_stages_reconnect_after_a_broker_restart(tmp_path: Path) -> None:
    # Recovery after a restart of the memory-storage broker takes a rebalance of every group against a
    # broker that lost them; about one run in five on a loaded 2-core machine needs longer than the
    # window below, so the scenario gets a second, fresh attempt before the test fails.
    try:
        await _restart_scenario(tmp_path / "first")
    except (TimeoutError, ExceptionGroup):
        await _restart_scenario(tmp_path / "second")


async def _restart_scenario(tmp_path: Path) -> None:
    await anyio.Path(tmp_path).mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    await broker.start()
    try:
        async with harness("kafka", "restart.", bootstrap=broker.address) as h:
            assert (await h.client.request(_req("before"))).status == "ok"
            await broker.stop()
            await broker.start()  # same port; memory storage: every topic, group and offset is gone
            # The memory-storage broker lost every topic, group and offset: a request published while
            # the stages re-join may be lost (documented). What must hold: they reconnect and go on
            # answering — three requests in a row answered, within a minute.
            streak, i = 0, 0
            with anyio.fail_after(60):
                while streak < 3:
                    i += 1
                    try:
                        answer = await h.client.request(_req(f"after-{i}"), timeout_s=8)
                    except ProviderTimeoutError:
                        streak = 0
                        continue
                    assert answer.status == "ok"
                    streak += 1
    finally:
        await broker.stop()
