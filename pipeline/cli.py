"""``aipipe`` command line (DESIGN A6).

Exit codes: 0 success, 1 failure, 2 usage error. ``--json`` prints data as
JSON where a command prints data.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import anyio
import msgspec

from pipeline.app import ALL_STAGES, PIPELINE_STAGES, Pipeline
from pipeline.broker import NoBrokerError
from pipeline.bus import BusError
from pipeline.client import PipelineClient, new_request_id
from pipeline.errors import AIProviderError
from pipeline.logs import setup_logging
from pipeline.runtime import load_config, open_bus, open_providers
from pipeline.settings import Settings
from schemas.request import AIRequest

log = logging.getLogger("aipipe.cli")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A failure to report in one line, with exit code 1."""


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
    stages = args.stage or list(PIPELINE_STAGES)
    async with open_bus("kafka", env, start_broker=True) as opened:
        origin = "started embedded broker" if opened.owns_broker else "using broker"
        log.info("%s at %s (stages: %s)", origin, opened.bootstrap, ", ".join(stages))
        async with open_providers(settings, config) as resolved, anyio.create_task_group() as tg:
            pipeline = Pipeline(settings, resolved, opened.bus, stages=stages)

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for sig in signals:
                        log.info("received %s: finishing in-flight work", signal.Signals(sig).name)
                        pipeline.stop()
                        return

            tg.start_soon(on_signal)
            async with pipeline:
                print(
                    f"aipipe running on {opened.bootstrap}: {', '.join(pipeline.stages)} (Ctrl-C to stop)",
                    file=sys.stderr,
                    flush=True,
                )
                await pipeline.wait_stopped()
            tg.cancel_scope.cancel()
    return EXIT_OK


# --- send ------------------------------------------------------------------------------------


async def _send(args: argparse.Namespace) -> int:
    env = _env()
    settings = Settings.from_env(env)
    data: dict[str, Any] = {
        "id": args.id or new_request_id(),
        "model": args.model,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "timeout_ms": args.timeout_ms,
    }
    if args.temperature is not None:
        data["temperature"] = args.temperature
    if args.user:
        data["user"] = args.user
    if args.provider:
        data["providers"] = args.provider
    if args.no_cache:
        data["cache"] = {"bypass": True}
    try:
        request = msgspec.convert(data, AIRequest)
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid request: {exc}") from exc
    async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
        await opened.bus.ensure_topics(settings.topics.all())
        client = PipelineClient(opened.bus, settings.topics)
        await tg.start(client.run)
        response = await client.request(request)
        client.stop()
    if args.json:
        print(msgspec.json.encode(response).decode())
    elif response.status == "ok":
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


# --- tail ------------------------------------------------------------------------------------


async def _tail(args: argparse.Namespace) -> int:
    env = _env()
    settings = Settings.from_env(env)
    try:
        topic = settings.topics.short(args.topic)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    shown = 0
    async with open_bus("kafka", env, start_broker=False) as opened:
        consumer = await opened.bus.consumer([topic], group=None, from_beginning=args.from_beginning)
        try:
            while args.limit is None or shown < args.limit:
                for record in await consumer.getmany(500, max_records=500):
                    text = record.value.decode("utf-8", "replace")
                    if args.json:
                        print(text, flush=True)
                    else:
                        key = record.key.decode("utf-8", "replace") if record.key else "-"
                        print(f"{record.partition}:{record.offset} {key} {text}", flush=True)
                    shown += 1
                    if args.limit is not None and shown >= args.limit:
                        break
        finally:
            await consumer.stop()
    return EXIT_OK


# --- emulator, demo --------------------------------------------------------------------------


def _emulator(args: argparse.Namespace) -> int:
    from pipeline.emulator import serve_forever

    serve_forever(args.host, args.port, args.profile)
    return EXIT_OK


async def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    if "LOG_LEVEL" not in os.environ:
        setup_logging("WARNING")  # the table is the demo's output; set LOG_LEVEL to see the stages' logs
    return await run_demo(count=args.count, json_out=args.json)


def _not_built(name: str) -> Any:
    def handler(_args: argparse.Namespace) -> int:
        raise CliError(f"`aipipe {name}` is not built yet in this version")

    return handler


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``aipipe`` argument parser with every command of DESIGN A6."""
    parser = _Parser(prog="aipipe", description="AI provider fallback pipeline on Kafka")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run pipeline stages (all five by default)")
    p.add_argument("--stage", action="append", choices=ALL_STAGES, help="stage to run (repeatable)")
    p.add_argument("--emulate", action="store_true", help="point every provider at the emulator")
    p.set_defaults(func=_run, is_async=True)

    p = sub.add_parser("demo", help="run the whole pipeline on real prompts and print a results table")
    p.add_argument("--count", type=int, default=12, help="distinct prompts to send (default 12)")
    p.add_argument("--json", action="store_true", help="print the responses as JSON lines")
    p.set_defaults(func=_demo, is_async=True)

    p = sub.add_parser("send", help="publish one request and print its answer")
    p.add_argument("prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--user")
    p.add_argument("--provider", action="append", help="allow-list, in order of preference (repeatable)")
    p.add_argument("--timeout-ms", type=int, default=60_000)
    p.add_argument("--id", help="request id (default: generated)")
    p.add_argument("--no-cache", action="store_true", help="bypass the response cache")
    p.add_argument("--json", action="store_true", help="print the whole AIResponse as JSON")
    p.set_defaults(func=_send, is_async=True)

    p = sub.add_parser("tail", help="print messages of a topic as they arrive")
    p.add_argument("topic", help="responses | control | costs | deadletter | requests | ...")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest message")
    p.add_argument("--limit", type=int, help="stop after N messages")
    p.add_argument("--json", action="store_true", help="print only the JSON values")
    p.set_defaults(func=_tail, is_async=True)

    p = sub.add_parser("emulator", help="serve the provider emulator (OpenAI, Anthropic, Cloudflare)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--profile", help="fault profile (TOML)")
    p.set_defaults(func=_emulator, is_async=False)

    for name, help_text in (
        ("status", "providers, circuit states and health"),
        ("costs", "cost reports"),
        ("budget", "budgets: budget set SCOPE --daily --weekly --monthly"),
        ("strategy", "load balancing: strategy set NAME [--weights p=w,...]"),
        ("cache", "cache stats | clear"),
        ("replay", "replay a topic by time range"),
        ("audit", "reconcile requests, responses and costs"),
        ("serve", "OpenAI-compatible HTTP endpoint"),
        ("bench", "benchmarks"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_built(name), is_async=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aipipe`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"aipipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_level)
    try:
        if args.is_async:
            code: int = anyio.run(args.func, args)
        else:
            code = args.func(args)
    except NoBrokerError as exc:
        print(f"aipipe: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except (CliError, BusError, AIProviderError, ValueError) as exc:
        print(f"aipipe: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
