"""Pure result arithmetic of the benchmark: percentiles, run summaries, ratios and goal checks.

No I/O here; ``pipeline.bench.driver`` measures, this module turns the samples
into the numbers the table, the JSON file and the plot show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from msgspec import Struct

#: Target keys, in the order of the table's columns.
TARGETS: tuple[str, ...] = ("limit", "litellm", "aipipe-memory", "kafka-floor", "aipipe-kafka")
#: Column titles of the four-way table.
TARGET_TITLES: dict[str, str] = {
    "limit": "limit (aiohttp)",
    "litellm": "LiteLLM Router",
    "aipipe-memory": "aipipe in-process",
    "kafka-floor": "Kafka floor",
    "aipipe-kafka": "aipipe Kafka",
}
#: Baselines each aipipe target is compared with (``ratios``): the Kafka path also with its floor.
BASELINES: dict[str, tuple[str, ...]] = {
    "aipipe-memory": ("limit", "litellm"),
    "aipipe-kafka": ("kafka-floor", "limit", "litellm"),
}
#: An open-loop run counts as sustained when every call was answered in time (no error, none dropped)
#: and its median overhead stays under this (ms): past it, requests queue faster than they leave.
SUSTAINED_P50_OVERHEAD_MS = 200.0

Mode = Literal["open", "closed"]


class Percentiles(Struct, kw_only=True):
    """Latency percentiles (ms): nearest rank over the successful calls; ``None`` without samples."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class ProcessUsage(Struct, kw_only=True):
    """What one process used during a run: CPU time (s, user + system) and peak resident memory (MB)."""

    cpu_s: float
    peak_rss_mb: float


class RunResult(Struct, kw_only=True):
    """One measured run: one target, one emulator latency profile, one load.

    ``profile_ms``: latency the emulator injects per call (ms). ``mode``:
    ``open`` (fixed ``rate_rps``, requests/s) or ``closed`` (``concurrency``
    clients, each sending its next request when the last one is answered).
    ``duration_s``: wall time from the first request to the last answer (s).
    ``throughput_rps``: successful calls per second over ``duration_s``.
    ``latency_ms``: end to end, from the request's scheduled start (open loop)
    or its send (closed loop) to its answer. ``overhead_ms``: latency minus
    ``profile_ms``. ``errors``: failed, timed-out and dropped calls
    (``error_kinds`` counts them by kind; ``dropped`` means the load
    generator's backlog was full, i.e. the target was overloaded).
    ``sustained``: open loop only: no error (none dropped, none timed out) and
    a median overhead under 200 ms (a queue that grows through the run shows there).
    ``processes``: CPU and peak RSS per process (``bench``, ``emulator``, ``broker``).
    """

    target: str
    profile_ms: float
    mode: Mode
    rate_rps: float | None = None
    concurrency: int | None = None
    duration_s: float
    sent: int
    ok: int
    errors: int
    error_kinds: dict[str, int] = {}
    throughput_rps: float
    latency_ms: Percentiles
    overhead_ms: Percentiles
    sustained: bool | None = None
    processes: dict[str, ProcessUsage] = {}

    @property
    def load_label(self) -> str:
        """``open 500/s`` or ``closed 100``."""
        if self.mode == "open":
            return f"open {self.rate_rps:g}/s"
        return f"closed {self.concurrency}"


class Skipped(Struct, kw_only=True):
    """A planned run left out, and why (e.g. a lower rate was not sustained)."""

    target: str
    profile_ms: float
    mode: Mode
    rate_rps: float | None = None
    concurrency: int | None = None
    reason: str


class Ratio(Struct, kw_only=True):
    """aipipe against a baseline for one load: throughput ratio and overhead ratios (``None``: not measurable).

    ``throughput``: aipipe's throughput / the baseline's. ``p50_overhead`` and
    ``p99_overhead``: aipipe's overhead / the baseline's (both in ms; ``None``
    when the baseline's overhead is below 0.05 ms, where a ratio means nothing).
    """

    aipipe: str
    baseline: str
    profile_ms: float
    mode: Mode
    rate_rps: float | None = None
    concurrency: int | None = None
    throughput: float | None = None
    p50_overhead: float | None = None
    p99_overhead: float | None = None


class Goal(Struct, kw_only=True):
    """One goal of the issue, its target value, what was reached and whether it holds (``None``: not measured)."""

    name: str
    target: str
    reached: str
    met: bool | None


