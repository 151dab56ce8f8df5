"""The fallback chain as users meet it (DESIGN A8): skips, provider budgets, quota refunds, deadlines.

Every case runs the whole pipeline (the five request stages) with the
emulator behind every deployment; counts of provider calls come from the
emulator, spend from ``ai.costs``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import anyio
import msgspec
import pytest
import pytest_asyncio

from pipeline.client.report_reader import publish_control, set_budget_event
from pipeline.data.prompts import load_prompts
from pipeline.runtime.config import PipelineConfig, config_from_mapping, preset
from schemas import AIRequest, AIResponse, CostEvent, Health
from stages.executor.stage import ExecutorStage
from stages.rules.tokens import count_messages_tokens
from tests.conftest import _RUN_ID, in_own_task
from tests.harness import FAST_RETRY, NO_RATE_LIMIT, Harness, harness

pytestmark = pytest.mark.kafka

FAST = {**FAST_RETRY, **NO_RATE_LIMIT}
MINI = ["gpt-4o-mini"]


def chain_config() -> PipelineConfig:
    def openai(priority: int, **extra: Any) -> dict[str, Any]:
        return {"type": "openai", "models": MINI, "priority": priority, **FAST, **extra}

    return config_from_mapping(
        {
            "providers": {p: dict(FAST) for p in ("openai", "anthropic", "cloudflare")},
            "deployments": {
                "small-window": openai(1, context_window=2048),
                "big-window": openai(2),
                "tiny-only": openai(1, context_window=1024),
                "busy-a": openai(1),
                "busy-b": openai(2),
                "bud": openai(1),
                "bud2": openai(1),
                "bud3": openai(1),
                "bud-free": openai(2),
                "hang": openai(1, timeout_ms=30_000, retry={"max_attempts": 3, "base_delay_ms": 1}),
                "rescue": openai(2),
                "quota": {
                    "type": "anthropic",
                    "models": ["claude-3-5-haiku-20241022"],
                    "priority": 1,
                    "rate_limit": {"requests_per_minute": 3},
                    **FAST_RETRY,
                },
            },
            "model_groups": {
                "windows": {"small-window": "gpt-4o-mini", "big-window": "gpt-4o-mini"},
                "tiny": {"tiny-only": "gpt-4o-mini"},
                "busy": {"busy-a": "gpt-4o-mini", "busy-b": "gpt-4o-mini"},
                "budgeted": {"bud": "gpt-4o-mini", "bud-free": "gpt-4o-mini"},
                "budgeted2": {"bud2": "gpt-4o-mini", "bud-free": "gpt-4o-mini"},
                "budgeted3": {"bud3": "gpt-4o-mini", "bud-free": "gpt-4o-mini"},
                "hanging": {"hang": "gpt-4o-mini", "rescue": "gpt-4o-mini"},
                "only-hang": {"hang": "gpt-4o-mini"},
            },
        },
        base=preset("production"),
    )


@pytest_asyncio.fixture(scope="module", params=["memory", "kafka"])
async def cpipe(request: pytest.FixtureRequest, kafka_bootstrap: str) -> AsyncIterator[Harness]:
    kind = request.param
    bootstrap = kafka_bootstrap if kind == "kafka" else None

    def factory() -> Any:
        return harness(kind, f"chain-{kind}-{_RUN_ID}.", bootstrap=bootstrap, config=chain_config())

    async with in_own_task(factory) as h:
        yield h


@pytest.fixture
def h(cpipe: Harness) -> Iterator[Harness]:
    cpipe.emulator.reset()
    yield cpipe
    cpipe.emulator.reset()


def long_prompt(tokens: int) -> str:
    """Real prompts joined until they are at least ``tokens`` tokens long."""
    turns = [t for p in load_prompts("mt_bench") for t in p.turns]
    text, i = "", 0
    while count_messages_tokens([{"role": "user", "content": text}]) < tokens:
        text += turns[i % len(turns)] + "\n"
        i += 1
    return text


async def ask(h: Harness, model: str, prompt: str | None = None, **extra: Any) -> AIResponse:
    rid = f"ch-{uuid.uuid4().hex[:10]}"
    data = {"id": rid, "model": model, "max_tokens": 64, **extra}
    if "messages" not in extra:
        data["prompt"] = prompt or f"chain {rid}"
    data.setdefault("cache", {"bypass": True})
    response: AIResponse = await h.client.request(msgspec.convert(data, AIRequest))
    return response


def chain(response: AIResponse) -> list[tuple[str, str, str | None]]:
    return [(a.provider, a.outcome, a.error_type) for a in response.attempts]


# --- 1. skips ---------------------------------------------------------------------------------------


async def test_a_prompt_too_long_for_a_window_skips_it_without_a_call(h: Harness) -> None:
    prompt = long_prompt(2500)  # about 2,500 tokens: over 2,048, well within the next one
    response = await ask(h, "windows", prompt)
    assert response.status == "ok" and response.provider == "big-window"
    assert chain(response) == [("small-window", "skipped", "context_length_exceeded"), ("big-window", "ok", None)]
    skip = response.attempts[0]
    assert skip.latency_ms == 0 and skip.status_code is None and "context window 2048" in (skip.reason or "")
    assert h.emulator.counts().get("small-window", 0) == 0
    # a skip publishes no health event: only the call is on ai.control
    records = await h.read_all(h.topics.control, until=lambda rs: any(response.id.encode() in r.value for r in rs))
    events = [e for e in h.decode(records, Health) if e.request_id == response.id]
    assert [(e.provider, e.ok) for e in events] == [("big-window", True)]


async def test_only_skips_give_the_skips_type_and_no_provider(h: Harness) -> None:
    response = await ask(h, "tiny", long_prompt(1500))
    assert response.status == "error" and response.error is not None
    assert (response.error.type, response.error.provider) == ("context_length_exceeded", None)
    assert chain(response) == [("tiny-only", "skipped", "context_length_exceeded")]
    assert h.emulator.counts().get("tiny-only", 0) == 0


async def test_one_failing_provider_gives_its_own_error_type(h: Harness) -> None:
    h.emulator.faults.schedule("busy-a", *[{"status": 429}] * 3)
    response = await ask(h, "busy", providers=["busy-a"])
    assert response.error is not None and (response.error.type, response.error.provider) == ("rate_limit", "busy-a")
    assert chain(response) == [("busy-a", "error", "rate_limit")] * 3


async def test_two_providers_always_429_are_bounded_and_one_error(h: Harness) -> None:
    h.emulator.faults.schedule("busy-a", *[{"status": 429}] * 10)
    h.emulator.faults.schedule("busy-b", *[{"status": 429}] * 10)
    response = await ask(h, "busy")
    assert response.error is not None
    assert (response.error.type, response.error.provider) == ("all_providers_failed", "busy-b")
    counts = h.emulator.counts()
    assert (counts["busy-a"], counts["busy-b"]) == (3, 3)  # max_attempts each, no second pass


# --- 2. provider budgets hold under traffic ------------------------------------------------------


async def budget(h: Harness, scope: str, daily: float | None) -> None:
    await publish_control(
        h.bus, h.topics, set_budget_event(scope, daily=daily, deployments=h.pipeline.config.providers)
    )
    ledger = h.pipeline.ledger
    with anyio.fail_after(15):
        while (ledger.limits.get(scope).daily if scope in ledger.limits else None) != (
            None if daily is None else Decimal(str(daily))
        ):
            await anyio.sleep(0.01)


async def spent_on(h: Harness, provider: str, ids: set[str]) -> Decimal:
    records = await h.read_all(h.topics.costs, until=lambda rs: ids <= {r.key.decode() for r in rs if r.key})
    return sum(
        (Decimal(str(e.cost_usd)) for e in h.decode(records, CostEvent) if e.id in ids and e.provider == provider),
        Decimal(0),
    )


def worst_case(h: Harness, provider: str, prompt: str) -> Decimal:
    executor = h.pipeline.stages["executor"]
    assert isinstance(executor, ExecutorStage) and executor.budgets is not None
    tokens = count_messages_tokens([{"role": "user", "content": prompt}])
    return executor.budgets.worst_case_usd(provider, "gpt-4o-mini", tokens, 64)


async def test_a_provider_budget_holds_for_back_to_back_requests(h: Harness) -> None:
    prompt = "Name three rivers in Europe and one fact about each."
    limit = float(worst_case(h, "bud", prompt) * 3)  # room for three calls at their worst case
    await budget(h, "bud", limit)
    try:
        responses = [await ask(h, "budgeted", prompt) for _ in range(30)]
        ids = {r.id for r in responses}
        assert all(r.status == "ok" for r in responses)
        on_bud = [r for r in responses if r.provider == "bud"]
        moved = [r for r in responses if r.provider == "bud-free"]
        assert len(on_bud) >= 3 and moved  # answers cost less than their worst case, so more than three fit
        assert all(r.attempts[0].outcome == "skipped" and r.attempts[0].error_type == "budget_exceeded" for r in moved)
        spent = await spent_on(h, "bud", ids)
        assert spent <= Decimal(str(limit)), (spent, limit)
        assert h.emulator.counts()["bud"] == len(on_bud)
    finally:
        await budget(h, "bud", None)


async def test_a_provider_budget_holds_for_twenty_requests_in_flight_together(h: Harness) -> None:
    prompt = "Explain what a consumer group is in one paragraph."
    per_call = worst_case(h, "bud2", prompt)
    limit = float(per_call * Decimal("5.5"))  # five calls' worst case fit, six do not
    await budget(h, "bud2", limit)
    try:
        h.emulator.hold(20)  # released only when all twenty calls are at the emulator at once
        responses: list[AIResponse] = []

        async def one() -> None:
            responses.append(await ask(h, "budgeted2", prompt))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert time.monotonic() - started < 30
        on_bud = [r for r in responses if r.provider == "bud2"]
        assert len(responses) == 20 and all(r.status == "ok" for r in responses)
        assert len(on_bud) == 5  # exactly the calls whose worst case fits, in flight together with the rest
        assert h.emulator.counts()["bud2"] == 5
        spent = await spent_on(h, "bud2", {r.id for r in responses})
        assert spent <= Decimal(str(limit))
    finally:
        h.emulator.release()
        await budget(h, "bud2", None)


async def test_a_spent_provider_alone_is_budget_exceeded(h: Harness) -> None:
    await budget(h, "bud3", 0.0)
    try:
        response = await ask(h, "budgeted3", providers=["bud3"])
        assert response.error is not None and response.error.type == "budget_exceeded"
        assert chain(response) == [("bud3", "skipped", "budget_exceeded")]
        assert "budget of bud3 has no room" in response.error.message
    finally:
        await budget(h, "bud3", None)


# --- 3. quota only for calls that reached the provider -------------------------------------------


async def test_refused_calls_give_their_quota_back(h: Harness) -> None:
    """Anthropic refuses a request with no non-empty user turn before sending: three of them leave RPM 3 intact."""
    for _ in range(3):
        refused = await ask(
            h,
            "claude-3-5-haiku-20241022",
            providers=["quota"],
            prompt=None,
            messages=[{"role": "system", "content": "a system turn"}, {"role": "user", "content": "   "}],
        )
        assert refused.error is not None and refused.error.type == "invalid_request"
    usage = await h.pipeline.rate_limiter.usage("quota")
    assert usage.requests == 0
    answered = await ask(h, "claude-3-5-haiku-20241022", providers=["quota"])
    assert answered.status == "ok" and answered.provider == "quota"
    assert h.emulator.counts().get("quota", 0) == 1


# --- 6. deadline-aware retries --------------------------------------------------------------------


async def test_a_hanging_primary_leaves_time_for_the_fallback(h: Harness) -> None:
    h.emulator.faults.schedule("hang", {"action": "hang", "hang_s": 60})
    started = time.monotonic()
    response = await ask(h, "hanging", timeout_ms=8000)
    took_s = time.monotonic() - started
    assert response.status == "ok" and response.provider == "rescue"
    assert chain(response) == [("hang", "error", "timeout"), ("rescue", "ok", None)]
    assert h.emulator.counts()["hang"] == 1  # a hung attempt is not retried while another candidate is left
    assert took_s < 8.0  # the primary's attempt was cut to leave a reserve (at least 2 s) for the fallback


async def test_a_passed_deadline_is_always_timeout(h: Harness) -> None:
    h.emulator.faults.schedule("hang", *[{"action": "hang", "hang_s": 60}] * 3)
    response = await ask(h, "only-hang", timeout_ms=1500)
    assert response.status == "error" and response.error is not None
    assert (response.error.type, response.error.provider) == ("timeout", "hang")
