"""``aipipe bench``: aipipe against the bare-client limit and LiteLLM's Router, on the same emulator, in one run.

This module only declares the command's arguments and runs it; the work is in
``pipeline.bench.driver`` (measuring), ``pipeline.bench.stats`` (pure
arithmetic), ``pipeline.bench.targets`` (what is measured) and
``pipeline.bench.report`` (tables and plot), imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.bench.driver import BenchOptions, run_bench, write_results
from pipeline.bench.report import print_report
from pipeline.bench.stats import TARGETS, RunResult, Skipped
from pipeline.bench.targets import litellm_available

__all__ = ["add_arguments", "run_command"]

_TARGET_NAMES = TARGETS


def _numbers(kind: type[float] | type[int]) -> Callable[[str], tuple[float | int, ...]]:
    def parse(text: str) -> tuple[float | int, ...]:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
        return values

    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in _TARGET_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"targets are {', '.join(_TARGET_NAMES)}; got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``aipipe bench`` on ``parser``."""
    parser.add_argument("--quick", action="store_true", help="short plan: under 2 minutes (2 s per run)")
    parser.add_argument("--duration", type=_positive, help="seconds per run (default 10; --quick 2)")
    parser.add_argument(
        "--rates", type=_numbers(float), help="open-loop rates, requests/s (default 100,250,500,1000,2000)"
    )
    parser.add_argument("--concurrency", type=_numbers(int), help="closed-loop client counts (default 100,400)")
    parser.add_argument("--profiles", type=_numbers(float), help="emulator latency profiles, ms (default 50,0)")
    parser.add_argument("--targets", type=_targets, help=f"comma-separated subset of {','.join(_TARGET_NAMES)}")
    parser.add_argument("--timeout", type=_positive, help="limit of one call, s (default 10; --quick 5)")
    parser.add_argument("--out", default="bench/results", help="directory for the JSON and PNG (default bench/results)")
    parser.add_argument("--bootstrap", help="a Kafka broker for aipipe-kafka and kafka-floor (default: embedded)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument("--no-transports", action="store_true", help="skip the HTTP client comparison")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")


async def run_command(args: argparse.Namespace) -> int:
    """Run ``aipipe bench`` with parsed ``args``: progress on stderr, tables (or JSON) on stdout; returns 0.

    Raises:
        ValueError: for an inconsistent plan (e.g. no target left).
        RuntimeError: when the emulator cannot start.
    """
    import msgspec
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    overrides: dict[str, object] = {"out_dir": Path(args.out), "plot": not args.no_plot}
    if args.duration is not None:
        overrides["duration_s"] = args.duration
    if args.rates is not None:
        overrides["rates_rps"] = tuple(args.rates)
    if args.concurrency is not None:
        overrides["concurrency"] = tuple(args.concurrency)
    if args.profiles is not None:
        overrides["profiles_ms"] = tuple(args.profiles)
        overrides["open_profiles_ms"] = None
    if args.targets is not None:
        overrides["targets"] = args.targets
    if args.timeout is not None:
        overrides["timeout_s"] = args.timeout
    if args.bootstrap:
        overrides["bootstrap"] = args.bootstrap
    if args.no_transports:
        overrides["transports"] = False
    options = BenchOptions.quick_preset(**overrides) if args.quick else BenchOptions(**overrides)  # type: ignore[arg-type]

    err = Console(stderr=True)
    out = Console() if sys.stdout.isatty() else Console(width=200)  # a file or pipe gets the whole table
    targets = tuple(t for t in options.targets if t != "litellm" or litellm_available())
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task("starting", total=options.planned_runs(targets))

        def on_run(text: str) -> None:
            progress.update(task, description=text)

        def on_done(result: RunResult | Skipped) -> None:
            progress.advance(task)
            if not err.is_terminal and isinstance(result, RunResult):
                err.print(
                    f"{result.target} · {result.profile_ms:g} ms · {result.load_label}: "
                    f"{result.throughput_rps:,.0f} req/s, overhead p50 {result.overhead_ms.p50} p99 "
                    f"{result.overhead_ms.p99} ms, {result.errors} errors",
                    highlight=False,
                )

        command = "aipipe " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "aipipe bench"
        report = await run_bench(options, on_run=on_run, on_done=on_done, command=command)
    written = write_results(report, options.out_dir, plot=options.plot) if options.out_dir is not None else {}
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print_report(report, out)
        for kind, path in written.items():
            out.print(f"{kind}: {path}")
    return 0
