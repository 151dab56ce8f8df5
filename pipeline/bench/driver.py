"""The benchmark driver: emulator process, targets, load plan, measurement, results on disk.

One run of ``run_bench`` starts the provider emulator as a child process,
then for each target (``limit``, ``aipipe-memory``, ``kafka-floor``,
``aipipe-kafka``, ``litellm`` last) and each emulator latency profile, two blocks, each on a
freshly started target after a warm-up: the open-loop rates in ascending
order (a rate the target does not sustain ends its ladder: the higher ones
are recorded as skipped), then the closed-loop runs. The emulator's call log
is emptied before each run so it does not grow.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import msgspec

from pipeline.bench.floor import KafkaFloorTarget
from pipeline.bench.load import LoadSamples, ProcessMonitor, closed_loop, open_loop
from pipeline.bench.report import plot_latency
from pipeline.bench.stats import (
    TARGETS,
    BenchReport,
    Mode,
    RunResult,
    Skipped,
    evaluate_goals,
    ratios,
    summarize,
)
from pipeline.bench.targets import (
    AiohttpTarget,
    AipipeTarget,
    HttpxTarget,
    LiteLLMTarget,
    Target,
    bench_prompts,
    close_litellm,
    litellm_available,
)

log = logging.getLogger("aipipe.bench")

#: Extra targets of the transport comparison (closed loop, 50 ms profile).
TRANSPORTS: tuple[str, ...] = ("limit", "httpx-aiohttp", "httpx")


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What to run.

    Attributes:
        profiles_ms: emulator latency profiles (ms injected per call).
        open_profiles_ms: profiles that get the open-loop ladder (``None``: all).
        rates_rps: open-loop rates (requests/s), run in ascending order.
        concurrency: closed-loop client counts.
        duration_s: length of each run (s).
        warmup_s: unmeasured closed-loop warm-up before each block (s).
        timeout_s: limit of one call (s).
        max_outstanding: open-loop calls open at once before new ones are dropped.
        targets: target keys, from ``TARGETS``.
        transports: also compare aiohttp, httpx on aiohttp and plain httpx (closed loop).
        out_dir: where the JSON and PNG go (``None``: nowhere).
        plot: draw the PNG (needs matplotlib).
        bootstrap: a broker for ``aipipe-kafka`` and ``kafka-floor`` (``None``: start the embedded one).
        quick: the ``--quick`` preset (recorded in the results).
        settle_s: pause between runs (s), so one run's tail does not load the next.
    """

    profiles_ms: tuple[float, ...] = (50.0, 0.0)
    open_profiles_ms: tuple[float, ...] | None = None
    rates_rps: tuple[float, ...] = (100, 250, 500, 1000, 2000)
    concurrency: tuple[int, ...] = (100, 400)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    timeout_s: float = 10.0
    max_outstanding: int = 2000
    targets: tuple[str, ...] = TARGETS
    transports: bool = True
    out_dir: Path | None = Path("bench/results")
    plot: bool = True
    bootstrap: str | None = None
    quick: bool = False
    settle_s: float = 0.3

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            ValueError: for an unknown target, an empty plan, or a non-positive number.
        """
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
        if not self.targets or not self.profiles_ms:
            raise ValueError("nothing to run: give at least one target and one profile")
        if any(r <= 0 for r in self.rates_rps) or any(n < 1 for n in self.concurrency):
            raise ValueError("rates must be positive and concurrency at least 1")
        if any(p < 0 for p in self.profiles_ms):
            raise ValueError("latency profiles must not be negative")
        if self.duration_s <= 0 or self.timeout_s <= 0 or self.max_outstanding < 1 or self.warmup_s < 0:
            raise ValueError("duration, timeout and max_outstanding must be positive, warm-up not negative")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> BenchOptions:
        """The ``aipipe bench --quick`` plan (under 2 minutes in all).

        50 ms profile at 100, 500 and 1,000 requests/s and with 100 clients; the 0 ms profile with
        100 clients; 2 s per run, 1 s warm-ups; ``overrides`` replace any of these.
        """
        values: dict[str, Any] = {
            "profiles_ms": (50.0, 0.0),
            "open_profiles_ms": (50.0,),
            "rates_rps": (100, 500, 1000),
            "concurrency": (100,),
            "duration_s": 2.0,
            "warmup_s": 1.0,
            "timeout_s": 5.0,
            "transports": False,
            "quick": True,
        }
        values.update(overrides)
        return cls(**values)

    def open_rates(self, profile_ms: float) -> tuple[float, ...]:
        """The open-loop rates to run at ``profile_ms``, ascending."""
        if self.open_profiles_ms is not None and profile_ms not in self.open_profiles_ms:
            return ()
        return tuple(sorted(self.rates_rps))

    def planned_runs(self, targets: tuple[str, ...]) -> int:
        """How many runs the plan has (for the progress bar)."""
        per_target = sum(len(self.open_rates(p)) + len(self.concurrency) for p in self.profiles_ms)
        extra = len(TRANSPORTS) if self.transports else 0
        return per_target * len(targets) + extra


# --- the emulator process -----------------------------------------------------------------------


class EmulatorProcess:
    """The provider emulator as a child process (``python -m pipeline.cli.main emulator --port 0``).

    It runs apart from the bench process so its CPU is not charged to the
    targets; ``set_latency`` switches its fixed-latency profile (and empties
    its call log) through the ``/_emulator`` admin endpoints.

    Args:
        log_file: where its output goes (``None``: discarded).
        start_timeout_s: how long to wait for its "listening" line (s).
    """

    def __init__(self, *, log_file: IO[bytes] | None = None, start_timeout_s: float = 30.0) -> None:
        self.log_file = log_file
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._proc: anyio.abc.Process | None = None
        self._admin: httpx.AsyncClient | None = None

    @property
    def pid(self) -> int:
        """The emulator's process id.

        Raises:
            RuntimeError: before start.
        """
        if self._proc is None:
            raise RuntimeError("the emulator is not started")
        return self._proc.pid

    async def __aenter__(self) -> EmulatorProcess:
        """Start the emulator and wait for its URL.

        Raises:
            RuntimeError: when it exits or prints no URL within ``start_timeout_s``.
        """
        env = {**os.environ, "LOG_LEVEL": "WARNING"}
        command = [sys.executable, "-m", "pipeline.cli", "emulator", "--host", "127.0.0.1", "--port", "0"]
        stderr: Any = self.log_file if self.log_file is not None else subprocess.DEVNULL
        self._proc = await anyio.open_process(command, stdout=subprocess.PIPE, stderr=stderr, env=env)
        assert self._proc.stdout is not None
        seen = b""
        with anyio.move_on_after(self.start_timeout_s):
            async for chunk in self._proc.stdout:
                seen += chunk
                if b"\n" in seen:
                    break
        found = re.search(rb"listening on (http://\S+)", seen)
        if found is None:
            await self._stop()
            raise RuntimeError(f"the emulator did not start: {seen.decode(errors='replace')[:300]!r}")
        self.url = found.group(1).decode()
        self._admin = httpx.AsyncClient(base_url=self.url, timeout=10.0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._admin is not None:
            await self._admin.aclose()
            self._admin = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await proc.aclose()

    async def set_latency(self, ms: float) -> None:
        """Reset the emulator (empty call log) and make every provider answer after ``ms`` milliseconds.

        Raises:
            httpx.HTTPError: when the admin endpoint refuses.
        """
        assert self._admin is not None
        (await self._admin.post("/_emulator/reset")).raise_for_status()
        latency = {"latency": {"dist": "fixed", "ms": ms}}
        profile = {"providers": dict.fromkeys(("openai", "anthropic", "cloudflare"), latency)}
        (await self._admin.post("/_emulator/faults", json=profile)).raise_for_status()

    async def set_profile(self, profile: dict[str, Any]) -> None:
        """Replace the emulator's whole fault profile (``pipeline.emulator.spec``), e.g. stream pacing.

        Raises:
            httpx.HTTPError: when the admin endpoint refuses (an invalid profile is a 400).
        """
        assert self._admin is not None
        (await self._admin.post("/_emulator/faults", json=profile)).raise_for_status()


# --- measuring ----------------------------------------------------------------------------------


def _make_target(key: str, url: str, prompts: list[str], options: BenchOptions) -> Target:
    if key == "limit":
        return AiohttpTarget(url, prompts)
    if key in ("httpx-aiohttp", "httpx"):
        return HttpxTarget(url, prompts, transport=key)
    if key == "litellm":
        return LiteLLMTarget(url, prompts, timeout_s=options.timeout_s)
    if key == "aipipe-memory":
        return AipipeTarget(url, prompts, bus="memory", timeout_s=options.timeout_s)
    if key == "kafka-floor":
        return KafkaFloorTarget(url, prompts, timeout_s=options.timeout_s, bootstrap=options.bootstrap)
    if key == "aipipe-kafka":
        return AipipeTarget(url, prompts, bus="kafka", timeout_s=options.timeout_s, bootstrap=options.bootstrap)
    raise ValueError(f"unknown target {key!r}")


@dataclass
class _Session:
    options: BenchOptions
    emulator: EmulatorProcess
    on_run: Callable[[str], None]
    on_done: Callable[[RunResult | Skipped], None]
    runs: list[RunResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    transports: list[RunResult] = field(default_factory=list)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_index: int = 0

    async def measure(
        self, target: Target, profile_ms: float, mode: Mode, value: float, *, duration_s: float | None = None
    ) -> RunResult:
        options = self.options
        duration = duration_s or options.duration_s
        await self.emulator.set_latency(profile_ms)  # also empties its call log, so it stays small
        monitor = ProcessMonitor({"bench": os.getpid(), "emulator": self.emulator.pid, **target.pids()})
        first = self.next_index
        monitor.start()
        samples: LoadSamples
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.sample_forever)
            if mode == "open":
                samples = await open_loop(
                    target.call,
                    rate_rps=value,
                    duration_s=duration,
                    timeout_s=options.timeout_s,
                    max_outstanding=options.max_outstanding,
                    first_index=first,
                )
            else:
                samples = await closed_loop(
                    target.call,
                    concurrency=int(value),
                    duration_s=duration,
                    timeout_s=options.timeout_s,
                    first_index=first,
                )
            tg.cancel_scope.cancel()
        usage = monitor.stop()
        self.next_index = first + samples.sent
        # aipipe keeps working on requests a client gave up on (at-least-once): let that backlog
        # drain, so it does not load the next run.
        wait_idle = getattr(target, "wait_idle", None)
        if wait_idle is not None and not await wait_idle(options.timeout_s + 10):
            log.warning("%s still had a backlog %.0f s after a run", target.key, options.timeout_s + 10)
        await anyio.sleep(options.settle_s)
        return summarize(
            target=target.key,
            profile_ms=profile_ms,
            mode=mode,
            latencies_ms=samples.latencies_ms,
            error_kinds=dict(samples.error_kinds),
            sent=samples.sent,
            elapsed_s=samples.elapsed_s,
            rate_rps=value if mode == "open" else None,
            concurrency=int(value) if mode == "closed" else None,
            processes=usage,
        )

    async def warm_up(self, target: Target) -> None:
        if self.options.warmup_s <= 0:
            return
        samples = await closed_loop(
            target.call,
            concurrency=min(50, max(self.options.concurrency)),
            duration_s=self.options.warmup_s,
            timeout_s=self.options.timeout_s,
            first_index=self.next_index,
        )
        self.next_index += samples.sent
        if samples.error_kinds:
            log.warning("warm-up of %s had errors: %s", target.key, dict(samples.error_kinds))

    async def run_target(self, key: str, prompts: list[str]) -> None:
        options = self.options
        for profile in options.profiles_ms:
            for mode in ("open", "closed"):
                if mode == "open" and not options.open_rates(profile):
                    continue
                # A fresh target per profile and per block (the open ladder, the closed loops): one
                # block's load, and the state it leaves (the embedded broker's log only grows), does
                # not weigh on the next.
                self.on_run(f"{key} · {profile:g} ms · starting")
                async with _make_target(key, self.emulator.url, prompts, options) as target, _frozen_heap():
                    self.info.setdefault(key, target.info())
                    await self.emulator.set_latency(profile)
                    self.on_run(f"{key} · {profile:g} ms · warm-up")
                    await self.warm_up(target)
                    if mode == "open":
                        await self._open_ladder(key, target, profile)
                    else:
                        for clients in options.concurrency:
                            self.on_run(f"{key} · {profile:g} ms · closed {clients}")
                            result = await self.measure(target, profile, "closed", clients)
                            self.runs.append(result)
                            self.on_done(result)

    async def _open_ladder(self, key: str, target: Target, profile: float) -> None:
        given_up: float | None = None
        for rate in self.options.open_rates(profile):
            if given_up is not None:
                skip = Skipped(
                    target=key,
                    profile_ms=profile,
                    mode="open",
                    rate_rps=rate,
                    reason=f"not sustained at {given_up:g}/s",
                )
                self.skipped.append(skip)
                self.on_done(skip)
                continue
            self.on_run(f"{key} · {profile:g} ms · open {rate:g}/s")
            result = await self.measure(target, profile, "open", rate)
            self.runs.append(result)
            self.on_done(result)
            if not result.sustained:
                given_up = rate

    async def run_transports(self, prompts: list[str]) -> None:
        profile = 50.0
        clients = max(self.options.concurrency)
        await self.emulator.set_latency(profile)
        for key in TRANSPORTS:
            self.on_run(f"transports: {key} · {profile:g} ms · closed {clients}")
            async with _make_target(key, self.emulator.url, prompts, self.options) as target, _frozen_heap():
                await self.warm_up(target)
                result = await self.measure(target, profile, "closed", clients)
            self.transports.append(result)
            self.on_done(result)


@asynccontextmanager
async def _frozen_heap() -> AsyncIterator[None]:
    """Keep the objects alive now (imports, the started target) out of the garbage collector's passes.

    A long-running server does the same (``gc.freeze``); without it a full
    collection walks every import-time object (LiteLLM brings ~400,000) and
    pauses whichever target runs for 100+ ms. Every target gets it alike.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


