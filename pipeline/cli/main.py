"""``aipipe`` command line (DESIGN A6).

Exit codes: 0 success, 1 failure, 2 usage error. ``--json`` prints data as
JSON where a command prints data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import anyio
import msgspec

from pipeline.assembly.build import RUN_STAGES, Pipeline
from pipeline.assembly.process import load_config, open_bus, open_providers
from pipeline.assembly.restore import restore_into
from pipeline.assembly.rotation import BrokerRotation
from pipeline.bench import add_arguments as add_bench_arguments
from pipeline.bench import run_command
from pipeline.bus.discovery import NoBrokerError
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.bus.kafka import KafkaBus
from pipeline.bus.protocol import BusError
from pipeline.cli.archive_commands import add_archive_parser
from pipeline.cli.cache_commands import add_cache_parser
from pipeline.cli.cost_commands import add_cost_parsers
from pipeline.cli.demo.tour import run_demo
from pipeline.cli.lines import formatter, printable_text
from pipeline.cli.status_command import add_status_parser
from pipeline.cli.strategy_commands import add_strategy_parser
from pipeline.client.archive_reader import SOURCES, TopicReader
from pipeline.client.pipeline_client import PipelineClient, new_request_id
from pipeline.client.replay import audit, decode_all, parse_time, reconcile_calls, reprice, stream_topics_of
from pipeline.emulator import load_profile, serve_forever
from pipeline.errors import AIProviderError, StreamInterruptedError
from pipeline.runtime import telemetry
from pipeline.runtime.logs import setup_logging
from pipeline.runtime.settings import Settings
from pipeline.runtime.signals import drain_on_signal
from pipeline.serve.dashboard_server import DEFAULT_DASHBOARD_PORT, run_dashboard
from pipeline.serve.openai_server import run_server
from pipeline.stores.archive_store import FileArchive
from pipeline.stores.blob_store import open_blob_store
from schemas.events import CostEvent, Health
from schemas.request import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TIMEOUT_MS, AIRequest
from schemas.response import AIResponse
from schemas.stream import StreamChunk
from stages.rules.pricing import PriceTable

log = logging.getLogger("aipipe.cli")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
SOURCE_HELP = (
    "where to read: the archive on disk, the broker, or auto (the archive, plus what the broker holds that it "
    "does not yet; default)"
)


class CliError(Exception):
    """A failure to report in one line, with exit code 1."""


class UsageError(CliError):
    """A bad argument value (a time, a topic, a request field): reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _env() -> dict[str, str]:
    return dict(os.environ)


# --- run -------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    env = _env()
    if args.emulate:
        env["AIPIPE_EMULATE"] = "1"
    settings = Settings.from_env(env)
    config = load_config(settings)
    stages = args.stage or [s for s in RUN_STAGES if s != "archive" or config.archive.enabled]
    restore_on = config.archive.restore and not args.no_restore
    if "archive" in stages:  # a directory the archive cannot write is a set-up error, said at once
        _check_archive_dir(settings.archive_path)

    cfg = config.archive
    archive = FileArchive(settings.archive_path, settings.topics, flush_ms=cfg.flush_ms, retention_days=cfg.retention())

    async def on_new_broker(broker: EmbeddedBroker) -> None:
        # A new embedded broker is empty: put the archive's compact state in before anyone uses it (A11).
        if restore_on:
            await restore_into(broker.address, env, settings, config, archive)

    metrics_port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    try:  # tracing as OTEL_* / LOG_LEVEL say; /metrics when a port is set (flushed at exit by the SDK)
        telemetry.install(telemetry.Telemetry.from_env(env, metrics_port=metrics_port))
    except OSError as exc:
        raise CliError(f"cannot serve metrics on port {metrics_port}: {exc}") from exc
    async with open_bus("kafka", env, start_broker=True, on_new_broker=on_new_broker) as opened:
        origin = "started embedded broker" if opened.owns_broker else "using broker"
        log.info("%s at %s (stages: %s)", origin, opened.bootstrap, ", ".join(stages))
        async with open_providers(settings, config) as resolved, anyio.create_task_group() as tg:
            pipeline = Pipeline(settings, resolved, opened.bus, stages=stages, broker_id=lambda: opened.broker_id)

            tg.start_soon(drain_on_signal, pipeline.stop)
            async with pipeline:
                owned = opened.handle.owned if opened.handle is not None else None
                if owned is not None and isinstance(opened.bus, KafkaBus):  # DESIGN A11: only the broker's owner
                    tg.start_soon(BrokerRotation(owned, opened.bus, pipeline, settings, config).run)
                print(
                    f"aipipe running on {opened.bootstrap}: {', '.join(pipeline.stages)} (Ctrl-C to stop)",
                    file=sys.stderr,
                    flush=True,
                )
                await pipeline.wait_stopped()
            tg.cancel_scope.cancel()
    return EXIT_OK


