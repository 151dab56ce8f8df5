"""A broker restart while the stages run: they reconnect and go on answering."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from pipeline.broker import EmbeddedBroker
from schemas import AIRequest
from tests.harness import harness

pytestmark = pytest.mark.kafka


def _req(rid: str) -> AIRequest:
    return msgspec.convert({"id": rid, "model": "gpt-3.5-turbo", "prompt": f"restart {rid}"}, AIRequest)


async def test_stages_reconnect_after_a_broker_restart(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    await broker.start()
    try:
        async with harness("kafka", "restart.", bootstrap=broker.address) as h:
            assert (await h.client.request(_req("before"))).status == "ok"
            await broker.stop()
            await broker.start()  # same port; memory storage: every topic, group and offset is gone
            with anyio.fail_after(30):
                answers = [await h.client.request(_req(f"after-{i}"), timeout_s=20) for i in range(3)]
            assert [a.status for a in answers] == ["ok"] * 3
    finally:
        await broker.stop()
