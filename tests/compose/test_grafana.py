"""compose/: Grafana's provisioned dashboard is valid and every panel's query names a metric the stages export.

The metric names are read from a live ``/metrics`` of ``aipipe run`` after traffic that makes every
series exist (answers, a cache hit, a failing provider whose circuit opens, a budget).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.topics import Topics
from pipeline.client.pipeline_client import PipelineClient
from pipeline.emulator import EmulatorServer
from schemas.request import AIRequest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "aipipe.json"
METRIC = re.compile(r"\baipipe_[a-z_]+\b")


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _queries() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


def test_the_dashboard_is_valid_grafana_json_on_the_provisioned_data_source() -> None:
    board = _dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 30
    datasource = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("requests per second", "error rate", "latency", "circuit", "spend", "cache hit rate"):
        assert topic in titles
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and METRIC.search(target["expr"]), target
            assert target["expr"].count("(") == target["expr"].count(")")
    provider = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/aipipe.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_every_stage_on_its_metrics_port() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    scraped = {(sd["names"][0], sd["port"]) for job in prometheus["scrape_configs"] for sd in job["dns_sd_configs"]}
    stages = {
        name: int(service["environment"]["AIPIPE_METRICS_PORT"])
        for name, service in compose["services"].items()
        if isinstance(service.get("environment"), dict) and "AIPIPE_METRICS_PORT" in service["environment"]
    }
    assert len(stages) == 8 and scraped == set(stages.items())
    assert {"prometheus", "grafana", "dashboard"} <= set(compose["services"])
    volumes = " ".join(compose["services"]["grafana"]["volumes"])
    assert "./grafana/provisioning" in volumes and "./grafana/dashboards" in volumes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.kafka
async def test_every_panel_query_names_a_metric_a_live_aipipe_run_exports(kafka_bootstrap: str, tmp_path: Path) -> None:
    port, prefix = _free_port(), "grafana-live."
    config = tmp_path / "aipipe.toml"
    config.write_text("[providers.openai]\nbreaker = { failure_threshold = 1 }\nretry = { max_attempts = 1 }\n")
    async with EmulatorServer() as emu:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPIPE_", "OTEL_"))}
        env |= {
            "AIPIPE_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "AIPIPE_TOPIC_PREFIX": prefix,
            "AIPIPE_HOME": str(tmp_path / "home"),
            "AIPIPE_CONFIG": str(config),
            "AIPIPE_EMULATE": "1",
            "AIPIPE_EMULATOR_URL": emu.url,
            "AIPIPE_METRICS_PORT": str(port),
            "AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000",
        }
        log_path = tmp_path / "run.log"
        with log_path.open("wb") as out:
            proc = await anyio.open_process(
                [sys.executable, "-m", "pipeline.cli", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        log = anyio.Path(log_path)
        try:
            with anyio.fail_after(60):
                while b"aipipe running on" not in await log.read_bytes():
                    assert proc.returncode is None, await log.read_text()
                    await anyio.sleep(0.1)
            bus = KafkaBus(kafka_bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
            await bus.start()
            try:
                async with anyio.create_task_group() as tg:
                    client = PipelineClient(bus, Topics(prefix))
                    await tg.start(client.run)
                    ok = AIRequest(id="grafana-ok", model="chat-small", prompt="hello metrics", max_tokens=16)
                    assert (await client.request(ok, timeout_s=30)).status == "ok"
                    again = AIRequest(id="grafana-hit", model="chat-small", prompt="hello metrics", max_tokens=16)
                    assert (await client.request(again, timeout_s=30)).cached
                    emu.faults.set("openai", {"default": {"status": 500}})
                    failing = AIRequest(id="grafana-fail", model="gpt-4o-mini", prompt="fail", max_tokens=16)
                    assert (await client.request(failing, timeout_s=30)).status == "error"
                    client.stop()
            finally:
                await bus.stop()
            names: set[str] = set()
            async with httpx.AsyncClient() as http:
                with anyio.fail_after(30):  # the circuit's gauge appears once the breaker's transition is read
                    while "aipipe_circuit_state" not in names:
                        scrape = await http.get(f"http://127.0.0.1:{port}/metrics")
                        lines = [line for line in scrape.text.splitlines() if not line.startswith("#")]
                        names = {line.split("{")[0].split(" ")[0] for line in lines}
                        await anyio.sleep(0.3)
        finally:
            proc.terminate()
            with anyio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    used = {name for query in _queries() for name in METRIC.findall(query)}
    assert used and used <= names, f"not exported: {sorted(used - names)}"
