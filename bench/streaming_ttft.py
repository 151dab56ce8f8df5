"""Time to first token through aipipe, against a bare streaming client on the same emulator (issue 18).

    .venv/bin/python bench/streaming_ttft.py [--streams 100] [--concurrency 20] [--latency-ms 50]

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
at a time, then the same number ``--concurrency`` at a time. The overhead
columns subtract the bare client's value. Writes ``bench/results/streaming-<UTC time>.json``.
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
import msgspec

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

Sample = tuple[float, float]  # (first chunk ms, whole answer ms)
Target = Callable[[str, str], Awaitable[Sample]]

NO_LIMITS = {"rate_limit": {"requests_per_minute": None, "tokens_per_minute": None}}


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(0, -(-int(pct * len(ordered)) // 100) - 1)
    return ordered[min(rank, len(ordered) - 1)]


async def bare_stream(client: httpx.AsyncClient, url: str, prompt: str) -> Sample:
    """One stream read straight from the emulator (the floor): the executor's own adapter and HTTP client class."""
    adapter = OpenAIAdapter(f"{url}/v1", "sk-bench")
    call = ProviderCall(model="gpt-4o-mini", messages=[Message(role="user", content=prompt)], max_tokens=400)
    started = time.perf_counter()
    first = 0.0
    async for item in adapter.stream(client, call, 30.0):
        if not first and isinstance(item, StreamDelta):
            first = (time.perf_counter() - started) * 1000
    return first, (time.perf_counter() - started) * 1000


def pipeline_stream(client: PipelineClient) -> Target:
    """One stream through the pipeline, read as ``PipelineClient.stream`` chunks."""

    async def run(rid: str, prompt: str) -> Sample:
        request = AIRequest(
            id=rid, model="gpt-4o-mini", prompt=prompt, max_tokens=400, stream=True, providers=["openai"]
        )
        started = time.perf_counter()
        first = 0.0
        handle = await client.stream(msgspec.structs.replace(request, cache=None))
        async for _ in handle:
            if not first:
                first = (time.perf_counter() - started) * 1000
        assert handle.response is not None and handle.response.status == "ok", handle.response
        return first, (time.perf_counter() - started) * 1000

    return run


async def measure(name: str, target: Target, prompts: list[str], streams: int, concurrency: int) -> dict[str, object]:
    """``streams`` streams one at a time, then ``streams`` more ``concurrency`` at a time."""
    result: dict[str, object] = {"target": name}
    for mode, width in (("sequential", 1), ("concurrent", concurrency)):
        samples: list[Sample] = []
        indexes = iter(range(streams))

        async def worker(mode: str, samples: list[Sample], indexes: Iterator[int]) -> None:
            for i in indexes:
                prompt = f"{prompts[i % len(prompts)]} ({name} {mode} {i})"
                samples.append(await target(f"{name}-{mode}-{i}", prompt))

        async with anyio.create_task_group() as tg:
            for _ in range(width):
                tg.start_soon(worker, mode, samples, indexes)
        firsts, wholes = [s[0] for s in samples], [s[1] for s in samples]
        result[mode] = {
            "ttft_p50_ms": round(statistics.median(firsts), 1),
            "ttft_p99_ms": round(percentile(firsts, 99), 1),
            "whole_p50_ms": round(statistics.median(wholes), 1),
            "whole_p99_ms": round(percentile(wholes, 99), 1),
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
    results: list[dict[str, object]] = []
    work = Path(tempfile.mkdtemp(prefix="aipipe-stream-bench-"))
    async with EmulatorProcess() as emulator:
        chunked = {"latency": {"dist": "fixed", "ms": args.latency_ms}, "default": {"chunk_interval_ms": 5}}
        await emulator.set_profile(
            {"reply_words": 40, "providers": dict.fromkeys(("openai", "anthropic", "cloudflare"), chunked)}
        )

        async with ProviderHttpClient(max_connections=256, timeout=30) as http:
            results.append(
                await measure(
                    "bare", lambda _rid, p: bare_stream(http, emulator.url, p), prompts, args.streams, args.concurrency
                )
            )

        async def on(client: PipelineClient, name: str) -> None:
            results.append(await measure(name, pipeline_stream(client), prompts, args.streams, args.concurrency))

        await with_pipeline(MemoryBus(), emulator.url, "sb-mem.", lambda c: on(c, "memory"))
        broker = EmbeddedBroker(log_path=work / "broker.log")
        await broker.start()
        try:
            kafka = KafkaBus(broker.address, KafkaSettings())
            await with_pipeline(kafka, emulator.url, "sb-kafka.", lambda c: on(c, "kafka"))
        finally:
            await broker.stop()

    bare = results[0]
    print(f"latency {args.latency_ms} ms, 40 words at 5 ms each, {args.streams} streams per mode")
    print(f"{'target':<8} {'mode':<11} {'TTFT p50':>9} {'p99':>7} {'over p50':>9} {'whole p50':>10} {'p99':>7}")
    for row in results:
        for mode in ("sequential", "concurrent"):
            m = row[mode]
            b = bare[mode]
            assert isinstance(m, dict) and isinstance(b, dict)
            over = m["ttft_p50_ms"] - b["ttft_p50_ms"]
            print(
                f"{row['target']:<8} {mode:<11} {m['ttft_p50_ms']:>9.1f} {m['ttft_p99_ms']:>7.1f} {over:>+9.1f} "
                f"{m['whole_p50_ms']:>10.1f} {m['whole_p99_ms']:>7.1f}"
            )
    out = Path(__file__).parent / "results" / f"streaming-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    sys.exit(anyio.run(main, parser.parse_args()))