class BenchReport(Struct, kw_only=True):
    """Everything one benchmark run produced (written as JSON).

    ``meta``: command, time, hardware, versions, options and each target's
    settings (the Kafka target's ``fetch_max_wait_ms``). ``runs``: the four-way
    runs. ``skipped``: planned runs left out. ``ratios`` and ``goals``: derived
    from ``runs``. ``transports``: the HTTP client comparison. ``notes``: what
    was left out and why.
    """

    meta: dict[str, Any]
    runs: list[RunResult]
    skipped: list[Skipped] = []
    ratios: list[Ratio] = []
    goals: list[Goal] = []
    transports: list[RunResult] = []
    notes: list[str] = []


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0 < q <= 1) of ascending ``sorted_values``; ``None`` when empty.

    Raises:
        ValueError: when ``q`` is outside (0, 1].
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def percentiles(values: Iterable[float], *, minus: float = 0.0) -> Percentiles:
    """p50, p95, p99 and max of ``values`` (ms), each minus ``minus`` (ms), rounded to 0.01 ms."""
    ordered = sorted(values)

    def pick(q: float) -> float | None:
        found = percentile(ordered, q)
        return None if found is None else round(found - minus, 2)

    return Percentiles(p50=pick(0.50), p95=pick(0.95), p99=pick(0.99), max=pick(1.0))


def summarize(
    *,
    target: str,
    profile_ms: float,
    mode: Mode,
    latencies_ms: Sequence[float],
    error_kinds: dict[str, int],
    sent: int,
    elapsed_s: float,
    rate_rps: float | None = None,
    concurrency: int | None = None,
    processes: dict[str, ProcessUsage] | None = None,
) -> RunResult:
    """Build the ``RunResult`` of one run from its raw samples.

    Args:
        target: target key (``limit``, ``litellm``, ``aipipe-memory``, ``aipipe-kafka``, ...).
        profile_ms: injected emulator latency (ms).
        mode: ``open`` or ``closed``.
        latencies_ms: end-to-end latency of every successful call (ms).
        error_kinds: failed calls by kind.
        sent: calls attempted (dropped ones included).
        elapsed_s: wall time from the first request to the last answer (s).
        rate_rps: offered rate (open loop), requests/s.
        concurrency: clients (closed loop).
        processes: CPU and peak RSS per process.

    Returns:
        The run's summary; ``sustained`` is set for open-loop runs.
    """
    ok = len(latencies_ms)
    errors = sum(error_kinds.values())
    throughput = ok / elapsed_s if elapsed_s > 0 else 0.0
    sustained = None
    overhead = percentiles(latencies_ms, minus=profile_ms)
    if mode == "open" and rate_rps:
        sustained = errors == 0 and overhead.p50 is not None and overhead.p50 < SUSTAINED_P50_OVERHEAD_MS
    return RunResult(
        target=target,
        profile_ms=profile_ms,
        mode=mode,
        rate_rps=rate_rps,
        concurrency=concurrency,
        duration_s=round(elapsed_s, 3),
        sent=sent,
        ok=ok,
        errors=errors,
        error_kinds=dict(sorted(error_kinds.items())),
        throughput_rps=round(throughput, 1),
        latency_ms=percentiles(latencies_ms),
        overhead_ms=overhead,
        sustained=sustained,
        processes=processes or {},
    )


def _same_load(a: RunResult, b: RunResult) -> bool:
    return (a.profile_ms, a.mode, a.rate_rps, a.concurrency) == (b.profile_ms, b.mode, b.rate_rps, b.concurrency)


def _ratio(num: float | None, den: float | None, *, floor: float = 0.05) -> float | None:
    if num is None or den is None or den < floor:
        return None
    return round(num / den, 2)


def ratios(runs: Sequence[RunResult]) -> list[Ratio]:
    """For each aipipe run, its ratios to its ``BASELINES`` (the limit, LiteLLM, the Kafka floor) at the same load."""
    out: list[Ratio] = []
    for mine in runs:
        for baseline in BASELINES.get(mine.target, ()):
            other = next((r for r in runs if r.target == baseline and _same_load(mine, r)), None)
            if other is None:
                continue
            out.append(
                Ratio(
                    aipipe=mine.target,
                    baseline=baseline,
                    profile_ms=mine.profile_ms,
                    mode=mine.mode,
                    rate_rps=mine.rate_rps,
                    concurrency=mine.concurrency,
                    throughput=_ratio(mine.throughput_rps, other.throughput_rps, floor=1e-9),
                    p50_overhead=_ratio(mine.overhead_ms.p50, other.overhead_ms.p50),
                    p99_overhead=_ratio(mine.overhead_ms.p99, other.overhead_ms.p99),
                )
            )
    return out


