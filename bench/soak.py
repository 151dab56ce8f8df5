"""Soak: 200,000 requests through the default `aipipe run` (embedded broker, rotation on), throughput per window.

    .venv/bin/python bench/soak.py [--requests 200000] [--clients 100] [--window 10000] [--no-archive]

Starts the provider emulator (no added latency) as its own process and the
default ``aipipe run --emulate`` (one process: every stage and the archive,
its own embedded broker, ``broker.rotate_records`` at its default 20,000),
under a temporary ``AIPIPE_HOME``. Then ``--clients`` concurrent clients
(``PipelineClient`` on Kafka, found through the runtime file, as ``aipipe
send`` finds it) send ``--requests`` requests made of the 160 real MT-Bench
and Vicuna questions (each made distinct by a number, so no cache hits),
and the script prints the throughput of every ``--window`` answers, the
broker's rotations (from the log) and the archive's size. "Flat" is read
from the table: the last windows against the first ones. A client that
waits longer than its request's deadline plus 5 s counts as failed (the
request was lost). Each window also gives the latency of its requests
(p50, p99, max, ms, from the client's send to its answer), so a rotation's
pause shows as a window's max. ``--no-archive`` runs without the archive
stage, for its overhead. Writes ``bench/results/soak-<UTC time>.json``.
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

from pipeline.assembly.process import open_bus
from pipeline.bench.driver import EmulatorProcess
from pipeline.bench.processes import NO_LIMITS_CONFIG
from pipeline.bench.targets import bench_prompts
from pipeline.client.pipeline_client import PipelineClient
from pipeline.errors import AIProviderError
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest

CONFIG = NO_LIMITS_CONFIG


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="aipipe-soak-"))
    (work / "aipipe.toml").write_text(CONFIG + ("\n[archive]\nenabled = false\n" if args.no_archive else ""))
    windows: list[dict[str, float]] = []
    answered = failed = 0
    async with EmulatorProcess() as emulator:
        await emulator.set_latency(0)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")},
            "AIPIPE_HOME": str(work / "home"),
            "AIPIPE_CONFIG": str(work / "aipipe.toml"),
            "AIPIPE_EMULATE": "1",
            "AIPIPE_EMULATOR_URL": emulator.url,
            "LOG_LEVEL": "INFO",
        }
        log_path = work / "run.log"
        with log_path.open("wb") as log:
            run = await anyio.open_process(
                [sys.executable, "-m", "pipeline.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 60
            while "aipipe running on" not in log_path.read_text(errors="replace"):
                if time.monotonic() > deadline or run.returncode is not None:
                    raise SystemExit(f"aipipe run did not start:\n{log_path.read_text()[-3000:]}")
                await anyio.sleep(0.2)
            prompts = bench_prompts()
            settings = Settings.from_env(env)
            async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
                client = PipelineClient(opened.bus, settings.topics)
                await tg.start(client.run)
                next_index = 0
                started = window_start = time.monotonic()
                window_done = 0
                latencies: list[float] = []

                def close_window() -> None:
                    nonlocal window_start, window_done
                    now = time.monotonic()
                    rate = window_done / (now - window_start)
                    rotations = log_path.read_text(errors="replace").count("rotated the embedded broker in ")
                    latencies.sort()
                    p50 = latencies[len(latencies) // 2] if latencies else 0.0
                    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
                    worst = latencies[-1] if latencies else 0.0
                    row = {
                        "answered": answered,
                        "failed": failed,
                        "elapsed_s": round(now - started, 1),
                        "rate": round(rate, 1),
                        "rotations": rotations,
                        "p50_ms": round(p50, 1),
                        "p99_ms": round(p99, 1),
                        "max_ms": round(worst, 1),
                    }
                    windows.append(row)
                    print(
                        f"{answered:>7} answered {failed:>5} failed  {row['elapsed_s']:>7} s  "
                        f"{rate:7.1f} req/s  p50 {p50:6.1f} ms  p99 {p99:7.1f} ms  max {worst:7.1f} ms  "
                        f"rotations {rotations}",
                        flush=True,
                    )
                    window_start, window_done = now, 0
                    latencies.clear()

                async def worker() -> None:
                    nonlocal answered, failed, next_index, window_done
                    while next_index < args.requests:
                        i = next_index
                        next_index += 1
                        request = AIRequest(
                            id=f"soak-{i}",
                            model="gpt-3.5-turbo",
                            prompt=f"{prompts[i % len(prompts)]} (#{i})",
                            max_tokens=64,
                            user=f"user-{i % 200}",
                            timeout_ms=60_000,
                        )
                        asked = time.perf_counter()
                        try:
                            response = await client.request(request, timeout_s=65)
                            ok = response.status == "ok"
                        except (TimeoutError, AIProviderError):
                            ok = False
                        latencies.append((time.perf_counter() - asked) * 1000)
                        answered += ok
                        failed += not ok
                        window_done += 1
                        if (answered + failed) % args.window == 0:
                            close_window()

                async with anyio.create_task_group() as workers:
                    for _ in range(args.clients):
                        workers.start_soon(worker)
                client.stop()
                tg.cancel_scope.cancel()
        finally:
            run.terminate()
            with anyio.move_on_after(60):
                await run.wait()
            if run.returncode is None:
                run.kill()
    archive = work / "home" / "archive"
    size = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file()) if archive.exists() else 0
    rates = [w["rate"] for w in windows]
    print(f"\nanswered {answered} of {args.requests} ({failed} failed); archive {size / 2**20:.1f} MiB")
    if len(rates) >= 4:
        print(
            f"first two windows {rates[0]:.0f}, {rates[1]:.0f} req/s; last two {rates[-2]:.0f}, {rates[-1]:.0f} req/s"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"soak-{stamp}.json").write_text(json.dumps({"args": vars(args), "windows": windows}, indent=1))
    print(f"written {out / f'soak-{stamp}.json'} (logs in {work})")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--window", type=int, default=10_000, help="answers per throughput window")
    parser.add_argument("--no-archive", action="store_true", help="run without the archive stage (for its overhead)")
    sys.exit(anyio.run(main, parser.parse_args()))
