"""What the scripts in ``bench/`` share: the no-limits configuration, ``aipipe run`` as a child, CPU readings.

``bench/soak.py``, ``bench/memory_growth.py``, ``bench/idle_cpu.py`` and
``bench/stage_cpu.py`` run aipipe as real processes (``aipipe run``), the way
a user deploys it, and read what they cost from the operating system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

__all__ = ["NO_LIMITS_CONFIG", "bench_env", "cpu_seconds", "start_run", "stop_all"]

#: ``aipipe.toml`` for load runs: OpenAI first, Cloudflare second, Anthropic off, no rate limit, a budget
#: so high it never blocks (the gate still reserves and settles every request).
NO_LIMITS_CONFIG = """
[budget]
global_daily_usd = 1000000.0

[providers.openai]
priority = 1
rate_limit = { requests_per_minute = 100000000, tokens_per_minute = 100000000000 }

[providers.cloudflare]
priority = 2
rate_limit = { requests_per_minute = 100000000, tokens_per_minute = 100000000000 }

[providers.anthropic]
enabled = false
"""


def bench_env(work: Path, emulator_url: str, **extra: str) -> dict[str, str]:
    """The environment of an ``aipipe run`` child under ``work``: its own home and config, the emulator.

    Every ``AIPIPE_*`` variable of this process is dropped first, so a developer's settings do not leak
    in; ``extra`` adds or replaces variables. Writes ``work/aipipe.toml`` (``NO_LIMITS_CONFIG``) if absent.
    """
    config = work / "aipipe.toml"
    if not config.exists():
        config.write_text(NO_LIMITS_CONFIG)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")},
        "AIPIPE_HOME": str(work / "home"),
        "AIPIPE_CONFIG": str(config),
        "AIPIPE_EMULATE": "1",
        "AIPIPE_EMULATOR_URL": emulator_url,
        "LOG_LEVEL": "WARNING",
        **extra,
    }


async def start_run(
    env: Mapping[str, str],
    log_path: Path,
    *,
    stages: Sequence[str] = (),
    wait_for: str | None = "aipipe running on",
    timeout_s: float = 60.0,
) -> anyio.abc.Process:
    """Start ``aipipe run [--stage NAME ...]`` with ``env``, its output in ``log_path``; wait for ``wait_for``.

    Args:
        env: the child's environment (``bench_env``).
        log_path: file for its stdout and stderr.
        stages: stages to run (none: every default stage).
        wait_for: a line of its log that says it is up (``None``: do not wait).
        timeout_s: how long to wait for that line (s).

    Raises:
        RuntimeError: with the log's end, when it exits or does not print ``wait_for`` in time.
    """
    command = [sys.executable, "-m", "pipeline.cli", "run"]
    for stage in stages:
        command += ["--stage", stage]
    with log_path.open("wb") as out:
        proc = await anyio.open_process(command, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    if wait_for is None:
        return proc
    deadline = time.monotonic() + timeout_s
    log = anyio.Path(log_path)
    while wait_for not in (text := await log.read_text(errors="replace")):
        if time.monotonic() > deadline or proc.returncode is not None:
            proc.kill()
            raise RuntimeError(f"aipipe run did not start:\n{text[-3000:]}")
        await anyio.sleep(0.2)
    return proc


async def stop_all(procs: Iterable[anyio.abc.Process], *, timeout_s: float = 30.0) -> None:
    """SIGTERM every process, wait up to ``timeout_s`` (s) for each, then kill what is left."""
    procs = list(procs)
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        with anyio.move_on_after(timeout_s):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (s, user + system) the processes ``pids`` have used so far (psutil); gone ones count 0.

    Raises:
        ImportError: when psutil is not installed (``pip install 'aipipe[bench]'``).
    """
    import psutil  # type: ignore[import-untyped]

    total = 0.0
    for pid in pids:
        try:
            times: Any = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total