def max_throughput(runs: Sequence[RunResult], target: str, profile_ms: float) -> RunResult | None:
    """The closed-loop run of ``target`` at ``profile_ms`` with the highest throughput, if any."""
    closed = [r for r in runs if r.target == target and r.profile_ms == profile_ms and r.mode == "closed"]
    return max(closed, key=lambda r: r.throughput_rps, default=None)


def _open_run(runs: Sequence[RunResult], target: str, profile_ms: float, rate: float) -> RunResult | None:
    return next(
        (
            r
            for r in runs
            if r.target == target and r.profile_ms == profile_ms and r.mode == "open" and r.rate_rps == rate
        ),
        None,
    )


def _fmt(value: float | None, unit: str) -> str:
    return "not measured" if value is None else f"{value:,.1f} {unit}"


def evaluate_goals(runs: Sequence[RunResult], skipped: Sequence[Skipped] = (), profile_ms: float = 50.0) -> list[Goal]:
    """The issue's goals at the ``profile_ms`` profile (default 50 ms), checked against ``runs``.

    In-process: maximum throughput >= 3x LiteLLM's and >= 70 % of the limit's;
    p99 overhead at 500 requests/s <= a third of LiteLLM's. Kafka: 1,000
    requests/s sustained with no errors and p99 overhead < 50 ms; p50 overhead
    at 100 requests/s < 25 ms. A goal whose runs are missing is ``met=None``,
    except when LiteLLM could not sustain the rate at all (then aipipe's
    overhead is compared with an unbounded one, and the goal holds if aipipe
    sustained it).
    """
    goals: list[Goal] = []
    mem = max_throughput(runs, "aipipe-memory", profile_ms)
    lit = max_throughput(runs, "litellm", profile_ms)
    lim = max_throughput(runs, "limit", profile_ms)
    mem_rps = mem.throughput_rps if mem else None
    if lit is not None and mem_rps is not None and lit.throughput_rps > 0:
        ratio = mem_rps / lit.throughput_rps
        goals.append(
            Goal(
                name="in-process max throughput vs LiteLLM",
                target=">= 3.0x",
                reached=f"{ratio:.2f}x ({mem_rps:,.0f} vs {lit.throughput_rps:,.0f} requests/s)",
                met=ratio >= 3.0,
            )
        )
    elif lit is not None and mem_rps is not None:
        goals.append(
            Goal(
                name="in-process max throughput vs LiteLLM",
                target=">= 3.0x",
                reached=f"LiteLLM answered nothing ({mem_rps:,.0f} requests/s in-process)",
                met=None,
            )
        )
    else:
        goals.append(
            Goal(name="in-process max throughput vs LiteLLM", target=">= 3.0x", reached="not measured", met=None)
        )
    if lim is not None and mem_rps is not None:
        share = mem_rps / lim.throughput_rps if lim.throughput_rps else 0.0
        goals.append(
            Goal(
                name="in-process max throughput vs limit",
                target=">= 70 %",
                reached=f"{share:.0%} ({mem_rps:,.0f} vs {lim.throughput_rps:,.0f} requests/s)",
                met=share >= 0.7,
            )
        )
    else:
        goals.append(
            Goal(name="in-process max throughput vs limit", target=">= 70 %", reached="not measured", met=None)
        )

    mine = _open_run(runs, "aipipe-memory", profile_ms, 500)
    theirs = _open_run(runs, "litellm", profile_ms, 500)
    litellm_gave_up = any(s.target == "litellm" and s.profile_ms == profile_ms and s.rate_rps == 500 for s in skipped)
    name = "in-process p99 overhead at 500/s vs LiteLLM"
    if mine is not None and mine.overhead_ms.p99 is not None and theirs is not None and theirs.overhead_ms.p99:
        share = mine.overhead_ms.p99 / theirs.overhead_ms.p99
        reached = f"{share:.2f}x ({mine.overhead_ms.p99:.1f} vs {theirs.overhead_ms.p99:.1f} ms)"
        if not theirs.sustained:
            reached += "; LiteLLM did not sustain 500/s"
        goals.append(Goal(name=name, target="<= 0.33x", reached=reached, met=share <= 1 / 3 and bool(mine.sustained)))
    elif mine is not None and litellm_gave_up:
        goals.append(
            Goal(
                name=name,
                target="<= 0.33x",
                reached=f"{_fmt(mine.overhead_ms.p99, 'ms')}; LiteLLM saturated below 500/s",
                met=bool(mine.sustained),
            )
        )
    else:
        goals.append(Goal(name=name, target="<= 0.33x", reached="not measured", met=None))

    k1000 = _open_run(runs, "aipipe-kafka", profile_ms, 1000)
    name = "Kafka: 1,000/s, no errors, p99 overhead < 50 ms"
    if k1000 is not None:
        p99 = k1000.overhead_ms.p99
        met = bool(k1000.sustained) and k1000.errors == 0 and p99 is not None and p99 < 50
        reached = f"{k1000.throughput_rps:,.0f} requests/s, {k1000.errors} errors, p99 overhead {_fmt(p99, 'ms')}"
        goals.append(Goal(name=name, target="sustained, 0 errors, < 50 ms", reached=reached, met=met))
    else:
        gave_up = next((s for s in skipped if s.target == "aipipe-kafka" and s.rate_rps == 1000), None)
        reached = f"not run: {gave_up.reason}" if gave_up else "not measured"
        goals.append(
            Goal(name=name, target="sustained, 0 errors, < 50 ms", reached=reached, met=False if gave_up else None)
        )

    k100 = _open_run(runs, "aipipe-kafka", profile_ms, 100)
    name = "Kafka: p50 overhead at 100/s"
    if k100 is not None and k100.overhead_ms.p50 is not None:
        goals.append(
            Goal(name=name, target="< 25 ms", reached=_fmt(k100.overhead_ms.p50, "ms"), met=k100.overhead_ms.p50 < 25)
        )
    else:
        goals.append(Goal(name=name, target="< 25 ms", reached="not measured", met=None))
    goals.extend(floor_goals(runs, skipped, profile_ms))
    return goals


