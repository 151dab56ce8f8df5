"""compose/docker-compose.yml, read as data: services, images, each stage's environment, ports, start order.

No Docker engine runs here: the file is loaded with PyYAML (merge keys resolved as Compose does),
``${VAR:-default}`` is resolved to its default, and every value a stage reads is parsed by the
project's own settings code and CLI parser, so a typo fails here rather than in a container.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.assembly.build import RUN_STAGES
from pipeline.bus.kafka import KafkaSettings
from pipeline.cli.main import build_parser
from pipeline.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
SECRET_VARS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID")
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _resolve(value: Any, host: dict[str, str] | None = None) -> str:
    """A Compose value with ``${VAR:-default}`` interpolated from ``host`` (default: an empty environment)."""
    host = host or {}
    return _VAR.sub(lambda m: host.get(m.group(1)) or m.group(2) or "", str(value))


def _env(service: dict[str, Any], host: dict[str, str] | None = None) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is written as a mapping"
    return {key: _resolve(value, host) for key, value in env.items()}


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def stage_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services whose command is ``aipipe run ...``, by service name."""
    return {name: svc for name, svc in services.items() if list(svc.get("command") or [])[:2] == ["aipipe", "run"]}


@pytest.fixture(scope="module")
def collector_config(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    mounts = [v for v in services["otel-collector"].get("volumes", []) if str(v).startswith("./")]
    assert len(mounts) == 1, mounts
    source, target = str(mounts[0]).split(":")[:2]
    assert f"--config={target}" in services["otel-collector"]["command"]
    data = yaml.safe_load((COMPOSE_DIR / source).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_infrastructure_images(services: dict[str, dict[str, Any]]) -> None:
    kafka, redis, collector = services["kafka"], services["redis"], services["otel-collector"]
    assert kafka["image"].startswith("apache/kafka:") and not kafka["image"].endswith(":latest")
    assert redis["image"].startswith("redis:")
    assert collector["image"].startswith("otel/opentelemetry-collector")
    assert not any("zookeeper" in str(svc.get("image", "")) for svc in services.values())
    env = _env(kafka)
    # KRaft: one node as broker and controller, a controller quorum, no ZooKeeper.
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:29093"
    assert "CONTROLLER://:29093" in env["KAFKA_LISTENERS"].split(",")
    assert not any(key.startswith("KAFKA_ZOOKEEPER") for key in env)
    # CLUSTER_ID is a base64url UUID (22 characters), as `kafka-storage.sh random-uuid` prints.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"])


def test_aipipe_image_is_built_from_the_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    emulator = services["emulator"]
    build = emulator["build"]
    dockerfile = (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == COMPOSE_DIR / "Dockerfile"
    text = dockerfile.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^RUN pip install \.", text, re.MULTILINE)
    for package in ("pipeline", "stages", "schemas"):
        assert re.search(rf"^COPY {package} ", text, re.MULTILINE), package
    assert emulator["command"][:2] == ["aipipe", "emulator"]
    for name, svc in services.items():
        if svc.get("image") == emulator["image"]:
            assert svc.get("build") == build, f"{name} builds the same aipipe image"


def test_every_stage_of_design_a6_is_its_own_service(stage_services: dict[str, dict[str, Any]]) -> None:
    parser = build_parser()
    stage_of: dict[str, str] = {}
    for name, svc in stage_services.items():
        command = list(svc["command"])
        assert len(command) == 4 and command[2] == "--stage", f"{name}: {command}"
        assert command[3] in RUN_STAGES, f"{name}: {command[3]} is not a stage of DESIGN A6/A11"
        args = parser.parse_args(command[1:])  # the real CLI accepts it
        assert args.stage == [command[3]]
        stage_of[name] = command[3]
    assert sorted(stage_of.values()) == sorted(RUN_STAGES), "one service per stage, each stage once"


def test_the_archive_writes_to_a_mounted_volume(services: dict[str, dict[str, Any]]) -> None:
    archive = services["archive"]
    where = archive["environment"]["AIPIPE_ARCHIVE_DIR"]
    assert any(str(v).endswith(f":{where}") for v in archive["volumes"]), archive["volumes"]


def test_each_stage_gets_the_environment_it_needs(
    services: dict[str, dict[str, Any]], stage_services: dict[str, dict[str, Any]], collector_config: dict[str, Any]
) -> None:
    kafka_env = _env(services["kafka"])
    internal = [item for item in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",") if item.startswith("PLAINTEXT://")]
    advertised_internal = internal[0].removeprefix("PLAINTEXT://")
    emulator_port = int(services["emulator"]["command"][services["emulator"]["command"].index("--port") + 1])
    otlp = collector_config["receivers"]["otlp"]["protocols"]
    otlp_ports = {_host_port(p["endpoint"])[1] for p in otlp.values()}

    for name, svc in stage_services.items():
        env = _env(svc)
        assert env["AIPIPE_KAFKA_BOOTSTRAP"] == advertised_internal, name
        assert _host_port(env["AIPIPE_KAFKA_BOOTSTRAP"])[0] in services
        redis = urlparse(env["AIPIPE_REDIS_URL"])
        assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379), name
        emulator = urlparse(env["AIPIPE_EMULATOR_URL"])
        assert (emulator.hostname, emulator.port) == ("emulator", emulator_port), name
        otel = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert otel.hostname == "otel-collector" and otel.port in otlp_ports, name
        assert env["OTEL_SERVICE_NAME"] == f"aipipe-{name}"

        settings = Settings.from_env(env)  # every value parses as aipipe reads it
        assert settings.emulate and settings.emulator_url == env["AIPIPE_EMULATOR_URL"]
        assert settings.kafka_bootstrap == advertised_internal
        assert settings.redis_url == env["AIPIPE_REDIS_URL"]
        assert settings.metrics_port is not None
        kafka = KafkaSettings.from_env(env)
        assert kafka.acks == "all" and kafka.enable_idempotence  # Apache Kafka supports idempotent producers
        assert kafka.partitions >= svc.get("deploy", {}).get("replicas", 1)
        assert kafka.replication_factor == 1  # one broker here; raise it with the brokers


def test_secrets_come_from_the_host_and_provider_keys_only_reach_provider_callers(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        raw = svc.get("environment") or {}
        for var in (*SECRET_VARS, "AIPIPE_KAFKA_SASL_PASSWORD"):
            if var in raw:
                assert raw[var] == f"${{{var}:-}}", f"{name}: {var} comes from the host's environment only"
        for var in SECRET_VARS:
            if var in raw:
                assert name in ("executor", "health"), f"{name} does not call providers but gets {var}"


def test_metrics_ports_are_distinct_and_scraped(
    stage_services: dict[str, dict[str, Any]], collector_config: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    ports = {name: int(_env(svc)["AIPIPE_METRICS_PORT"]) for name, svc in stage_services.items()}
    assert len(set(ports.values())) == len(ports), ports
    scraped: dict[str, int] = {}
    for job in collector_config["receivers"]["prometheus"]["config"]["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for service_name in sd["names"]:
                scraped[service_name] = sd["port"]
    assert scraped == ports, "the collector scrapes every replica of every stage on its metrics port"
    pipelines = collector_config["service"]["pipelines"]
    assert "prometheus" in pipelines["metrics"]["exporters"]
    assert "otlp" in pipelines["traces"]["receivers"]
    exporter_port = _host_port(collector_config["exporters"]["prometheus"]["endpoint"])[1]
    assert f"{exporter_port}:{exporter_port}" in services["otel-collector"]["ports"]


def test_health_checks_and_start_order(
    services: dict[str, dict[str, Any]], stage_services: dict[str, dict[str, Any]]
) -> None:
    for name in ("kafka", "redis", "emulator"):
        assert services[name]["healthcheck"]["test"], name
    for name, svc in stage_services.items():
        depends = svc["depends_on"]
        for dependency in ("kafka", "redis", "emulator"):
            assert depends[dependency] == {"condition": "service_healthy"}, (name, dependency)
        assert depends["otel-collector"]["condition"] in ("service_started", "service_healthy")
        check = " ".join(svc["healthcheck"]["test"])
        assert "AIPIPE_METRICS_PORT" in check and "/metrics" in check, name
        assert svc.get("restart") == "unless-stopped"


def test_executor_runs_replicas_and_can_be_scaled(stage_services: dict[str, dict[str, Any]]) -> None:
    executor = stage_services["executor"]
    assert executor["deploy"]["replicas"] >= 2
    # `--scale executor=N` needs no fixed container name and no host port per replica.
    for svc in stage_services.values():
        assert "container_name" not in svc
        assert "ports" not in svc


def test_stages_can_be_pointed_at_an_existing_cluster(stage_services: dict[str, dict[str, Any]]) -> None:
    host = {
        "AIPIPE_KAFKA_BOOTSTRAP": "b-1.example:9096,b-2.example:9096",
        "AIPIPE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "AIPIPE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "AIPIPE_KAFKA_SASL_USERNAME": "aipipe",
        "AIPIPE_KAFKA_SASL_PASSWORD": "from-the-host",
        "AIPIPE_KAFKA_REPLICATION_FACTOR": "3",
        "AIPIPE_KAFKA_PARTITIONS": "12",
    }
    for name, svc in stage_services.items():
        env = _env(svc, host)
        assert Settings.from_env(env).kafka_bootstrap == host["AIPIPE_KAFKA_BOOTSTRAP"], name
        kafka = KafkaSettings.from_env(env)
        assert (kafka.security_protocol, kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512"), name
        assert (kafka.sasl_username, kafka.sasl_password) == ("aipipe", "from-the-host"), name
        assert (kafka.replication_factor, kafka.partitions) == (3, 12), name
