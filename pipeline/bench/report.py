"""Showing a ``BenchReport``: rich tables (runs, four-way summary, ratios, goals, transports) and the PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.bench.stats import TARGET_TITLES, TARGETS, BenchReport, RunResult, Skipped

_PROCESSES = ("bench", "emulator", "broker")


def _ms(value: float | None, *, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def _title(report: BenchReport, key: str) -> str:
    title = TARGET_TITLES.get(key, key)
    info = report.meta.get("targets", {}).get(key, {})
    if "fetch_max_wait_ms" in info:
        title += f" (fetch_max_wait_ms={info['fetch_max_wait_ms']})"
    return title


def present_targets(report: BenchReport) -> list[str]:
    """The four-way targets that have runs, in column order (LiteLLM is absent when it was not installed)."""
    seen = {r.target for r in report.runs} | {s.target for s in report.skipped}
    return [t for t in TARGETS if t in seen]


def _key(item: RunResult | Skipped) -> tuple[float, str, float | None, int | None]:
    return (item.profile_ms, item.mode, item.rate_rps, item.concurrency)


def _loads(report: BenchReport) -> list[tuple[float, str, float | None, int | None]]:
    keys: list[tuple[float, str, float | None, int | None]] = []
    items: list[RunResult | Skipped] = [*report.runs, *report.skipped]
    for item in items:
        key = _key(item)
        if key not in keys:
            keys.append(key)
    keys.sort(key=lambda k: (-k[0], k[1] == "closed", k[2] or 0, k[3] or 0))
    return keys


def _load_label(mode: str, rate: float | None, clients: int | None) -> str:
    return f"open {rate:g}/s" if mode == "open" else f"closed {clients}"


def runs_table(report: BenchReport, runs: list[RunResult] | None = None, *, title: str = "runs") -> Table:
    """One row per run: throughput, latency percentiles, overhead, errors, CPU seconds and peak RSS per process."""
    table = Table(title=title, title_justify="left")
    for column, justify in (
        ("target", "left"),
        ("profile", "right"),
        ("load", "left"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("p99 ms", "right"),
        ("max ms", "right"),
        ("ovh p50", "right"),
        ("ovh p99", "right"),
        ("errors", "right"),
        ("CPU s bench/emu/broker", "right"),
        ("peak RSS MB bench/emu/broker", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for run in report.runs if runs is None else runs:
        cpu = "/".join(f"{run.processes[p].cpu_s:.1f}" if p in run.processes else "-" for p in _PROCESSES)
        rss = "/".join(f"{run.processes[p].peak_rss_mb:.0f}" if p in run.processes else "-" for p in _PROCESSES)
        errors = str(run.errors)
        if run.errors:
            errors += " (" + ", ".join(f"{k} {v}" for k, v in run.error_kinds.items()) + ")"
        table.add_row(
            run.target,
            f"{run.profile_ms:g} ms",
            run.load_label,
            f"{run.throughput_rps:,.0f}",
            _ms(run.latency_ms.p50),
            _ms(run.latency_ms.p95),
            _ms(run.latency_ms.p99),
            _ms(run.latency_ms.max),
            _ms(run.overhead_ms.p50, sign=True),
            _ms(run.overhead_ms.p99, sign=True),
            errors,
            cpu,
            rss,
        )
    return table


def four_way_table(report: BenchReport) -> Table:
    """Rows: profile and load; columns: the targets; cells: throughput, p50/p99 overhead (ms), errors."""
    targets = present_targets(report)
    table = Table(
        title="side by side: requests/s · overhead p50 / p99 (ms, latency minus the emulator's)",
        title_justify="left",
    )
    table.add_column("profile")
    table.add_column("load")
    for key in targets:
        table.add_column(_title(report, key), justify="right")
    for profile, mode, rate, clients in _loads(report):
        cells: list[str] = []
        for key in targets:
            load = (profile, mode, rate, clients)
            run = next((r for r in report.runs if r.target == key and _key(r) == load), None)
            skip = next((s for s in report.skipped if s.target == key and _key(s) == load), None)
            cells.append(_cell(run, skip))
        table.add_row(f"{profile:g} ms", _load_label(mode, rate, clients), *cells)
    return table


def _cell(run: RunResult | None, skip: Skipped | None) -> str:
    if run is None:
        return f"skipped ({skip.reason})" if skip is not None else "-"
    text = (
        f"{run.throughput_rps:,.0f}/s · {_ms(run.overhead_ms.p50, sign=True)} / {_ms(run.overhead_ms.p99, sign=True)}"
    )
    if run.errors:
        text += f" · {run.errors} err"
    if run.sustained is False:
        text = f"[yellow]{text}[/]"
    return text


def ratios_table(report: BenchReport) -> Table:
    """Ratios aipipe / limit and aipipe / LiteLLM per bus and load: throughput and p50/p99 overhead ratios."""
    table = Table(title="ratios: aipipe ÷ baseline (throughput; overhead p50, p99)", title_justify="left")
    for column in ("aipipe", "baseline", "profile", "load", "throughput", "ovh p50", "ovh p99"):
        table.add_column(column, justify="left" if column in ("aipipe", "baseline", "load") else "right")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for ratio in report.ratios:
        table.add_row(
            ratio.aipipe,
            ratio.baseline,
            f"{ratio.profile_ms:g} ms",
            _load_label(ratio.mode, ratio.rate_rps, ratio.concurrency),
            fmt(ratio.throughput),
            fmt(ratio.p50_overhead),
            fmt(ratio.p99_overhead),
        )
    return table


def goals_table(report: BenchReport) -> Table:
    """The issue's goals (50 ms profile): target, reached, met."""
    table = Table(title="goals (50 ms profile)", title_justify="left")
    for column in ("goal", "target", "reached", "met"):
        table.add_column(column)
    for goal in report.goals:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[goal.met]
        table.add_row(goal.name, goal.target, goal.reached, met)
    return table