def floor_goals(runs: Sequence[RunResult], skipped: Sequence[Skipped] = (), profile_ms: float = 50.0) -> list[Goal]:
    """aipipe-Kafka against the Kafka floor at ``profile_ms``: the goals of issue 21.

    p50 overhead at 100 requests/s <= 1.3x the floor's and p99 <= 1.5x; maximum
    closed-loop throughput >= 75 % of the floor's; 500 requests/s open loop
    sustained with no errors when the floor sustains it. ``met=None`` when a run is missing.
    """
    goals: list[Goal] = []
    mine = _open_run(runs, "aipipe-kafka", profile_ms, 100)
    floor = _open_run(runs, "kafka-floor", profile_ms, 100)
    for quantile, limit in (("p50", 1.3), ("p99", 1.5)):
        name = f"Kafka {quantile} overhead at 100/s vs floor"
        ours = getattr(mine.overhead_ms, quantile) if mine is not None else None
        theirs = getattr(floor.overhead_ms, quantile) if floor is not None else None
        ratio = _ratio(ours, theirs)
        if ratio is None:
            goals.append(Goal(name=name, target=f"<= {limit}x", reached="not measured", met=None))
        else:
            reached = f"{ratio:.2f}x ({ours:.1f} vs {theirs:.1f} ms)"
            goals.append(Goal(name=name, target=f"<= {limit}x", reached=reached, met=ratio <= limit))
    ours_max = max_throughput(runs, "aipipe-kafka", profile_ms)
    floor_max = max_throughput(runs, "kafka-floor", profile_ms)
    name = "Kafka max closed-loop throughput vs floor"
    if ours_max is not None and floor_max is not None and floor_max.throughput_rps > 0:
        share = ours_max.throughput_rps / floor_max.throughput_rps
        reached = f"{share:.0%} ({ours_max.throughput_rps:,.0f} vs {floor_max.throughput_rps:,.0f} requests/s)"
        goals.append(Goal(name=name, target=">= 75 %", reached=reached, met=share >= 0.75))
    else:
        goals.append(Goal(name=name, target=">= 75 %", reached="not measured", met=None))
    name = "Kafka 500/s open loop, no errors (floor sustains it)"
    ours_500 = _open_run(runs, "aipipe-kafka", profile_ms, 500)
    floor_500 = _open_run(runs, "kafka-floor", profile_ms, 500)
    if floor_500 is not None and not floor_500.sustained:
        goals.append(Goal(name=name, target="sustained", reached="the floor did not sustain 500/s", met=None))
    elif ours_500 is not None:
        reached = f"{ours_500.throughput_rps:,.0f} requests/s, {ours_500.errors} errors"
        goals.append(Goal(name=name, target="sustained", reached=reached, met=bool(ours_500.sustained)))
    else:
        gave_up = next(
            (s for s in skipped if s.target == "aipipe-kafka" and s.profile_ms == profile_ms and s.rate_rps == 500),
            None,
        )
        reached = f"not run: {gave_up.reason}" if gave_up else "not measured"
        goals.append(Goal(name=name, target="sustained", reached=reached, met=False if gave_up else None))
    return goals
