"""Any number of deployments through the whole pipeline, on both buses (DESIGN A10).

Two OpenAI accounts fail over between each other, a cloud deployment fails
over to an OpenAI-compatible local server, Azure OpenAI answers through its
deployment URL; circuits, RPM limits and budgets are each deployment's own.
Every deployment is served by the emulator under ``/d/<name>``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import msgspec
import pytest
import pytest_asyncio

from pipeline.assembly.build import ALL_STAGES
from pipeline.client.report_reader import publish_control, set_budget_event
from pipeline.runtime.config import PipelineConfig, config_from_mapping, preset
from pipeline.serve.openai_format import model_list
from schemas import AIRequest, AIResponse, CostEvent
from tests.conftest import _RUN_ID, in_own_task
from tests.harness import FAST_RETRY, NO_RATE_LIMIT, Harness, harness

pytestmark = pytest.mark.kafka

FAST = {**FAST_RETRY, **NO_RATE_LIMIT}
MODEL = ["gpt-4o-mini"]


def deployments_config() -> PipelineConfig:
    def openai(priority: int, **extra: Any) -> dict[str, Any]:
        return {"type": "openai", "api_key_env": "UNUSED_KEY", "models": MODEL, "priority": priority, **FAST, **extra}

    return config_from_mapping(
        {
            "providers": {p: dict(FAST) for p in ("openai", "anthropic", "cloudflare")},
            "deployments": {
                "openai-a": openai(1, retry={"max_attempts": 2, "base_delay_ms": 1}),
                "openai-b": openai(2),
                "circ-a": openai(1, retry={"max_attempts": 1}, breaker={"failure_threshold": 2, "cool_off_s": 60}),
                "circ-b": openai(2),
                "lim-a": openai(1, rate_limit={"requests_per_minute": 1}),
                "lim-b": openai(2),
                "bud-a": openai(1),
                "bud-b": openai(2),
                "azure-eu": {
                    "type": "azure_openai",
                    "base_url": "https://contoso.openai.azure.com",
                    "api_key_env": "AZURE_EU_KEY",
                    "azure_deployments": {"gpt-4o-mini": "mini-eu"},
                    "models": MODEL,
                    "priority": 1,
                    **FAST,
                },
                "local": {
                    "type": "openai_compatible",
                    "base_url": "http://127.0.0.1:11434/v1",
                    "models": ["llama3.1:8b"],
                    "priority": 9,
                    "prices": {"input_per_mtok": 0, "output_per_mtok": 0},
                    **FAST,
                },
            },
            "model_groups": {
                "two-openai": {"openai-a": "gpt-4o-mini", "openai-b": "gpt-4o-mini"},
                "circuit": {"circ-a": "gpt-4o-mini", "circ-b": "gpt-4o-mini"},
                "limited": {"lim-a": "gpt-4o-mini", "lim-b": "gpt-4o-mini"},
                "budgeted": {"bud-a": "gpt-4o-mini", "bud-b": "gpt-4o-mini"},
                "cloud-then-local": {"openai": "gpt-4o-mini", "local": "llama3.1:8b"},
                "azure-then-openai": {"azure-eu": "gpt-4o-mini", "openai": "gpt-4o-mini"},
            },
            "health": {"interval_s": 0, "snapshot_interval_s": 1},
        },
        base=preset("production"),
    )


@pytest_asyncio.fixture(scope="module", params=["memory", "kafka"])
async def dpipe(request: pytest.FixtureRequest, kafka_bootstrap: str) -> AsyncIterator[Harness]:
    """All seven stages over the deployments configuration, on each bus."""
    kind = request.param
    prefix = f"dep-{kind}-{_RUN_ID}."
    bootstrap = kafka_bootstrap if kind == "kafka" else None

    def factory() -> Any:
        return harness(kind, prefix, bootstrap=bootstrap, config=deployments_config(), stages=ALL_STAGES)

    async with in_own_task(factory) as h:
        yield h


@pytest.fixture
def dep(dpipe: Harness) -> Iterator[Harness]:
    dpipe.emulator.reset()
    yield dpipe
    dpipe.emulator.reset()


async def ask(h: Harness, model: str, **extra: Any) -> AIResponse:
    rid = f"dep-{uuid.uuid4().hex[:10]}"
    data = {"id": rid, "model": model, "prompt": f"deployments {rid}", "max_tokens": 32, **extra}
    data.setdefault("cache", {"bypass": True})
    response: AIResponse = await h.client.request(msgspec.convert(data, AIRequest))
    return response


async def cost_event(h: Harness, rid: str) -> CostEvent:
    records = await h.read_all(h.topics.costs, until=lambda rs: any(r.key == rid.encode() for r in rs))
    [event] = [e for e in h.decode(records, CostEvent) if e.id == rid]
    return event


def chain(response: AIResponse) -> list[tuple[str, str, str | None]]:
    return [(a.provider, a.outcome, a.error_type) for a in response.attempts]


async def test_two_openai_deployments_fail_over_between_each_other(dep: Harness) -> None:
    dep.emulator.faults.schedule("openai-a", {"status": 429}, {"status": 429})
    response = await ask(dep, "two-openai")
    assert response.status == "ok" and response.provider == "openai-b" and response.model == "gpt-4o-mini"
    assert chain(response) == [
        ("openai-a", "error", "rate_limit"),
        ("openai-a", "error", "rate_limit"),
        ("openai-b", "ok", None),
    ]
    counts = dep.emulator.counts()
    assert (counts["openai-a"], counts["openai-b"], counts["openai"]) == (2, 1, 0)
    event = await cost_event(dep, response.id)
    assert event.provider == "openai-b" and event.price_source == "table" and event.cost_usd > 0


async def test_a_cloud_deployment_fails_over_to_an_openai_compatible_server(dep: Harness) -> None:
    dep.emulator.faults.set("local", {"omit_usage": True})
    dep.emulator.faults.schedule("openai", *[{"status": 503}] * 3)
    response = await ask(dep, "cloud-then-local")
    assert response.status == "ok" and response.provider == "local" and response.model == "llama3.1:8b"
    assert [a.provider for a in response.attempts] == ["openai", "openai", "openai", "local"]
    assert response.cost_usd == 0 and response.usage.total_tokens > 0
    event = await cost_event(dep, response.id)
    assert (event.provider, event.price_source, event.usage_source, event.cost_usd) == (
        "local",
        "deployment",
        "estimated",
        0.0,
    )


async def test_azure_openai_answers_through_its_deployment_url(dep: Harness) -> None:
    response = await ask(dep, "azure-then-openai")
    assert response.status == "ok" and response.provider == "azure-eu" and response.model == "gpt-4o-mini"
    [call] = dep.emulator.calls("azure-eu")
    assert call.path == "/d/azure-eu/openai/deployments/mini-eu/chat/completions"
    event = await cost_event(dep, response.id)
    assert event.price_source == "table" and event.cost_usd > 0  # priced as OpenAI's gpt-4o-mini
    # Azure's prompt filter is a content_filter error that does not fall back (DESIGN A8 default)
    dep.emulator.faults.schedule("azure-eu", {"kind": "content_filter", "status": 400})
    filtered = await ask(dep, "azure-then-openai")
    assert filtered.status == "error" and filtered.error is not None
    assert (filtered.error.type, filtered.error.provider) == ("content_filter", "azure-eu")
    assert dep.emulator.counts()["openai"] == 0


async def test_each_deployment_has_its_own_circuit(dep: Harness) -> None:
    dep.emulator.faults.schedule("circ-a", {"status": 500}, {"status": 500})
    for _ in range(2):
        answered = await ask(dep, "circuit")
        assert answered.provider == "circ-b" and chain(answered)[0] == ("circ-a", "error", "server_error")
    with anyio.fail_after(15):  # two counted failures open circ-a's circuit; the feed brings the transition
        while dep.pipeline.circuits.state("circ-a") != "OPEN":
            await anyio.sleep(0.01)
    skipped = await ask(dep, "circuit")
    assert skipped.provider == "circ-b"
    assert [(a.provider, a.outcome, a.reason) for a in skipped.attempts] == [
        ("circ-a", "skipped", "circuit OPEN"),
        ("circ-b", "ok", None),
    ]
    assert dep.emulator.counts()["circ-a"] == 2
    assert dep.pipeline.circuits.state("circ-b") == "CLOSED" and dep.pipeline.circuits.state("openai") == "CLOSED"


async def test_each_deployment_has_its_own_rate_limit_window(dep: Harness) -> None:
    first = await ask(dep, "limited")
    assert first.provider == "lim-a"
    second = await ask(dep, "limited")  # lim-a's 1 RPM is spent: it is tried after the others
    assert second.provider == "lim-b" and [a.provider for a in second.attempts] == ["lim-b"]
    assert dep.emulator.counts()["lim-a"] == 1


async def test_each_deployment_has_its_own_budget(dep: Harness) -> None:
    event = set_budget_event("bud-a", daily=0.0, deployments=dep.pipeline.config.providers)
    await publish_control(dep.bus, dep.topics, event)
    with anyio.fail_after(15):
        while dep.pipeline.provider_budgets.allows("bud-a"):
            await anyio.sleep(0.01)
    moved = await ask(dep, "budgeted")
    assert moved.provider == "bud-b" and dep.emulator.counts().get("bud-a", 0) == 0
    refused = await ask(dep, "budgeted", providers=["bud-a"])
    assert refused.status == "error" and refused.error is not None
    assert refused.error.type == "budget_exceeded" and "bud-a" in refused.error.message
    await publish_control(
        dep.bus, dep.topics, set_budget_event("bud-a", daily=None, deployments=dep.pipeline.config.providers)
    )


def test_the_endpoint_lists_deployments_models() -> None:
    entries = {(e["id"], e["owned_by"]) for e in model_list(deployments_config())}
    assert ("llama3.1:8b", "local") in entries and ("two-openai", "aipipe") in entries