def print_report(report: BenchReport, console: Console) -> None:
    """Print every table of ``report``, then the notes."""
    hw = report.meta.get("hardware", {})
    load = report.meta.get("loadavg_1m", {})
    console.print(
        f"[bold]aipipe bench[/] on {hw.get('cpus', '?')} CPUs ({hw.get('cpu_model', '?')}), "
        f"Python {hw.get('python', '?')}; 1-min load average {load.get('before')} before, {load.get('after')} after; "
        f"{report.meta.get('wall_s', '?')} s"
    )
    console.print(runs_table(report))
    console.print(four_way_table(report))
    if report.ratios:
        console.print(ratios_table(report))
    console.print(goals_table(report))
    if report.transports:
        console.print(runs_table(report, report.transports, title="HTTP clients on the emulator (closed loop)"))
    for note in report.notes:
        console.print(f"note: {note}")


def plot_latency(report: BenchReport, path: Path) -> bool:
    """Draw latency versus offered load (open loop; p50 solid, p99 dashed; one panel per profile) to ``path``.

    Closed-loop runs appear as stars at their achieved throughput and p50.

    Returns:
        False when matplotlib is not installed (nothing written).

    Raises:
        OSError: when the file cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    profiles = sorted({r.profile_ms for r in report.runs}, reverse=True)
    if not profiles:
        return False
    fig, axes = plt.subplots(1, len(profiles), figsize=(6.5 * len(profiles), 4.8), squeeze=False)
    colors = {"limit": "tab:gray", "litellm": "tab:red", "aipipe-memory": "tab:blue", "aipipe-kafka": "tab:green"}
    colors["kafka-floor"] = "tab:olive"
    for ax, profile in zip(axes[0], profiles, strict=True):
        for key in present_targets(report):
            color = colors.get(key, "black")
            opened = sorted(
                (r for r in report.runs if r.target == key and r.profile_ms == profile and r.mode == "open"),
                key=lambda r: r.rate_rps or 0,
            )
            xs = [r.rate_rps for r in opened]
            p50: list[Any] = [r.latency_ms.p50 for r in opened]
            p99: list[Any] = [r.latency_ms.p99 for r in opened]
            if opened:
                ax.plot(xs, p50, marker="o", color=color, label=f"{TARGET_TITLES.get(key, key)} p50")
                ax.plot(
                    xs,
                    p99,
                    marker="o",
                    linestyle="--",
                    color=color,
                    alpha=0.7,
                    label=f"{TARGET_TITLES.get(key, key)} p99",
                )
            for run in (r for r in report.runs if r.target == key and r.profile_ms == profile and r.mode == "closed"):
                if run.latency_ms.p50 is not None and run.throughput_rps > 0:
                    label = f"{TARGET_TITLES.get(key, key)} closed {run.concurrency} (p50)"
                    ax.scatter([run.throughput_rps], [run.latency_ms.p50], marker="*", s=120, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s); stars: closed loop at achieved throughput")
        ax.set_ylabel("end-to-end latency (ms)")
        ax.set_title(f"emulator latency {profile:g} ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    hw = report.meta.get("hardware", {})
    fig.suptitle(f"aipipe vs the limit vs LiteLLM — {hw.get('cpus', '?')} CPUs, {hw.get('cpu_model', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
