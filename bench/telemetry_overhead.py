"""Per-message cost of tracing and metrics on the stage runner's hot path.

Runs one ``StageRunner`` over the in-process bus with a stage that does
nothing but emit one output per input (so the runner's own work is all there
is), N messages, in four modes, several rounds each, and prints the median
time per message (us):

* ``off``: no exporter (the default): no spans; the traceparent is passed on;
* ``off-no-header``: the same, inputs without a traceparent (the first stage
  makes one per message);
* ``tracing``: an SDK tracer with a batch processor to an exporter that drops
  everything (the cost of creating, filling and ending one recording span);
* ``tracing+metrics``: the same plus a Prometheus-read meter provider.

Then the cost of the per-attempt and per-request metric records (executor,
recorder) with and without a meter provider.

Usage: ``.venv/bin/python bench/telemetry_overhead.py [N] [ROUNDS]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import anyio
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from pipeline.bus.memory import MemoryBus
from pipeline.bus.protocol import Outgoing
from pipeline.runtime import telemetry
from pipeline.runtime.runner import Emit, MessageContext, StageRunner
from pipeline.runtime.telemetry import Telemetry, build_tracer_provider, new_traceparent, start_prometheus
from schemas.response import ErrorInfo, Usage


class _Drop(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Echo:
    name = "echo"
    input_topic = "in"

    def decode(self, raw: bytes) -> bytes:
        return raw

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        return [Emit("out", None, {"v": 1})]

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        return []


async def _run_once(n: int, with_header: bool) -> float:
    bus = MemoryBus(trim_above=10 * n)
    await bus.start()
    headers = (("traceparent", new_traceparent()),) if with_header else ()
    for i in range(n):
        await bus.publish(Outgoing("in", b'{"i": %d}' % i, key=b"k", headers=headers))
    runner = StageRunner(bus, _Echo(), group="g", deadletter_topic="dlq", max_in_flight=512)
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        while runner.processed < n:
            await anyio.sleep(0.001)
        elapsed = time.perf_counter() - started
        runner.stop()
    await bus.stop()
    return elapsed / n * 1e6


async def _mode(name: str, tel: Telemetry, n: int, rounds: int, with_header: bool = True) -> float:
    previous = telemetry.install(tel)
    try:
        await _run_once(min(n, 2000), with_header)  # warm-up
        results = [await _run_once(n, with_header) for _ in range(rounds)]
    finally:
        telemetry.install(previous)
        tel.shutdown()
    median = statistics.median(results)
    print(f"{name:18s} {median:7.2f} us/message  (rounds: {', '.join(f'{r:.2f}' for r in results)})")
    return median


def _records(tel: Telemetry, n: int) -> float:
    usage = Usage(prompt_tokens=20, completion_tokens=40, total_tokens=60)
    started = time.perf_counter()
    for _ in range(n):
        tel.finish_attempt(None, "openai", "gpt-4o-mini", ok=True, status_code=200, error_type=None, latency_ms=12.5)
        tel.record_outcome(
            provider="openai",
            model="gpt-4o-mini",
            status="ok",
            cached=False,
            error_type=None,
            latency_ms=20.0,
            usage=usage,
            cost_usd=Decimal("0.00001"),
        )
    return (time.perf_counter() - started) / n * 1e6


async def main(n: int, rounds: int) -> None:
    print(f"stage runner, in-process bus, {n} messages x {rounds} rounds (median per message)")
    off = await _mode("off", Telemetry.disabled(), n, rounds)
    await _mode("off-no-header", Telemetry.disabled(), n, rounds, with_header=False)
    traced = await _mode("tracing", Telemetry(tracer_provider=build_tracer_provider({}, [_Drop()])), n, rounds)
    meter, _url, stop = start_prometheus({}, 0, "127.0.0.1")
    both = Telemetry(tracer_provider=build_tracer_provider({}, [_Drop()]), meter_provider=meter, on_shutdown=[stop])
    await _mode("tracing+metrics", both, n, rounds)
    print(f"tracing adds {traced - off:.2f} us per stage message")
    started = time.perf_counter()
    for _ in range(100_000):
        new_traceparent()
    print(f"new_traceparent: {(time.perf_counter() - started) * 10:.2f} us")
    disabled = _records(Telemetry.disabled(), 50_000)
    meter, _url, stop = start_prometheus({}, 0, "127.0.0.1")
    metered = Telemetry(meter_provider=meter, on_shutdown=[stop])
    enabled = _records(metered, 50_000)
    metered.shutdown()
    print(f"metric records per request (one attempt + one outcome): {disabled:.2f} us off, {enabled:.2f} us on")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 20_000, int(sys.argv[2]) if len(sys.argv) > 2 else 5)
