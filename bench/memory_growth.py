"""RSS of every stage, each in its own process, over a long run (issue 17, item 9).

    .venv/bin/python bench/memory_growth.py [--requests 100000] [--clients 200] [--every 10000]

Starts the embedded broker, the provider emulator (no added latency) and the
seven stages as seven ``aipipe run --stage NAME`` processes, then sends
``--requests`` requests from ``--clients`` concurrent clients (``PipelineClient``
on Kafka) and reads each stage's resident set size (``VmRSS`` of
``/proc/<pid>/status``, MiB) every ``--every`` answers. Prompts are the 160
real MT-Bench and Vicuna questions, each made distinct by a number except one
in ten (cache hits); 200 users; a global daily budget (so the gate reserves
and settles every request); rate limits off. Prints a table and writes
``bench/results/memory-<UTC time>.json``.

"Flat after warm-up" is read from the table: the growth from the first
sample past ``--warmup`` answers to the last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc

from pipeline.assembly.process import open_bus
from pipeline.bench.driver import EmulatorProcess
from pipeline.bench.processes import NO_LIMITS_CONFIG
from pipeline.bench.targets import bench_prompts
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.client.pipeline_client import PipelineClient
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest

STAGES = ("cache", "budget", "router", "executor", "recorder", "breaker", "health")

CONFIG = NO_LIMITS_CONFIG


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` (MiB), from ``/proc/<pid>/status`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="aipipe-memory-"))
    (work / "aipipe.toml").write_text(CONFIG)
    broker = EmbeddedBroker(log_path=work / "broker.log")
    await broker.start()
    procs: dict[str, anyio.abc.Process] = {}
    samples: list[dict[str, float]] = []
    try:
        async with EmulatorProcess() as emulator:
            await emulator.set_latency(0)
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")},
                "AIPIPE_KAFKA_BOOTSTRAP": broker.address,
                "AIPIPE_TOPIC_PREFIX": "mem.",
                "AIPIPE_HOME": str(work / "home"),
                "AIPIPE_CONFIG": str(work / "aipipe.toml"),
                "AIPIPE_EMULATE": "1",
                "AIPIPE_EMULATOR_URL": emulator.url,
                "LOG_LEVEL": "WARNING",
            }
            for name in STAGES:
                log = (work / f"{name}.log").open("wb")
                procs[name] = await anyio.open_process(
                    [sys.executable, "-m", "pipeline.cli", "run", "--stage", name],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            prompts = bench_prompts()
            settings = Settings.from_env(env)
            async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
                await opened.bus.ensure_topics(settings.topics.all())
                client = PipelineClient(opened.bus, settings.topics)
                await tg.start(client.run)
                answered = 0
                failed = 0
                next_index = 0
                started = time.monotonic()

                def sample() -> None:
                    row = {"answered": float(answered), "elapsed_s": round(time.monotonic() - started, 1)}
                    row |= {name: round(rss_mib(p.pid), 1) for name, p in procs.items()}
                    samples.append(row)
                    cells = "  ".join(f"{name} {row[name]:6.1f}" for name in STAGES)
                    print(f"{answered:>7} answered  {row['elapsed_s']:>6}s  {cells}", flush=True)

                async def worker() -> None:
                    nonlocal answered, failed, next_index
                    while next_index < args.requests:
                        i = next_index
                        next_index += 1
                        text = prompts[i % len(prompts)]
                        prompt = text if i % 10 == 0 else f"{text} (#{i})"
                        request = AIRequest(
                            id=f"mem-{i}", model="gpt-3.5-turbo", prompt=prompt, max_tokens=64, user=f"user-{i % 200}"
                        )
                        response = await client.request(request)
                        if response.status == "ok":
                            answered += 1
                        else:
                            failed += 1
                        if (answered + failed) % args.every == 0:
                            sample()
                        if (answered + failed) % 20_000 == 0:
                            await emulator.set_latency(0)  # empties the emulator's call log

                await anyio.sleep(3)  # let the stages join their groups
                sample()
                async with anyio.create_task_group() as workers:
                    for _ in range(args.clients):
                        workers.start_soon(worker)
                client.stop()
                tg.cancel_scope.cancel()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            with anyio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        await broker.stop()
    warm = next((s for s in samples if s["answered"] >= args.warmup), samples[0])
    last = samples[-1]
    print(f"\nanswered {int(last['answered'])} of {args.requests} ({failed} failed) in {last['elapsed_s']} s")
    print(f"{'stage':<10} {'start':>7} {'@' + str(int(warm['answered'])):>8} {'end':>7} {'growth after warm-up':>21}")
    for name in STAGES:
        grew = last[name] - warm[name]
        print(f"{name:<10} {samples[0][name]:7.1f} {warm[name]:8.1f} {last[name]:7.1f} {grew:+18.1f} MiB")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"memory-{stamp}.json").write_text(json.dumps({"args": vars(args), "samples": samples}, indent=1))
    print(f"written {out / f'memory-{stamp}.json'} (logs in {work})")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--every", type=int, default=10_000, help="answers between RSS samples")
    parser.add_argument("--warmup", type=int, default=20_000, help="answers before growth is counted")
    sys.exit(anyio.run(main, parser.parse_args()))
