"""Observability: one trace per request across the stages, /metrics after traffic, get_metrics, no secret leaks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from pipeline.client.cost_book import CostSummary
from pipeline.client.metrics_book import MetricsBook, percentile
from pipeline.runtime import telemetry
from pipeline.runtime.telemetry import Telemetry, build_tracer_provider, context_from_header, new_traceparent
from schemas import AIRequest, AIResponse
from schemas.events import Health
from tests.harness import Harness

PIPELINE_TOPICS = ("requests", "stage_budget", "stage_route", "stage_execute", "stage_record")
STAGES = ("cache", "budget", "router", "executor", "recorder")


def request(rid: str, **kw: Any) -> AIRequest:
    data: dict[str, Any] = {"id": rid, "model": "gpt-3.5-turbo", "prompt": f"observability {rid}", "max_tokens": 64}
    data.update(kw)
    return msgspec.convert(data, AIRequest)


@contextmanager
def installed(tel: Telemetry) -> Iterator[Telemetry]:
    previous = telemetry.install(tel)
    try:
        yield tel
    finally:
        telemetry.install(previous)
        tel.shutdown()


# --- pure parts ---------------------------------------------------------------------------------


def test_new_traceparent_is_w3c_and_round_trips() -> None:
    value = new_traceparent()
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-01", value)
    assert new_traceparent(sampled=False).endswith(b"-00")
    ctx = context_from_header(value)
    assert ctx is not None
    assert context_from_header(b"not-a-traceparent") is None
    assert context_from_header(None) is None


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_metrics_book_counts_attempts_not_probes() -> None:
    from datetime import UTC, datetime

    at = datetime.now(UTC)
    book = MetricsBook()
    for ok, ms in [(True, 100.0), (True, 300.0), (False, 50.0)]:
        book.apply(Health(provider="openai", model="gpt-4o-mini", ok=ok, latency_ms=ms, source="attempt", at=at))
    book.apply(Health(provider="openai", model="gpt-4o-mini", ok=False, latency_ms=9.0, source="probe", at=at))
    costs = {"openai": CostSummary(total_cost_usd=0.25, total_tokens=900, average_cost_per_token_usd=0.0,
                                   request_count=2)}
    metrics = book.metrics(costs, ["cloudflare", "openai"])
    assert list(metrics) == ["cloudflare", "openai"]
    m = metrics["openai"]
    assert (m.request_count, m.success_count, m.failure_count) == (3, 2, 1)
    assert m.average_latency_ms == pytest.approx(150.0) and m.average_latency == m.average_latency_ms
    assert (m.p50_latency_ms, m.p95_latency_ms, m.p99_latency_ms) == (100.0, 300.0, 300.0)
    assert m.total_cost_usd == m.total_cost == 0.25 and m.total_tokens == 900
    assert metrics["cloudflare"].request_count == 0


# --- one trace per request ------------------------------------------------------------------------


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def _wait_spans(exporter: InMemorySpanExporter, trace_id: int, count: int) -> list[ReadableSpan]:
    with anyio.fail_after(10):
        while True:
            spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
            if len(spans) >= count:
                return spans
            await anyio.sleep(0.01)


async def test_fallback_request_is_one_trace_with_stage_and_attempt_spans(pipe: Harness, emu: Any) -> None:
    exporter = InMemorySpanExporter()
    rid = f"trace-{pipe.kind}"
    with installed(Telemetry(tracer_provider=build_tracer_provider({}, [], [exporter]))):
        emu.faults.schedule("cloudflare", {"status": 401})  # authentication: falls back at once
        resp = await pipe.client.request(request(rid))
        assert resp.status == "ok" and resp.provider == "openai"
        assert [(a.provider, a.outcome, a.status_code) for a in resp.attempts] == [
            ("cloudflare", "error", 401),
            ("openai", "ok", 200),
        ]
        roots = [s for s in exporter.get_finished_spans() if _attrs(s).get("aipipe.request.id") == rid and
                 s.parent is None]
        assert len(roots) == 1
        root = roots[0]
        spans = await _wait_spans(exporter, root.context.trace_id, 8)

    # every span about this request is in this one trace
    mine = [s for s in exporter.get_finished_spans()
            if rid in (_attrs(s).get("aipipe.request.id"), _attrs(s).get("messaging.kafka.message.key"))]
    assert {s.context.trace_id for s in mine} == {root.context.trace_id}
    assert len(spans) == 8, [s.name for s in spans]

    assert root.name == "generate_content gpt-3.5-turbo" and root.kind == SpanKind.CLIENT
    assert _attrs(root)["aipipe.provider"] == "openai" and _attrs(root)["aipipe.cost_usd"] == resp.cost_usd

    by_stage = {_attrs(s).get("aipipe.stage"): s for s in spans if s.kind == SpanKind.CONSUMER}
    assert sorted(by_stage) == sorted(STAGES)
    system = "kafka" if pipe.kind == "kafka" else "aipipe_memory"
    parent = root
    for stage, topic_attr in zip(STAGES, PIPELINE_TOPICS, strict=True):
        span = by_stage[stage]
        attrs = _attrs(span)
        assert span.name == f"process {getattr(pipe.topics, topic_attr)}"
        assert attrs["messaging.system"] == system
        assert attrs["messaging.destination.name"] == getattr(pipe.topics, topic_attr)
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["messaging.kafka.message.key"] == rid
        assert attrs["messaging.consumer.group.name"] == f"{pipe.topics.prefix}{stage}"
        assert isinstance(attrs["messaging.kafka.offset"], int)
        assert span.parent is not None and span.parent.span_id == parent.context.span_id, stage
        parent = span
    recorder = _attrs(by_stage["recorder"])
    assert recorder["aipipe.outcome"] == "ok" and recorder["aipipe.cost_usd"] == pytest.approx(resp.cost_usd)

    executor = by_stage["executor"]
    attempts = sorted((s for s in spans if s.kind == SpanKind.CLIENT and s is not root), key=lambda s: s.start_time)
    assert [s.name for s in attempts] == ["chat @cf/meta/llama-3.1-8b-instruct", "chat gpt-3.5-turbo"]
    assert all(s.parent is not None and s.parent.span_id == executor.context.span_id for s in attempts)
    failed, answered = (_attrs(s) for s in attempts)
    assert failed["gen_ai.system"] == failed["aipipe.provider"] == "cloudflare"
    assert failed["gen_ai.operation.name"] == "chat"
    assert failed["gen_ai.request.model"] == "@cf/meta/llama-3.1-8b-instruct"
    assert failed["http.response.status_code"] == 401 and failed["error.type"] == "authentication"
    assert failed["aipipe.attempt.number"] == 1 and failed["aipipe.attempt.retry"] == 0
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert answered["gen_ai.system"] == "openai" and answered["gen_ai.request.model"] == "gpt-3.5-turbo"
    assert answered["gen_ai.response.model"] == resp.model
    assert answered["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
    assert answered["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens
    assert answered["http.response.status_code"] == 200 and "error.type" not in answered
    assert answered["aipipe.cost_usd"] == pytest.approx(resp.cost_usd)
    assert answered["aipipe.latency_ms"] == pytest.approx(resp.attempts[1].latency_ms, abs=0.01)


async def test_without_tracing_outputs_carry_the_request_traceparent(pipe: Harness, emu: Any) -> None:
    """No exporter: no spans, but the first stage starts a trace and every stage passes it on."""
    rid = f"notrace-{pipe.kind}"
    with installed(Telemetry.disabled()):
        resp = await pipe.client.request(request(rid))
    assert resp.status == "ok"
    headers = []
    for attr in (*PIPELINE_TOPICS[1:], "responses"):
        records = await pipe.read_all(getattr(pipe.topics, attr), until=lambda rs: any(r.key == rid.encode()
                                                                                         for r in rs))
        headers += [r.header("traceparent") for r in records if r.key == rid.encode()]
    assert len(headers) == 5 and headers[0] is not None
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-01", headers[0])
    assert set(headers) == {headers[0]}


# --- /metrics -------------------------------------------------------------------------------------


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(url, timeout=5).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


async def test_metrics_endpoint_after_traffic(pipe: Harness, emu: Any) -> None:
    tel = Telemetry.from_env({}, metrics_port=0, metrics_host="127.0.0.1")
    assert tel.metrics_url is not None and not tel.tracing
    with installed(tel):
        before = await anyio.to_thread.run_sync(_scrape, tel.metrics_url)
        emu.faults.schedule("cloudflare", {"status": 401})
        responses: list[AIResponse] = []
        for i in range(4):
            responses.append(await pipe.client.request(request(f"metrics-{pipe.kind}-{i}")))
        assert [r.provider for r in responses] == ["openai", "cloudflare", "cloudflare", "cloudflare"]
        after = await anyio.to_thread.run_sync(_scrape, tel.metrics_url)

    assert _total(after, "aipipe_requests_total", provider="cloudflare", outcome="ok") == 3
    assert _total(after, "aipipe_requests_total", provider="openai", outcome="ok", model="gpt-3.5-turbo") == 1
    assert _total(after, "aipipe_provider_attempts_total", provider="cloudflare", outcome="error",
                  error_type="authentication") == 1
    hist = "aipipe_provider_attempt_duration_milliseconds"
    assert _total(after, f"{hist}_count", provider="cloudflare", outcome="ok") == 3
    assert _total(after, f"{hist}_count", provider="cloudflare", outcome="error") == 1
    assert _total(after, f"{hist}_count", provider="openai", outcome="ok") == 1
    latencies = sum(a.latency_ms for r in responses for a in r.attempts)
    assert _total(after, f"{hist}_sum") == pytest.approx(latencies, abs=0.01)
    assert _total(after, f"{hist}_bucket", le="+Inf") == 5
    assert _total(after, "aipipe_request_duration_milliseconds_count") == 4
    assert _total(after, "aipipe_cost_usd_total") == pytest.approx(sum(r.cost_usd for r in responses), rel=1e-6)
    assert _total(after, "aipipe_cost_usd_total", provider="openai") == pytest.approx(responses[0].cost_usd)
    assert _total(after, "aipipe_tokens_total", gen_ai_token_type="input") == sum(
        r.usage.prompt_tokens for r in responses
    )
    misses = _total(after, "aipipe_cache_lookups_total", result="miss")
    assert misses - _total(before, "aipipe_cache_lookups_total", result="miss") == 4
    for stage in STAGES:
        delta = _total(after, "aipipe_stage_messages_total", stage=stage) - _total(
            before, "aipipe_stage_messages_total", stage=stage
        )
        assert delta == 4, stage
        assert any(lab["stage"] == stage for lab, _ in after["aipipe_consumer_lag"])
        assert _total(after, "aipipe_stage_in_flight", stage=stage) >= 0
    assert all(v >= 0 for _, v in after["aipipe_consumer_lag"])


# --- secrets never printed -----------------------------------------------------------------------

FAKE = {
    "OPENAI_API_KEY": "sk-LEAKCHECK-openai-7f3a9c2e51d0",
    "ANTHROPIC_API_KEY": "sk-ant-LEAKCHECK-anthropic-4b8d1e",
    "CLOUDFLARE_API_TOKEN": "LEAKCHECK-cf-token-9e2c7a1f",
    "CLOUDFLARE_ACCOUNT_ID": "LEAKCHECKaccount5d1e",
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(args: list[str], env: dict[str, str], out: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", *args], env=env, stdout=out, stderr=subprocess.STDOUT
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _run_and_probe(
    tmp: Path, bootstrap: str, prefix: str, extra_env: dict[str, str], args: list[str], emulator: Any
) -> tuple[str, list[bytes], dict[str, Any]]:
    """Start ``aipipe run``, send traffic with failing calls, read every topic; return (output, values, scrape)."""
    from pipeline.bus.kafka import KafkaBus, KafkaSettings
    from pipeline.bus.topics import Topics
    from pipeline.client.pipeline_client import PipelineClient

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPIPE_", "OTEL_"))}
    env.update(FAKE)
    env.update(
        {
            "LOG_LEVEL": "debug",
            "AIPIPE_KAFKA_BOOTSTRAP": bootstrap,
            "AIPIPE_TOPIC_PREFIX": prefix,
            "AIPIPE_HOME": str(tmp / "home"),
            "AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "AIPIPE_KAFKA_HEARTBEAT_INTERVAL_MS": "300",
            "AIPIPE_METRICS_PORT": str(port),
            **extra_env,
        }
    )
    log_path = tmp / f"{prefix}log"
    topics = Topics(prefix)
    with log_path.open("wb") as out:
        proc = _spawn(args, env, out)
        try:
            bus = KafkaBus(bootstrap, KafkaSettings(session_timeout_ms=2000, heartbeat_interval_ms=300))
            await bus.start()
            try:
                with anyio.fail_after(60):
                    while b"aipipe running on" not in log_path.read_bytes():
                        assert proc.poll() is None, log_path.read_text()
                        await anyio.sleep(0.1)
                async with anyio.create_task_group() as tg:
                    client = PipelineClient(bus, topics)
                    await tg.start(client.run)
                    # Failing calls whose error bodies echo the keys (as some providers do): a 401 that
                    # falls back, a 401 with no fallback (an error response), a 500 that is retried.
                    key_echo = " ".join(f"Incorrect API key provided: {v}." for v in FAKE.values())
                    emulator.faults.schedule("cloudflare", {"status": 401, "message": key_echo})
                    emulator.faults.schedule("openai", {"status": 401, "message": key_echo})
                    failed = await client.request(request(f"{prefix}failing", providers=["openai"]), timeout_s=30)
                    assert failed.status == "error" and failed.error is not None, failed
                    assert failed.error.type in ("authentication", "all_providers_failed")
                    for i in range(3):
                        if i == 1:
                            emulator.faults.schedule("cloudflare", {"status": 500, "message": key_echo})
                        answer = await client.request(request(f"{prefix}more-{i}"), timeout_s=30)
                        assert answer.status == "ok", answer
                    client.stop()
                scrape = await anyio.to_thread.run_sync(_scrape, f"http://127.0.0.1:{port}/metrics")
                values: list[bytes] = []
                consumer = await bus.consumer(topics.all(), group=None, from_beginning=True)
                try:
                    empty = 0
                    while empty < 2:  # every topic, from the beginning, until two polls in a row find nothing
                        batch = await consumer.getmany(300, max_records=1000)
                        empty = 0 if batch else empty + 1
                        values += [r.value for r in batch]
                        values += [r.key or b"" for r in batch]
                        values += [v for _, v in (h for r in batch for h in r.headers)]
                finally:
                    await consumer.stop()
            finally:
                await bus.stop()
        finally:
            await anyio.to_thread.run_sync(_stop, proc)
    return log_path.read_text(errors="replace"), values, scrape


@pytest.mark.kafka
async def test_no_secret_in_logs_spans_or_topics(
    kafka_bootstrap: str, unique_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.emulator import EmulatorServer
    from pipeline.emulator import app as emulator_app

    keys_seen: list[str] = []
    original = emulator_app._api_key

    def recording(provider: Any, headers: Any) -> str | None:
        key = original(provider, headers)
        keys_seen.append(key or "")
        return key

    monkeypatch.setattr(emulator_app, "_api_key", recording)
    results: dict[str, tuple[str, list[bytes], dict[str, Any]]] = {}
    paths: list[str] = []

    async def emulated() -> None:  # --emulate: the providers get the emulator's own key
        async with EmulatorServer() as emulator:
            results["emulate"] = await _run_and_probe(
                tmp_path, kafka_bootstrap, f"{unique_prefix}emu.", {"AIPIPE_EMULATOR_URL": emulator.url},
                ["--emulate"], emulator,
            )

    async def real_keys() -> None:  # production, the user's keys sent to "providers" at the emulator's address
        async with EmulatorServer() as emulator:
            base = emulator.url
            real_env = {
                "AIPIPE_ENV": "production",
                "OPENAI_BASE_URL": f"{base}/v1",
                "ANTHROPIC_BASE_URL": base,
                "CLOUDFLARE_BASE_URL": f"{base}/client/v4",
            }
            results["real"] = await _run_and_probe(
                tmp_path, kafka_bootstrap, f"{unique_prefix}real.", real_env, [], emulator
            )
            paths.extend(c.path for c in emulator.calls())

    async with anyio.create_task_group() as tg:
        tg.start_soon(emulated)
        tg.start_soon(real_keys)

    # the second run really sent the user's keys (and account id) to the "provider"
    assert FAKE["OPENAI_API_KEY"] in keys_seen and FAKE["CLOUDFLARE_API_TOKEN"] in keys_seen
    assert any(FAKE["CLOUDFLARE_ACCOUNT_ID"] in p for p in paths)
    for out, vals, samples in results.values():
        spans = [line for line in out.splitlines() if line.startswith("{") and '"trace_id"' in line
                 and '"context"' in line]
        logs = [line for line in out.splitlines() if line.startswith("{") and '"logger"' in line]
        assert len(spans) > 20 and len(logs) > 10  # console exporter (debug) and JSON logs both ran
        assert any(json.loads(s)["attributes"].get("error.type") == "authentication" for s in spans)
        assert any("failed: authentication" in json.loads(line)["message"] for line in logs)
        assert len(vals) > 50
        assert _total(samples, "aipipe_provider_attempts_total", outcome="error") >= 2
        for name, secret in FAKE.items():
            assert secret not in out, f"{name} printed by aipipe run"
            assert not any(secret.encode() in v for v in vals), f"{name} in a topic message"
            assert secret not in json.dumps(samples), f"{name} in /metrics"


# --- get_metrics ----------------------------------------------------------------------------------


async def test_get_metrics_per_provider_from_the_topics() -> None:
    from pipeline import AIProviderManager
    from pipeline.client.metrics_book import percentile
    from pipeline.emulator import EmulatorServer
    from pipeline.runtime.config import config_from_mapping, preset

    fast = {"retry": {"base_delay_ms": 5, "max_delay_ms": 50}}
    config = config_from_mapping({"providers": {"cloudflare": fast, "openai": fast}}, base=preset("development"))
    async with EmulatorServer() as emu:
        env = {"AIPIPE_EMULATE": "1", "AIPIPE_EMULATOR_URL": emu.url, "AIPIPE_TOPIC_PREFIX": "metrics."}
        async with AIProviderManager(config, env) as manager:
            emu.faults.schedule("cloudflare", {"status": 500})  # retried on the same provider
            emu.faults.schedule("openai", {"status": 500})
            responses = [
                await manager.generate_content({"model": "gpt-3.5-turbo", "prompt": f"metrics {i}", "max_tokens": 32})
                for i in range(6)
            ]
            metrics = await manager.get_metrics()
    attempts = [a for r in responses for a in r.attempts]
    assert any(a.outcome == "error" for a in attempts)
    for provider in {a.provider for a in attempts}:
        mine = [a for a in attempts if a.provider == provider]
        m = metrics[provider]
        assert m.request_count == len(mine)
        assert m.success_count == sum(a.outcome == "ok" for a in mine)
        assert m.failure_count == sum(a.outcome == "error" for a in mine) == m.request_count - m.success_count
        latencies = sorted(a.latency_ms for a in mine)
        assert m.average_latency_ms == pytest.approx(sum(latencies) / len(latencies), abs=0.001)
        assert m.average_latency == m.average_latency_ms
        assert m.p50_latency_ms == percentile(latencies, 50) and m.p99_latency_ms == percentile(latencies, 99)
        assert m.p50_latency_ms <= m.p95_latency_ms <= m.p99_latency_ms
        answered = [r for r in responses if r.provider == provider]
        assert m.total_cost_usd == m.total_cost == pytest.approx(sum(r.cost_usd for r in answered), abs=1e-9)
        assert m.total_tokens == sum(r.usage.total_tokens for r in answered)
    assert set(config.enabled_providers()) <= set(metrics)


async def test_streamed_calls_record_their_time_to_first_chunk(pipe: Harness, emu: Any) -> None:
    tel = Telemetry.from_env({}, metrics_port=0, metrics_host="127.0.0.1")
    assert tel.metrics_url is not None
    with installed(tel):
        handle = await pipe.client.stream(
            msgspec.convert(
                {"id": f"ttft-{pipe.kind}", "model": "gpt-3.5-turbo", "prompt": "ttft", "stream": True,
                 "cache": {"bypass": True}},
                AIRequest,
            )
        )
        with anyio.fail_after(20):
            async for _ in handle:
                pass
        after = await anyio.to_thread.run_sync(_scrape, tel.metrics_url)
    assert handle.response is not None and handle.response.status == "ok"
    first_ms = handle.response.attempts[-1].first_chunk_ms
    hist = "aipipe_stream_time_to_first_chunk_milliseconds"
    assert _total(after, f"{hist}_count", provider="cloudflare") == 1
    assert _total(after, f"{hist}_sum", provider="cloudflare") == pytest.approx(first_ms, abs=0.01)
    assert _total(after, "aipipe_streams_total", provider="cloudflare", outcome="completed") == 1
    chunks = handle.response.stream_chunks
    assert _total(after, "aipipe_stream_chunks_sum", outcome="completed") == chunks and chunks
