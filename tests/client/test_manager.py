"""The seed's API: create_ai_provider_manager, generate_content, typed errors, shutdown."""

from __future__ import annotations

import msgspec
import pytest

from pipeline import (
    LOAD_BALANCING_STRATEGIES,
    AllProvidersFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    create_ai_provider_manager,
)
from schemas import AIResponse


def _env(**extra: str) -> dict[str, str]:
    env = {"AIPIPE_EMULATE": "1", "AIPIPE_TOPIC_PREFIX": "mgr."}
    env.update(extra)
    return env


async def test_memory_manager_generates_content_with_seed_names() -> None:
    async with create_ai_provider_manager("development", _env()) as manager:
        assert manager.bus_kind == "memory"
        response = await manager.generate_content(
            {
                "model": "gpt-3.5-turbo",
                "prompt": "Write a post about AI innovation",
                "max_tokens": 200,
                "temperature": 0.7,
            }
        )
        assert isinstance(response, AIResponse)
        assert response.status == "ok" and response.content
        assert response.provider == "cloudflare"
        assert response.cost == response.cost_usd > 0
        assert response.tokens_used == response.usage.total_tokens > 0
        assert response.id.startswith("req-")


async def test_typed_errors_are_raised() -> None:
    async with create_ai_provider_manager("development", _env()) as manager:
        with pytest.raises(ModelNotFoundError, match="gpt-17"):
            await manager.generate_content({"model": "gpt-17", "prompt": "hi"})
        with pytest.raises(InvalidRequestError, match="temperature"):
            await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": "hi", "temperature": 9})
        pipeline = manager.pipeline
        assert pipeline is not None


async def test_all_providers_failed_holds_every_attempt() -> None:
    cfg = {"providers": {p: {"retry": {"max_attempts": 2, "base_delay_ms": 1}} for p in ("openai", "cloudflare")}}
    from pipeline import AIProviderManager
    from pipeline.emulator import EmulatorServer
    from pipeline.runtime.config import config_from_mapping, preset

    async with EmulatorServer() as emu:
        emu.faults.set("openai", {"default": {"status": 503}})
        emu.faults.set("cloudflare", {"default": {"status": 500}})
        env = {"AIPIPE_EMULATE": "1", "AIPIPE_EMULATOR_URL": emu.url}
        manager = AIProviderManager(config_from_mapping(cfg, base=preset("development")), env)
        async with manager:
            with pytest.raises(AllProvidersFailedError) as info:
                await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": "hi", "max_tokens": 10})
        assert [a.provider for a in info.value.attempts] == ["cloudflare", "cloudflare", "openai", "openai"]
        assert {k: v for k, v in emu.counts().items() if v} == {"cloudflare": 2, "openai": 2}


async def test_kafka_manager_runs_stages_in_process_on_the_embedded_broker(tmp_path: object) -> None:
    env = _env(AIPIPE_HOME=str(tmp_path), AIPIPE_KAFKA_SESSION_TIMEOUT_MS="2000", AIPIPE_TOPIC_PREFIX="mgrk.")
    manager = create_ai_provider_manager("development", env, bus="kafka")
    async with manager:
        assert manager.bus_kind == "kafka" and manager.bootstrap
        response = await manager.generate_content(
            msgspec.convert(
                {"id": "k-1", "model": "gpt-4o-mini", "prompt": "hello"}, type=__import__("schemas").AIRequest
            )
        )
        assert response.provider == "openai" and response.model == "gpt-4o-mini"
    await manager.shutdown()  # idempotent


def test_strategies_and_unbuilt_capabilities_are_named() -> None:
    assert set(LOAD_BALANCING_STRATEGIES) == {"round_robin", "weighted", "least_latency", "cost_optimized", "priority"}


async def test_stream_content_streams_a_dict_and_leaves_response_after() -> None:
    async with create_ai_provider_manager("development", _env(AIPIPE_TOPIC_PREFIX="mgr-stream.")) as manager:
        stream = manager.stream_content(
            {"model": "gpt-3.5-turbo", "prompt": "stream me", "stream_resume": True, "cache": {"bypass": True}}
        )
        deltas = [chunk.delta async for chunk in stream]
        assert stream.response is not None and stream.response.status == "ok"
        assert "".join(deltas) == stream.text == stream.response.content
        assert stream.response.generation and stream.response.stream_chunks == len(deltas)
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            async for _ in manager.stream_content({"model": "gpt-3.5-turbo", "prompt": "x", "max_tokens": 0}):
                pass
