"""Idle CPU of ``aipipe run`` and latency at a light load, per ``fetch_max_wait_ms``: the trade-off in numbers.

    .venv/bin/python bench/idle_cpu.py [--waits 5,10,25,50] [--idle-s 20] [--requests 1000 --rate 50]
                                       [--stages all|seven] [--seconds-between 2]

For each value of ``AIPIPE_KAFKA_FETCH_MAX_WAIT_MS`` it starts the default
``aipipe run --emulate`` (one process; its own embedded broker; every default
stage and the archive, or ``--stages seven`` for the seven stages without the
archive) under a temporary ``AIPIPE_HOME``, waits for it to be up and settle,
then measures:

* idle: CPU time (user + system) of the ``aipipe run`` process and of the
  broker (its child) over ``--idle-s`` seconds with no traffic, as a share of
  one core (%);
* light load: ``--requests`` requests sent at ``--rate`` requests/s on average
  (open loop with Poisson arrivals, seeded: a fixed interval that divides the
  fetch cycle lines requests up with it and shows a latency no real traffic
  sees; each request distinct, so none is a cache hit) through ``PipelineClient``, the
  emulator answering at once; latency p50 and p99 from send to answer (ms),
  and the CPU the run and the broker used per request (ms).

The emulator runs as its own process; its CPU is not counted. Needs psutil
(``pip install 'aipipe[bench]'``). Writes ``bench/results/idle-cpu-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psutil  # type: ignore[import-untyped]

from pipeline.assembly.build import ALL_STAGES
from pipeline.assembly.process import open_bus
from pipeline.bench.driver import EmulatorProcess
from pipeline.bench.processes import bench_env, cpu_seconds, start_run, stop_all
from pipeline.bench.stats import percentile
from pipeline.bench.targets import bench_prompts
from pipeline.client.pipeline_client import PipelineClient
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest


async def measure(wait_ms: int, args: argparse.Namespace, emulator: EmulatorProcess) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="aipipe-idle-"))
    env = bench_env(work, emulator.url, AIPIPE_KAFKA_FETCH_MAX_WAIT_MS=str(wait_ms))
    run = await start_run(env, work / "run.log", stages=ALL_STAGES if args.stages == "seven" else ())
    try:
        broker = [c.pid for c in psutil.Process(run.pid).children(recursive=True)]
        await anyio.sleep(args.settle_s)
        procs = {"aipipe": [run.pid], "broker": broker}
        before = {name: cpu_seconds(p) for name, p in procs.items()}
        started = time.monotonic()
        await anyio.sleep(args.idle_s)
        elapsed = time.monotonic() - started
        idle = {name: round(100 * (cpu_seconds(p) - before[name]) / elapsed, 1) for name, p in procs.items()}

        prompts = bench_prompts()
        settings = Settings.from_env(env)
        latencies: list[float] = []
        failed = 0
        async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
            client = PipelineClient(opened.bus, settings.topics)
            await tg.start(client.run)
            for i in range(20):  # warm-up: connections, the first routing decisions
                await client.request(_request(f"warm-{wait_ms}-{i}", prompts, i), timeout_s=30)
            before = {name: cpu_seconds(p) for name, p in procs.items()}

            async def one(i: int) -> None:
                nonlocal failed
                asked = time.perf_counter()
                try:
                    response = await client.request(_request(f"load-{wait_ms}-{i}", prompts, i), timeout_s=30)
                except TimeoutError:
                    failed += 1
                    return
                if response.status != "ok":
                    failed += 1
                    return
                latencies.append((time.perf_counter() - asked) * 1000)

            arrivals = random.Random(wait_ms)
            async with anyio.create_task_group() as senders:
                due = time.monotonic()
                for i in range(args.requests):
                    due += arrivals.expovariate(args.rate)
                    await anyio.sleep(max(0.0, due - time.monotonic()))
                    senders.start_soon(one, i)
            per_request = {
                name: round(1000 * (cpu_seconds(p) - before[name]) / args.requests, 2) for name, p in procs.items()
            }
            client.stop()
            tg.cancel_scope.cancel()
    finally:
        await stop_all([run])
    latencies.sort()
    row = {
        "fetch_max_wait_ms": wait_ms,
        "stages": args.stages,
        "idle_cpu_pct": idle,
        "p50_ms": round(percentile(latencies, 0.5) or 0.0, 1),
        "p99_ms": round(percentile(latencies, 0.99) or 0.0, 1),
        "cpu_ms_per_request": per_request,
        "failed": failed,
    }
    print(
        f"fetch_max_wait_ms {wait_ms:>3} ({args.stages}): idle CPU aipipe {idle['aipipe']:5.1f} % "
        f"broker {idle['broker']:5.1f} %; at {args.rate:g}/s p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:6.1f} ms, "
        f"CPU per request aipipe {per_request['aipipe']} ms broker {per_request['broker']} ms; {failed} failed",
        flush=True,
    )
    return row


def _request(request_id: str, prompts: list[str], i: int) -> AIRequest:
    return AIRequest(
        id=request_id,
        model="gpt-3.5-turbo",
        prompt=f"{prompts[i % len(prompts)]} ({request_id})",
        max_tokens=64,
        timeout_ms=30_000,
    )


async def main(args: argparse.Namespace) -> int:
    rows = []
    async with EmulatorProcess() as emulator:
        await emulator.set_latency(0)
        for wait_ms in args.waits:
            rows.append(await measure(wait_ms, args, emulator))
            await anyio.sleep(args.seconds_between)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"idle-cpu-{stamp}.json"
    path.write_text(json.dumps({"args": {**vars(args)}, "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waits", type=lambda t: [int(x) for x in t.split(",")], default=[5, 10, 25, 50])
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="mean requests/s (Poisson arrivals)")
    parser.add_argument("--stages", choices=("all", "seven"), default="all")
    parser.add_argument("--seconds-between", type=float, default=2.0)
    sys.exit(anyio.run(main, parser.parse_args()))
