"""The operator dashboard's load on the pipeline: CPU of ``aipipe dashboard`` and of the broker at a request rate.

    .venv/bin/python bench/dashboard_load.py [--rate 100] [--seconds 20] [--pages 1]

Starts the default ``aipipe run`` (its embedded broker, every stage and the
archive) under a temporary ``AIPIPE_HOME``, then sends ``--rate`` requests/s
(Poisson arrivals, each distinct) for ``--seconds`` through ``PipelineClient``,
three times: without the dashboard, with ``aipipe dashboard`` running as its
own process and ``--pages`` open event streams (``/dashboard/events``, as a
browser tab holds), and without it again (the embedded broker slows as its
topics grow, so the phases around it bound that drift). Reports the CPU (% of one core) of the dashboard process,
the broker and ``aipipe run`` in each phase. Needs psutil (``pip install
'aipipe[bench]'``).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
import psutil  # type: ignore[import-untyped]

from pipeline.assembly.process import open_bus
from pipeline.bench.driver import EmulatorProcess
from pipeline.bench.processes import bench_env, cpu_seconds, start_run, stop_all
from pipeline.bench.targets import bench_prompts
from pipeline.client.pipeline_client import PipelineClient
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="aipipe-dashboard-load-"))
    async with EmulatorProcess() as emulator:
        await emulator.set_latency(0)
        env = bench_env(work, emulator.url)
        run = await start_run(env, work / "run.log")
        procs = [run]
        try:
            broker = [c.pid for c in psutil.Process(run.pid).children(recursive=True)]
            settings = Settings.from_env(env)
            prompts = bench_prompts()
            async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
                client = PipelineClient(opened.bus, settings.topics)
                await tg.start(client.run)

                async def load(phase: str, pids: dict[str, list[int]]) -> dict[str, float]:
                    before = {name: cpu_seconds(p) for name, p in pids.items()}
                    arrivals, due, t0 = random.Random(1), time.monotonic(), time.monotonic()
                    async with anyio.create_task_group() as senders:
                        i = 0
                        while time.monotonic() - t0 < args.seconds:
                            due += arrivals.expovariate(args.rate)
                            await anyio.sleep(max(0.0, due - time.monotonic()))
                            text = f"{prompts[i % len(prompts)]} ({phase} {i})"
                            request = AIRequest(id=f"{phase}-{i}", model="gpt-3.5-turbo", prompt=text, max_tokens=32)
                            senders.start_soon(client.request, request)
                            i += 1
                    elapsed = time.monotonic() - t0
                    return {name: round(100 * (cpu_seconds(p) - before[name]) / elapsed, 1) for name, p in pids.items()}

                without = await load("without", {"aipipe run": [run.pid], "broker": broker})
                dashboard = await anyio.open_process(
                    [sys.executable, "-m", "pipeline.cli", "dashboard", "--port", "0"], env=env, stderr=-1
                )
                procs.append(dashboard)
                assert dashboard.stderr is not None
                seen = b""
                async for chunk in dashboard.stderr:
                    seen += chunk
                    if b"/dashboard/" in seen:
                        break
                url = seen.decode().split("aipipe dashboard: ")[1].split()[0]
                async with httpx.AsyncClient(timeout=None) as http, anyio.create_task_group() as pages:
                    for _ in range(args.pages):

                        async def follow() -> None:
                            async with http.stream("GET", url + "events") as stream:
                                async for _line in stream.aiter_lines():
                                    pass

                        pages.start_soon(follow)
                    await anyio.sleep(5)  # the dashboard has read the topics' history
                    pids = {"aipipe run": [run.pid], "broker": broker, "dashboard": [dashboard.pid]}
                    with_dashboard = await load("with", pids)
                    pages.cancel_scope.cancel()
                await stop_all([dashboard])
                after = await load("after", {"aipipe run": [run.pid], "broker": broker})
                client.stop()
                tg.cancel_scope.cancel()
        finally:
            await stop_all(procs)
    print(f"{args.rate:g} requests/s for {args.seconds:g} s, {args.pages} open page(s); CPU, % of one core:")
    print(f"  without the dashboard: {without}")
    print(f"  with the dashboard:    {with_dashboard}")
    print(f"  after it stopped:      {after}  (the broker slows as its topics grow: compare with both)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pages", type=int, default=1)
    sys.exit(anyio.run(main, parser.parse_args()))
