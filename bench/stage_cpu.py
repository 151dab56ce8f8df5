"""aipipe's own CPU time per request, per stage: each stage in its own process, on the Kafka bus.

    .venv/bin/python bench/stage_cpu.py [--rate 100] [--requests 3000] [--idle-s 15]

Starts the embedded broker, the provider emulator (no added latency) and the
eight default stages of ``aipipe run`` (the seven and the archive) as eight
``aipipe run --stage NAME`` processes, then:

1. measures each process's CPU with no traffic for ``--idle-s`` seconds (idle
   CPU, % of one core: mostly fetch polling, about ``1000 / fetch_max_wait_ms``
   fetches a second per consumer);
2. sends ``--requests`` requests at ``--rate`` requests/s (open loop, each
   distinct, so no cache hits) through ``PipelineClient``, and reports each
   process's CPU per request (ms): the total, and the marginal part (the total
   minus what the process burns idle over the same time).

This is the cost aipipe adds per request on any Kafka, a real cluster included
(where fetches are woken by new data and the broker's own floor is far lower
than on the embedded broker): a stage's process holds its decision, the runner
(decode, publish, commit) and its aiokafka clients. The broker's CPU is listed
too. Needs psutil (``pip install 'aipipe[bench]'``). Writes
``bench/results/stage-cpu-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc

from pipeline.assembly.build import RUN_STAGES
from pipeline.assembly.process import open_bus
from pipeline.bench.driver import EmulatorProcess
from pipeline.bench.processes import bench_env, cpu_seconds, start_run, stop_all
from pipeline.bench.targets import bench_prompts
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.client.pipeline_client import PipelineClient
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="aipipe-stage-cpu-"))
    broker = EmbeddedBroker(log_path=work / "broker.log")
    await broker.start()
    procs: dict[str, anyio.abc.Process] = {}
    try:
        async with EmulatorProcess() as emulator:
            await emulator.set_latency(0)
            env = bench_env(work, emulator.url, AIPIPE_KAFKA_BOOTSTRAP=broker.address, AIPIPE_TOPIC_PREFIX="cpu.")
            for name in RUN_STAGES:
                procs[name] = await start_run(env, work / f"{name}.log", stages=[name], wait_for=None)
            pids = {name: [p.pid] for name, p in procs.items()} | {"broker": [broker.pid]}
            prompts = bench_prompts()
            settings = Settings.from_env(env)
            async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
                await opened.bus.ensure_topics(settings.topics.all())
                client = PipelineClient(opened.bus, settings.topics)
                await tg.start(client.run)

                def request(i: int) -> AIRequest:
                    text = f"{prompts[i % len(prompts)]} (#{i})"
                    return AIRequest(
                        id=f"cpu-{i}", model="gpt-3.5-turbo", prompt=text, max_tokens=64, timeout_ms=30_000
                    )

                for i in range(50):  # every stage has joined and warmed up once this is answered
                    assert (await client.request(request(-1 - i), timeout_s=60)).status == "ok"
                await anyio.sleep(5)  # the background stages (breaker, health, archive) settle

                before = {name: cpu_seconds(p) for name, p in pids.items()}
                t0 = time.monotonic()
                await anyio.sleep(args.idle_s)
                idle_s = time.monotonic() - t0
                idle = {name: (cpu_seconds(p) - before[name]) / idle_s for name, p in pids.items()}

                failed = 0

                async def one(i: int) -> None:
                    nonlocal failed
                    try:
                        response = await client.request(request(i), timeout_s=60)
                        failed += response.status != "ok"
                    except TimeoutError:
                        failed += 1

                before = {name: cpu_seconds(p) for name, p in pids.items()}
                t0 = time.monotonic()
                async with anyio.create_task_group() as senders:
                    for i in range(args.requests):
                        await anyio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
                        senders.start_soon(one, i)
                load_s = time.monotonic() - t0
                used = {name: cpu_seconds(p) - before[name] for name, p in pids.items()}
                client.stop()
                tg.cancel_scope.cancel()
    finally:
        await stop_all(procs.values())
        await broker.stop()
    rows = []
    print(f"\n{args.requests} requests at {args.rate:g}/s in {load_s:.1f} s, {failed} failed")
    print(f"{'process':<10} {'idle % of a core':>17} {'CPU ms/request':>15} {'marginal ms/request':>20}")
    for name in [*RUN_STAGES, "broker"]:
        per_request = 1000 * used[name] / args.requests
        marginal = 1000 * max(0.0, used[name] - idle[name] * load_s) / args.requests
        rows.append(
            {
                "process": name,
                "idle_pct": round(100 * idle[name], 1),
                "cpu_ms_per_request": round(per_request, 3),
                "marginal_ms_per_request": round(marginal, 3),
            }
        )
        print(f"{name:<10} {100 * idle[name]:17.1f} {per_request:15.3f} {marginal:20.3f}")
    stage_rows = [r for r in rows if r["process"] != "broker"]
    total = sum(r["cpu_ms_per_request"] for r in stage_rows)
    marginal_total = sum(r["marginal_ms_per_request"] for r in stage_rows)
    idle_total = sum(r["idle_pct"] for r in stage_rows)
    print(f"{'aipipe':<10} {idle_total:17.1f} {total:15.3f} {marginal_total:20.3f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"stage-cpu-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "failed": failed, "load_s": load_s, "rows": rows}, indent=1))
    print(f"written {path} (logs in {work})")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s, open loop")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--idle-s", type=float, default=15.0, help="seconds of no traffic for the idle CPU")
    sys.exit(anyio.run(main, parser.parse_args()))