def hardware() -> dict[str, Any]:
    """CPU count (``os.cpu_count``), CPU model (``/proc/cpuinfo``, else ``lscpu``), Python and OS."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not model and shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def _loadavg() -> float | None:
    """The 1-minute load average (other work on the machine skews every number), if the OS tells."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("aipipe", "aiohttp", "httpx", "httpx-aiohttp", "aiokafka", "msgspec", "anyio", "litellm", "uvicorn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


async def run_bench(
    options: BenchOptions,
    *,
    on_run: Callable[[str], None] = lambda _text: None,
    on_done: Callable[[RunResult | Skipped], None] = lambda _result: None,
    command: str = "aipipe bench",
) -> BenchReport:
    """Run the benchmark plan of ``options`` and return the report (the caller writes and prints it).

    Args:
        options: the plan.
        on_run: called with a short description when a step starts (progress display).
        on_done: called with each finished or skipped run.
        command: the command line to record in the results.

    Returns:
        Every run, the skipped ones, the ratios, the goals and the facts of the set-up.

    Raises:
        RuntimeError: when the emulator cannot start.
    """
    started = time.monotonic()
    load_before = _loadavg()
    notes: list[str] = []
    targets = options.targets
    if "litellm" in targets and not litellm_available():
        targets = tuple(t for t in targets if t != "litellm")
        notes.append("litellm is not installed (pip install 'aipipe[bench]'): the LiteLLM column is left out")
    prompts = bench_prompts()
    log_path = options.out_dir / "emulator.log" if options.out_dir is not None else None
    log_file: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = log_path.open("ab")
    try:
        async with EmulatorProcess(log_file=log_file) as emulator:
            session = _Session(options, emulator, on_run, on_done)
            # LiteLLM last: its import is the heaviest (see ``_frozen_heap``); the table keeps its column order.
            for key in sorted(targets, key=lambda t: t == "litellm"):
                await session.run_target(key, prompts)
            if options.transports:
                await session.run_transports(prompts)
            await close_litellm()
    finally:
        if log_file is not None:
            log_file.close()
    runs = session.runs
    meta: dict[str, Any] = {
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        "quick": options.quick,
        "hardware": hardware(),
        "loadavg_1m": {"before": load_before, "after": _loadavg()},
        "versions": _versions(),
        "prompts": f"{len(prompts)} MT-Bench and Vicuna first turns (pipeline/data)",
        "emulator": "separate process (aipipe emulator, uvicorn), fixed latency per profile",
        "load_generator": "in the bench process, shared by every target",
        "targets": session.info,
        "options": {
            "profiles_ms": list(options.profiles_ms),
            "open_profiles_ms": list(options.open_profiles_ms) if options.open_profiles_ms is not None else None,
            "rates_rps": list(options.rates_rps),
            "concurrency": list(options.concurrency),
            "duration_s": options.duration_s,
            "warmup_s": options.warmup_s,
            "timeout_s": options.timeout_s,
            "max_outstanding": options.max_outstanding,
        },
    }
    return BenchReport(
        meta=meta,
        runs=runs,
        skipped=session.skipped,
        ratios=ratios(runs),
        goals=evaluate_goals(runs, session.skipped),
        transports=session.transports,
        notes=notes,
    )


def write_results(report: BenchReport, out_dir: Path, *, plot: bool = True) -> dict[str, Path]:
    """Write the results to ``out_dir``: ``bench-<UTC time>.json``, and ``.png`` when ``plot`` and matplotlib is there.

    Both are copied to ``latest.json`` / ``latest.png`` too.

    Returns:
        ``{"json": path, "png": path}`` (``png`` only when drawn).

    Raises:
        OSError: when the files cannot be written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    written: dict[str, Path] = {}
    data = json.dumps(msgspec.to_builtins(report), indent=2) + "\n"
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(data, encoding="utf-8")
    (out_dir / "latest.json").write_text(data, encoding="utf-8")
    written["json"] = path
    if plot:
        png = out_dir / f"bench-{stamp}.png"
        if plot_latency(report, png):
            shutil.copyfile(png, out_dir / "latest.png")
            written["png"] = png
        else:
            report.notes.append("matplotlib is not installed (pip install 'aipipe[bench]'): no plot")
    return written
