"""Time to first token through aipipe, against a bare streaming client on the same emulator (issue 18).

    .venv/bin/python bench/streaming_ttft.py [--streams 200] [--concurrency 100] [--latency-ms 50]

The emulator runs as its own process with a fixed latency before each answer
(``--latency-ms``, the provider's time to first token) and 40-word answers
streamed one word per 5 ms. Three targets read the same prompts (the real
MT-Bench and Vicuna questions) as streams:

- ``bare``: the executor's own OpenAI adapter and HTTP client class straight
  to the emulator (the floor: the same call with no pipeline);
- ``memory``: ``PipelineClient.stream`` with every stage in this process on the
  in-process bus;
- ``kafka``: the same over the embedded broker (stages in this process).

For each: time to first chunk (request sent to first text in the caller's
hands) and time to the whole answer, p50/p99 (ms), first ``--streams`` one
at a time, then the same number ``--concurrency`` at a time; the same again
without streaming (``-plain``), so that the streaming overhead can be set
against the plain request overhead of the same run (the ``ratio`` column:
TTFT overhead / plain overhead, p50). ``per flush``: the most chunks any
stream published per ``flush_ms`` window (the first chunk counts as one
window). The overhead columns subtract the bare client's value. Writes
``bench/results/streaming-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx

from pipeline.assembly.build import PIPELINE_STAGES, Pipeline
from pipeline.bench.driver import EmulatorProcess
from pipeline.bench.targets import bench_prompts
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.memory import MemoryBus
from pipeline.bus.protocol import Bus
from pipeline.client.pipeline_client import PipelineClient
from pipeline.runtime.config import config_from_mapping, preset
from pipeline.runtime.endpoints import resolve_endpoints
from pipeline.runtime.http_client import ProviderHttpClient
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest, Message
from stages.providers.base import ProviderCall, StreamDelta
from stages.providers.openai import OpenAIAdapter

Sample = tuple[float, float, int]  # (first chunk ms, whole answer ms, chunks received)
Target = Callable[[str, str], Awaitable[Sample]]

#: ``[stream] flush_ms`` of the pipeline under test (the default).
FLUSH_MS = 20.0

NO_LIMITS = {"rate_limit": {"requests_per_minute": None, "tokens_per_minute": None}}


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(0, -(-int(pct * len(ordered)) // 100) - 1)
    return ordered[min(rank, len(ordered) - 1)]


def bare_target(client: httpx.AsyncClient, url: str, *, stream: bool) -> Target:
    """The floor: the executor's own OpenAI adapter and HTTP client class, straight to the emulator."""
    adapter = OpenAIAdapter(f"{url}/v1", "sk-bench")

    async def run(_rid: str, prompt: str) -> Sample:
        call = ProviderCall(model="gpt-4o-mini", messages=[Message(role="user", content=prompt)], max_tokens=400)
        started = time.perf_counter()
        if not stream:
            await adapter.complete(client, call, 30.0)
            took = (time.perf_counter() - started) * 1000
            return took, took, 0
        first, deltas = 0.0, 0
        async for item in adapter.stream(client, call, 30.0):
            if isinstance(item, StreamDelta):
                deltas += 1
                first = first or (time.perf_counter() - started) * 1000
        return first, (time.perf_counter() - started) * 1000, deltas

    return run


def pipeline_target(client: PipelineClient, *, stream: bool) -> Target:
    """One request through the pipeline: streamed (``PipelineClient.stream``) or plain (``request``)."""

    async def run(rid: str, prompt: str) -> Sample:
        request = AIRequest(
            id=rid, model="gpt-4o-mini", prompt=prompt, max_tokens=400, stream=stream, providers=["openai"]
        )
        started = time.perf_counter()
        if not stream:
            response = await client.request(request)
            assert response.status == "ok", response
            took = (time.perf_counter() - started) * 1000
            return took, took, 0
        first, chunks = 0.0, 0
        handle = await client.stream(request)
        async for _ in handle:
            chunks += 1
            first = first or (time.perf_counter() - started) * 1000
        assert handle.response is not None and handle.response.status == "ok", handle.response
        return first, (time.perf_counter() - started) * 1000, chunks

    return run


async def measure(name: str, target: Target, prompts: list[str], count: int, concurrency: int) -> dict[str, object]:
    """``count`` requests one at a time, then ``count`` more ``concurrency`` at a time."""
    result: dict[str, object] = {"target": name}
    for mode, width in (("sequential", 1), ("concurrent", concurrency)):
        samples: list[Sample] = []
        indexes = iter(range(count))

        async def worker(mode: str, samples: list[Sample], indexes: Iterator[int]) -> None:
            for i in indexes:
                prompt = f"{prompts[i % len(prompts)]} ({name} {mode} {i})"
                samples.append(await target(f"{name}-{mode}-{i}", prompt))

        async with anyio.create_task_group() as tg:
            for _ in range(width):
                tg.start_soon(worker, mode, samples, indexes)
        firsts, wholes = [s[0] for s in samples], [s[1] for s in samples]
        # chunks per flush window: the first chunk, then at most one per flush_ms of the rest of the stream
        per_flush = [c / (1 + (w - f) / FLUSH_MS) for f, w, c in samples if c]
        result[mode] = {
            "ttft_p50_ms": round(statistics.median(firsts), 1),
            "ttft_p99_ms": round(percentile(firsts, 99), 1),
            "whole_p50_ms": round(statistics.median(wholes), 1),
            "whole_p99_ms": round(percentile(wholes, 99), 1),
            "chunks_mean": round(statistics.mean(s[2] for s in samples), 1),
            "chunks_per_flush_max": round(max(per_flush), 2) if per_flush else None,
        }
    return result


