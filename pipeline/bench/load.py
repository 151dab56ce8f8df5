"""Load generators (open loop at a fixed rate, closed loop with N clients) and a process monitor.

Both generators call ``call(i)`` (an awaitable that returns on success and
raises on failure) and collect the end-to-end latency of each successful call.
The open loop measures from each request's *scheduled* start, so a target
that falls behind is charged for the queueing it causes (no coordinated
omission); it never has more than ``max_outstanding`` calls open, and counts
the ones it could not start as ``dropped``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from pipeline.bench.stats import ProcessUsage

log = logging.getLogger("aipipe.bench")

#: One benchmark call: ``call(i)`` returns on success and raises on failure.
Call = Callable[[int], Awaitable[None]]


@dataclass
class LoadSamples:
    """Raw samples of one run: latency (ms) of each successful call, failures by kind, calls sent, wall time (s)."""

    latencies_ms: list[float] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    elapsed_s: float = 0.0


def error_kind(exc: BaseException) -> str:
    """A short name for a failed call: aipipe's ``error_type``, an HTTP ``status_code``, else the exception type."""
    kind = getattr(exc, "error_type", None)
    if isinstance(kind, str) and kind:
        return kind
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return f"http_{status}"
    return type(exc).__name__


async def open_loop(
    call: Call,
    *,
    rate_rps: float,
    duration_s: float,
    timeout_s: float,
    max_outstanding: int,
    first_index: int = 0,
) -> LoadSamples:
    """Start ``rate_rps * duration_s`` calls at a fixed rate and wait for all of them.

    Args:
        call: the call under test.
        rate_rps: offered rate (requests/s), > 0.
        duration_s: how long requests are started (s).
        timeout_s: limit of one call (s); a slower call counts as ``timeout``.
        max_outstanding: calls open at once; past it a scheduled call is ``dropped``.
        first_index: index passed to the first call (the next ones follow).

    Returns:
        The samples; ``elapsed_s`` runs from the first scheduled start to the last answer.

    Raises:
        ValueError: when ``rate_rps`` or ``duration_s`` is not positive.
    """
    if rate_rps <= 0 or duration_s <= 0:
        raise ValueError("rate_rps and duration_s must be positive")
    samples = LoadSamples()
    count = max(1, round(rate_rps * duration_s))
    interval_s = 1.0 / rate_rps
    outstanding = 0
    start = time.perf_counter()
    last_done = start

    async def one(index: int, scheduled: float) -> None:
        nonlocal outstanding, last_done
        try:
            with anyio.fail_after(timeout_s):
                await call(index)
        except TimeoutError:
            samples.error_kinds["timeout"] += 1
        except Exception as exc:
            samples.error_kinds[error_kind(exc)] += 1
        else:
            samples.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        finally:
            outstanding -= 1
            last_done = max(last_done, time.perf_counter())

    async with anyio.create_task_group() as tg:
        start = time.perf_counter()
        for k in range(count):
            scheduled = start + k * interval_s
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            samples.sent += 1
            if outstanding >= max_outstanding:
                samples.error_kinds["dropped"] += 1
                continue
            outstanding += 1
            tg.start_soon(one, first_index + k, scheduled)
    samples.elapsed_s = (last_done if last_done > start else time.perf_counter()) - start
    return samples


async def closed_loop(
    call: Call,
    *,
    concurrency: int,
    duration_s: float,
    timeout_s: float,
    first_index: int = 0,
) -> LoadSamples:
    """Run ``concurrency`` clients for ``duration_s``; each sends its next call when the last one is answered.

    Args:
        call: the call under test.
        concurrency: clients (calls open at once), >= 1.
        duration_s: how long clients start new calls (s).
        timeout_s: limit of one call (s).
        first_index: index passed to the first call.

    Returns:
        The samples; ``elapsed_s`` runs until the last client finished.

    Raises:
        ValueError: when ``concurrency`` < 1 or ``duration_s`` is not positive.
    """
    if concurrency < 1 or duration_s <= 0:
        raise ValueError("concurrency must be >= 1 and duration_s positive")
    samples = LoadSamples()
    indexes = itertools.count(first_index)
    start = time.perf_counter()
    stop_at = start + duration_s

    async def client() -> None:
        while time.perf_counter() < stop_at:
            index = next(indexes)
            samples.sent += 1
            began = time.perf_counter()
            try:
                with anyio.fail_after(timeout_s):
                    await call(index)
            except TimeoutError:
                samples.error_kinds["timeout"] += 1
            except Exception as exc:
                samples.error_kinds[error_kind(exc)] += 1
            else:
                samples.latencies_ms.append((time.perf_counter() - began) * 1000)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(client)
    samples.elapsed_s = time.perf_counter() - start
    return samples


class ProcessMonitor:
    """CPU time and peak RSS of named processes over a run (psutil; empty when psutil is missing).

    CPU is the difference of user + system time between ``start`` and
    ``stop`` (s); peak RSS is the highest resident set sampled every
    ``interval_s`` (s) in between, and at both ends (MB).

    Args:
        pids: process name -> pid (e.g. ``{"bench": os.getpid(), "emulator": 1234}``).
        interval_s: RSS sampling period (s).
    """

    def __init__(self, pids: dict[str, int], *, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self._procs: dict[str, Any] = {}
        try:
            import psutil  # type: ignore[import-untyped]
        except ImportError:  # the bench extra installs it; without it, no process figures
            log.warning("psutil is not installed: no CPU or RSS figures")
            return
        for name, pid in pids.items():
            try:
                self._procs[name] = psutil.Process(pid)
            except psutil.Error:
                log.warning("process %s (pid %s) is gone: no figures for it", name, pid)
        self._cpu0: dict[str, float] = {}
        self._peak: dict[str, int] = {}

    def _sample(self) -> None:
        for name, proc in list(self._procs.items()):
            try:
                rss = int(proc.memory_info().rss)
            except Exception:  # the process ended; keep what was seen
                continue
            self._peak[name] = max(self._peak.get(name, 0), rss)

    def _cpu(self, proc: Any) -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    def start(self) -> None:
        """Take the starting CPU times and a first RSS sample."""
        self._cpu0 = {}
        self._peak = {}
        for name, proc in self._procs.items():
            try:
                self._cpu0[name] = self._cpu(proc)
            except Exception:
                continue
        self._sample()

    async def sample_forever(self) -> None:
        """Sample RSS every ``interval_s`` until cancelled."""
        while True:
            await anyio.sleep(self.interval_s)
            self._sample()

    def stop(self) -> dict[str, ProcessUsage]:
        """Per process: CPU seconds since ``start`` and peak RSS (MB)."""
        self._sample()
        out: dict[str, ProcessUsage] = {}
        for name, proc in self._procs.items():
            if name not in self._cpu0:
                continue
            try:
                cpu = self._cpu(proc) - self._cpu0[name]
            except Exception:
                continue
            out[name] = ProcessUsage(cpu_s=round(cpu, 2), peak_rss_mb=round(self._peak.get(name, 0) / 2**20, 1))
        return out