@asynccontextmanager
async def _topic_reader(
    args: argparse.Namespace, env: dict[str, str], settings: Settings
) -> AsyncIterator[TopicReader]:
    """A reader of ``--source`` (archive, broker or auto); ``auto`` without a running broker reads the archive."""
    config = load_config(settings)
    archive = FileArchive(settings.archive_path, settings.topics, retention_days=config.archive.retention())
    if args.source == "archive" and not settings.archive_path.is_dir():
        raise CliError(f"no archive at {settings.archive_path} (AIPIPE_ARCHIVE_DIR, default $AIPIPE_HOME/archive)")
    if args.source == "archive":
        yield TopicReader("archive", archive, None, None, args.idle_s)
        return
    async with AsyncExitStack() as stack:
        try:
            opened = await stack.enter_async_context(open_bus("kafka", env, start_broker=False))
        except NoBrokerError:
            if args.source == "broker" or not archive.topic_dirs():
                raise
            print("no broker is running: reading the archive only", file=sys.stderr, flush=True)
            yield TopicReader("archive", archive, None, None, args.idle_s)
            return
        yield TopicReader(args.source, archive, opened.bus, opened.broker_id, args.idle_s)


def _check_archive_dir(path: Path) -> None:
    """Create the archive directory if needed and check that it can be written.

    Raises:
        CliError: naming the directory, when it is not a writable directory.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CliError(
            f"the archive directory {path} cannot be written ({exc.strerror or exc}); set AIPIPE_ARCHIVE_DIR "
            "to a writable directory, or run without the archive ([archive] enabled = false)"
        ) from exc


# --- send ------------------------------------------------------------------------------------


async def _send(args: argparse.Namespace) -> int:
    env = _env()
    settings = Settings.from_env(env)
    data: dict[str, Any] = {
        "id": args.id or new_request_id(),
        "model": args.model,
        "prompt": args.prompt,
    }
    # Only what the user gave: everything else takes AIRequest's defaults (README "Request"),
    # so `send` and the Python API never disagree.
    if args.max_tokens is not None:
        data["max_tokens"] = args.max_tokens
    if args.timeout_ms is not None:
        data["timeout_ms"] = args.timeout_ms
    if args.temperature is not None:
        data["temperature"] = args.temperature
    if args.user:
        data["user"] = args.user
    if args.provider:
        data["providers"] = args.provider
    if args.no_cache:
        data["cache"] = {"bypass": True}
    if args.resume and not args.stream:
        raise UsageError("--resume needs --stream (it lets the next provider continue a stream cut mid-answer)")
    if args.stream:
        data["stream"] = True
    if args.resume:
        data["stream_resume"] = True
    try:
        request = msgspec.convert(data, AIRequest)
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid request: {exc}") from exc
    telemetry.install(telemetry.Telemetry.from_env(env))  # the request's root span, when tracing
    async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
        await opened.bus.ensure_topics(settings.topics.all())
        blobs = open_blob_store(settings.redis_url, settings.home, prefix=settings.topics.prefix)
        client = PipelineClient(opened.bus, settings.topics, blobs=blobs)
        await tg.start(client.run)
        try:
            if request.stream:
                try:
                    response = await _print_stream(client, request, quiet=args.json)
                except StreamInterruptedError as exc:  # run again (a new generation) after text was shown
                    print(f"error: {exc.error_type}: {exc}", file=sys.stderr)
                    return EXIT_FAIL
            else:
                response = await client.request(request)
        finally:
            client.stop()
    if args.json:
        print(msgspec.json.encode(response).decode())
    elif response.status == "ok":
        if not request.stream:
            print(response.content)
        print(
            f"-- {response.provider}/{response.model}  cached={response.cached}  cost=${response.cost_usd:.8f}  "
            f"tokens={response.usage.total_tokens}  latency={response.latency_ms:.0f} ms  "
            f"attempts={len(response.attempts)}",
            file=sys.stderr,
        )
    else:
        err = response.error
        print(f"error: {err.type if err else '?'}: {err.message if err else ''}", file=sys.stderr)
    return EXIT_OK if response.status == "ok" else EXIT_FAIL


async def _print_stream(client: PipelineClient, request: AIRequest, *, quiet: bool) -> AIResponse:
    """Print a streamed answer's text as it arrives (unless ``quiet``) and return the final response.

    A stream that stops after text was printed ends the line and the response
    says why; leaving early (Ctrl-C) cancels the request.
    """
    handle = await client.stream(request)
    try:
        async for chunk in handle:
            if not quiet:
                sys.stdout.write(printable_text(chunk.delta))
                sys.stdout.flush()
    except AIProviderError as exc:
        if not quiet and handle.text:
            print(file=sys.stdout, flush=True)
        if handle.response is None:
            raise
        log.debug("stream of %s ended with %s", request.id, exc.error_type)
        return handle.response
    finally:
        if handle.response is None:
            with anyio.CancelScope(shield=True):
                await handle.aclose()
    if not quiet:
        print(flush=True)
    assert handle.response is not None
    return handle.response


# --- tail ------------------------------------------------------------------------------------


async def _tail(args: argparse.Namespace) -> int:
    env = _env()
    settings = Settings.from_env(env)
    try:
        topic = settings.topics.short(args.topic)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    shown = 0
    line = formatter(settings.topics, topic)
    async with open_bus("kafka", env, start_broker=False) as opened:
        consumer = await opened.bus.consumer([topic], group=None, from_beginning=args.from_beginning)
        try:
            while args.limit is None or shown < args.limit:
                for record in await consumer.getmany(500, max_records=500):
                    if args.json:
                        print(record.value.decode("utf-8", "replace"), flush=True)
                    else:
                        print(line(record), flush=True)
                    shown += 1
                    if args.limit is not None and shown >= args.limit:
                        break
        finally:
            await consumer.stop()
    return EXIT_OK


# --- replay, audit ---------------------------------------------------------------------------

#: Without a terminal, ``replay`` prints a progress line every this many records read.
REPLAY_PROGRESS_EVERY = 10_000


async def _replay(args: argparse.Namespace) -> int:
    from decimal import Decimal
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    env = _env()
    settings = Settings.from_env(env)
    try:
        topic = settings.topics.short(args.topic)
        since = parse_time(args.since)
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if until is not None and until <= since:
        raise UsageError(f"--until ({until.isoformat()}) must be after --since ({since.isoformat()})")
    try:
        prices = PriceTable.load(Path(args.reprice)) if args.reprice else None
    except OSError as exc:
        raise CliError(f"cannot read the price table {args.reprice}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"the price table {args.reprice} is not UTF-8 text: {exc}") from exc
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if prices is not None and topic != settings.topics.costs:
        raise CliError("--reprice applies to the costs topic only")
    if args.out:  # before reading everything: a file that cannot be written is named at once
        try:
            await anyio.Path(args.out).write_bytes(b"")
        except OSError as exc:
            raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    console = Console(stderr=True)
    with console.status(f"reading {topic} ...") as status:
        seen = 0

        def progress(_record: object) -> None:
            # A live count on a terminal; a plain line every REPLAY_PROGRESS_EVERY records otherwise.
            nonlocal seen
            seen += 1
            if seen % 100 == 0:
                status.update(f"reading {topic}: {seen} records")
            if not console.is_terminal and seen % REPLAY_PROGRESS_EVERY == 0:
                print(f"read {seen} records of {topic} ...", file=sys.stderr, flush=True)

        async with _topic_reader(args, env, settings) as reader:
            records = await reader.read(topic, since, until, on_record=progress)
    print(f"read {seen} records of {topic}", file=sys.stderr, flush=True)
    if args.out:
        try:
            await anyio.Path(args.out).write_bytes(b"".join(r.value.rstrip(b"\n") + b"\n" for r in records))
        except OSError as exc:
            raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from exc
    summary: dict[str, Any] = {
        "topic": topic,
        "records": len(records),
        "since": since.isoformat(),
        "until": until.isoformat() if until else None,
        "out": args.out,
    }
    if prices is not None:
        events, bad = decode_all(records, CostEvent)
        config = load_config(settings)
        defaults = {p: Decimal(str(c.cost_per_token)) for p, c in config.providers.items()}
        report = reprice(events, prices.with_deployments(config), default_cost_per_token=defaults)
        report.undecodable = bad
        summary["reprice"] = report.to_dict()
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    console = Console()
    console.print(
        f"{len(records)} records of {topic} between {since.isoformat()} and "
        f"{until.isoformat() if until else 'now'}" + (f", written to {args.out}" if args.out else "")
    )
    if "reprice" in summary:
        table = Table(title=f"re-priced with {args.reprice}")
        for col in ("provider", "model", "events", "recorded USD", "re-priced USD", "change USD"):
            table.add_column(col)
        for line in summary["reprice"]["lines"]:
            table.add_row(
                line["provider"],
                line["model"],
                str(line["events"]),
                f"{line['old_usd']:.10f}",
                f"{line['new_usd']:.10f}",
                f"{line['new_usd'] - line['old_usd']:+.10f}",
            )
        rp = summary["reprice"]
        table.add_row(
            "total",
            "",
            "",
            f"{rp['old_total_usd']:.10f}",
            f"{rp['new_total_usd']:.10f}",
            f"{rp['new_total_usd'] - rp['old_total_usd']:+.10f}",
        )
        console.print(table)
    return EXIT_OK


async def _audit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    env = _env()
    settings = Settings.from_env(env)
    try:
        since = parse_time(args.since)
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if until is not None and until <= since:
        raise UsageError(f"--until ({until.isoformat()}) must be after --since ({since.isoformat()})")
    t = settings.topics
    async with _topic_reader(args, env, settings) as reader:
        requests = await reader.read(t.requests, since, until)
        responses, _ = decode_all(await reader.read(t.responses, since, None), AIResponse)
        costs, _ = decode_all(await reader.read(t.costs, since, None), CostEvent)
        health, _ = decode_all(await reader.read(t.control, since, None), Health)  # other control events: skipped
        chunks: list[StreamChunk] = []
        topics = sorted(stream_topics_of(requests, t))  # ai.stream and the private topics requests named
        if reader.bus is not None:  # stream chunks are not archived by default: the broker's only
            await reader.bus.ensure_topics(topics)
            stream_reader = TopicReader("broker", None, reader.bus, reader.broker_id, args.idle_s)
            for topic in topics:
                found, _ = decode_all(await stream_reader.read(topic, since, None), StreamChunk)
                chunks.extend(found)
    report = audit(requests, responses, costs, chunks)
    reconcile_calls(report, health, costs)
    if args.json:
        print(json.dumps(report.to_dict()))
        return EXIT_OK if report.clean else EXIT_FAIL
    console = Console()
    table = Table(title=f"audit since {since.isoformat()}")
    table.add_column("check")
    table.add_column("count", justify="right")
    table.add_column("ids (first 10)")
    rows = [
        ("requests", report.requests, []),
        ("responses (distinct ids)", report.responses, []),
        ("ok / errors / cache hits", f"{report.ok} / {report.errors} / {report.cache_hits}", []),
        ("cost events", report.cost_events, []),
        ("missing responses", len(report.missing_responses), report.missing_responses),
        ("conflicting responses", len(report.conflicting), report.conflicting),
        ("duplicate identical responses", len(report.duplicate_responses), report.duplicate_responses),
        ("ok without cost event", len(report.missing_costs), report.missing_costs),
        ("more than one cost event", len(report.extra_costs), report.extra_costs),
        ("ids reused for a different request", len(report.reused_ids), report.reused_ids),
        ("streams checked", report.streams, []),
        ("streams whose chunks differ from the answer", len(report.stream_mismatches), report.stream_mismatches),
    ]
    for name, count, ids in rows:
        table.add_row(name, str(count), ", ".join(ids[:10]))
    console.print(table)
    for provider, total in report.totals_usd.items():
        console.print(f"  {provider}: ${total:.10f}")
    if report.calls:
        calls = Table(title="provider calls (what providers invoice) against the ledger")
        for column in (
            "provider",
            "calls",
            "billed USD",
            "requests answered",
            "ledger USD",
            "repeated calls",
            "repeated USD",
        ):
            calls.add_column(column, justify="left" if column == "provider" else "right")
        for provider, c in report.calls.items():
            calls.add_row(
                provider,
                str(c.calls),
                f"{c.billed_usd:.10f}",
                str(c.answered),
                f"{c.ledger_usd:.10f}",
                str(c.repeated_calls),
                f"{c.repeated_usd:.10f}",
            )
        console.print(calls)
        if report.repeated_call_ids:
            console.print(f"requests with repeated calls (first 10): {', '.join(report.repeated_call_ids[:10])}")
    console.print("[green]clean[/]" if report.clean else "[red]problems found[/]")
    return EXIT_OK if report.clean else EXIT_FAIL


# --- emulator, demo --------------------------------------------------------------------------


def _emulator(args: argparse.Namespace) -> int:
    if args.profile is not None:
        try:
            load_profile(args.profile)
        except OSError as exc:
            raise CliError(f"cannot read the emulator profile {args.profile}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise CliError(f"invalid emulator profile {args.profile}: {exc}") from exc
    try:
        serve_forever(args.host, args.port, args.profile)
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    return EXIT_OK


async def _dashboard(args: argparse.Namespace) -> int:

    await run_dashboard(_env(), host=args.host, port=args.port)
    return EXIT_OK


async def _serve(args: argparse.Namespace) -> int:

    await run_server(_env(), host=args.host, port=args.port)
    return EXIT_OK


async def _demo(args: argparse.Namespace) -> int:

    if "LOG_LEVEL" not in os.environ:
        setup_logging("WARNING")  # the table is the demo's output; set LOG_LEVEL to see the stages' logs
    return await run_demo(count=args.count, json_out=args.json, keep=args.keep, dashboard_port=args.dashboard_port)


async def _bench(args: argparse.Namespace) -> int:

    if "LOG_LEVEL" not in os.environ:
        setup_logging("WARNING")  # the tables are the output; set LOG_LEVEL to see the stages' logs
    return await run_command(args)


# --- parser ----------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aipipe")
    except PackageNotFoundError:
        return "unknown"


def _positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``aipipe`` argument parser with every command of DESIGN A6."""
    parser = _Parser(prog="aipipe", description="AI provider fallback pipeline on Kafka")
    parser.add_argument("--version", action="version", version=f"aipipe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run pipeline stages (all seven and the archive by default)")
    p.add_argument("--stage", action="append", choices=RUN_STAGES, help="stage to run (repeatable)")
    p.add_argument(
        "--no-restore",
        action="store_true",
        help="start a new embedded broker empty, without restoring the archive's state into it",
    )
    p.add_argument("--emulate", action="store_true", help="point every provider at the emulator")
    p.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port at /metrics (AIPIPE_METRICS_PORT)"
    )
    p.set_defaults(func=_run, is_async=True)

    p = sub.add_parser("demo", help="run the whole pipeline on real prompts and print a results table")
    p.add_argument("--count", type=_positive_int, default=12, help="distinct prompts to send (default 12)")
    p.add_argument("--json", action="store_true", help="print the responses as JSON lines")
    p.add_argument("--keep", action="store_true", help="keep the stages and the dashboard running after the demo")
    p.add_argument(
        "--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, help="the dashboard's port (default 8001)"
    )
    p.set_defaults(func=_demo, is_async=True)

    p = sub.add_parser("send", help="publish one request and print its answer")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int, help=f"most output tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, help=f"0..2 (default {DEFAULT_TEMPERATURE})")
    p.add_argument("--user")
    p.add_argument("--provider", action="append", help="allow-list, in order of preference (repeatable)")
    p.add_argument("--timeout-ms", type=int, help=f"deadline of the whole request, ms (default {DEFAULT_TIMEOUT_MS})")
    p.add_argument("--id", help="request id (default: generated)")
    p.add_argument("--no-cache", action="store_true", help="bypass the response cache")
    p.add_argument("--json", action="store_true", help="print the whole AIResponse as JSON")
    p.add_argument("--stream", action="store_true", help="print the answer as it arrives (stream: true)")
    p.add_argument(
        "--resume", action="store_true", help="with --stream: let the next provider continue a stream cut mid-answer"
    )
    p.set_defaults(func=_send, is_async=True)

    p = sub.add_parser("tail", help="print messages of a topic as they arrive")
    p.add_argument("topic", help="responses | control | costs | deadletter | requests | ...")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest message")
    p.add_argument("--limit", type=_positive_int, help="stop after N messages")
    p.add_argument("--json", action="store_true", help="print only the JSON values")
    p.set_defaults(func=_tail, is_async=True, quiet=True)

    p = sub.add_parser("replay", help="read a topic by time range (record timestamps); optionally re-price costs")
    p.add_argument("topic", help="responses | costs | control | requests | deadletter | ...")
    p.add_argument("--since", required=True, help="ISO 8601 start, included (e.g. 2026-11-29T00:00:00Z)")
    p.add_argument("--until", help="ISO 8601 end, excluded (default: now)")
    p.add_argument("--reprice", metavar="PRICES.toml", help="re-price cost events with another price table")
    p.add_argument("--out", metavar="FILE.jsonl", help="write the values, one JSON per line")
    p.add_argument("--idle-s", type=float, default=1.5, help="stop after this long without a new record (s)")
    p.add_argument("--source", choices=SOURCES, default="auto", help=SOURCE_HELP)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_replay, is_async=True, quiet=True)

    p = sub.add_parser("audit", help="reconcile requests, responses and cost events since a time")
    p.add_argument("--since", required=True, help="ISO 8601 start (e.g. 2026-11-29)")
    p.add_argument("--until", help="ISO 8601 end, excluded (default: now)")
    p.add_argument("--idle-s", type=float, default=1.5, help="stop reading after this long without a record (s)")
    p.add_argument("--source", choices=SOURCES, default="auto", help=SOURCE_HELP)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_audit, is_async=True, quiet=True)

    p = sub.add_parser("emulator", help="serve the provider emulator (OpenAI, Anthropic, Cloudflare)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--profile", help="fault profile (TOML)")
    p.set_defaults(func=_emulator, is_async=False)

    p = sub.add_parser("bench", help="benchmark aipipe against direct calls and LiteLLM's Router on the emulator")
    add_bench_arguments(p)
    p.set_defaults(func=_bench, is_async=True)

    p = sub.add_parser("dashboard", help="the operator dashboard alone, reading the broker's topics (/dashboard/)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_DASHBOARD_PORT, help="TCP port (default 8001)")
    p.set_defaults(func=_dashboard, is_async=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP endpoint (POST /v1/chat/completions, GET /v1/models)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.set_defaults(func=_serve, is_async=True)

    add_strategy_parser(sub)
    add_cost_parsers(sub)
    add_cache_parser(sub)
    add_archive_parser(sub)

    add_status_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aipipe`` console script; returns the exit code."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        os.environ["COLUMNS"] = "200"  # rich tables keep their numbers when piped to a file
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"aipipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # commands that only read and print: their output, not the log history of what they read
    quiet = getattr(args, "quiet", False) and "LOG_LEVEL" not in os.environ
    setup_logging("WARNING" if quiet else settings.log_level)
    try:
        if args.is_async:
            code: int = anyio.run(args.func, args)
        else:
            code = args.func(args)
    except NoBrokerError as exc:
        print(f"aipipe: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except UsageError as exc:
        print(f"aipipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CliError, BusError, AIProviderError, ValueError) as exc:
        print(f"aipipe: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # an error raised inside a task group: report its cause in one line
        known = group.subgroup(
            lambda e: isinstance(e, (NoBrokerError, CliError, BusError, AIProviderError, ValueError))
        )
        if known is None:
            raise
        leaf: BaseException = known
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        print(f"aipipe: error: {leaf}", file=sys.stderr)
        return EXIT_USAGE if isinstance(leaf, UsageError) else EXIT_FAIL
    return code


if __name__ == "__main__":
    raise SystemExit(main())