async def with_pipeline(
    bus: Bus, emulator_url: str, prefix: str, run: Callable[[PipelineClient], Awaitable[None]]
) -> None:
    """Every stage on ``bus`` in this process, all providers on the emulator, and a client; run ``run``."""
    settings = Settings.from_env({"AIPIPE_TOPIC_PREFIX": prefix, "AIPIPE_EMULATE": "1"}, env_name="production")
    config = config_from_mapping(
        {"providers": {p: dict(NO_LIMITS) for p in ("openai", "anthropic", "cloudflare")}}, base=preset("production")
    )
    await bus.start()
    try:
        resolved = resolve_endpoints(settings, config, emulator_url)
        async with Pipeline(settings, resolved, bus, stages=PIPELINE_STAGES), anyio.create_task_group() as tg:
            client = PipelineClient(bus, settings.topics)
            await tg.start(client.run)
            await run(client)
            client.stop()
    finally:
        await bus.stop()


async def main(args: argparse.Namespace) -> int:
    prompts = bench_prompts()
    results: dict[str, dict[str, object]] = {}
    work = Path(tempfile.mkdtemp(prefix="aipipe-stream-bench-"))
    n, width = args.streams, args.concurrency
    async with EmulatorProcess() as emulator:
        pace = {"chunk_interval_ms": args.interval_ms}
        chunked = {"latency": {"dist": "fixed", "ms": args.latency_ms}, "default": pace}
        await emulator.set_profile(
            {"reply_words": args.words, "providers": dict.fromkeys(("openai", "anthropic", "cloudflare"), chunked)}
        )
        async with ProviderHttpClient(max_connections=512, timeout=30) as http:
            for stream in (True, False):
                name = "bare" if stream else "bare-plain"
                results[name] = await measure(name, bare_target(http, emulator.url, stream=stream), prompts, n, width)

        async def on(client: PipelineClient, bus: str) -> None:
            for stream in (True, False):
                name = bus if stream else f"{bus}-plain"
                results[name] = await measure(name, pipeline_target(client, stream=stream), prompts, n, width)

        await with_pipeline(MemoryBus(), emulator.url, "sb-mem.", lambda c: on(c, "memory"))
        broker = EmbeddedBroker(log_path=work / "broker.log")
        await broker.start()
        try:
            await with_pipeline(
                KafkaBus(broker.address, KafkaSettings()), emulator.url, "sb-kafka.", lambda c: on(c, "kafka")
            )
        finally:
            await broker.stop()

    def cell(name: str, mode: str, key: str) -> float:
        value = results[name][mode]
        assert isinstance(value, dict)
        return float(value[key])

    print(
        f"latency {args.latency_ms:g} ms, {args.words} words at {args.interval_ms:g} ms each, "
        f"{n} requests per mode, {width} at once"
    )
    print(
        f"{'target':<8} {'mode':<11} {'TTFT p50':>9} {'p99':>7} {'over p50':>9} {'over p99':>9} "
        f"{'plain over p50':>15} {'ratio':>6} {'chunks':>7} {'per flush':>9}"
    )
    for name in ("bare", "memory", "kafka"):
        for mode in ("sequential", "concurrent"):
            over50 = cell(name, mode, "ttft_p50_ms") - cell("bare", mode, "ttft_p50_ms")
            over99 = cell(name, mode, "ttft_p99_ms") - cell("bare", mode, "ttft_p99_ms")
            plain = f"{name}-plain" if name != "bare" else "bare-plain"
            plain_over = cell(plain, mode, "whole_p50_ms") - cell("bare-plain", mode, "whole_p50_ms")
            ratio = over50 / plain_over if plain_over > 0 and name != "bare" else float("nan")
            per_flush = results[name][mode]["chunks_per_flush_max"]  # type: ignore[index]
            print(
                f"{name:<8} {mode:<11} {cell(name, mode, 'ttft_p50_ms'):>9.1f} {cell(name, mode, 'ttft_p99_ms'):>7.1f} "
                f"{over50:>+9.1f} {over99:>+9.1f} {plain_over:>+15.1f} {ratio:>6.2f} "
                f"{cell(name, mode, 'chunks_mean'):>7.1f} {per_flush if name != 'bare' else '-':>9}"
            )
    out = Path(__file__).parent / "results" / f"streaming-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="provider time to first token (ms)")
    parser.add_argument("--words", type=int, default=40, help="words per answer (one content delta each)")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="gap between deltas (ms)")
    sys.exit(anyio.run(main, parser.parse_args()))
