"""``aipipe cache stats|clear`` (DESIGN A6): the response cache of every replica, from the command line.

``stats`` publishes a ``cache_stats_request`` on ``ai.control`` and prints the
replies of every cache replica (hits, misses, hit rate, entries, evictions,
bytes) as a table with a total row, or as JSON with ``--json``. ``clear``
publishes ``cache_clear`` and prints what the replicas report once emptied.
Both exit 1 when no cache replica answers within ``--timeout-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import msgspec

from pipeline.assembly.process import open_bus
from pipeline.client import cache_control
from pipeline.runtime.settings import Settings
from schemas.cache import CacheStatsSummary

EXIT_OK, EXIT_FAIL = 0, 1


def _rate(hits: int, misses: int) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def print_summary(summary: CacheStatsSummary, title: str) -> None:
    """Print ``summary`` as a table: one row per replica and a total row."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("replica", "store", "hits", "misses", "hit rate", "entries", "evictions", "bytes"):
        table.add_column(column, justify="left" if column in ("replica", "store") else "right", no_wrap=True)
    for r in summary.replicas:
        table.add_row(
            r.replica or "?",
            r.store or "?",
            str(r.hits),
            str(r.misses),
            _rate(r.hits, r.misses),
            str(r.entries),
            str(r.evictions),
            str(r.bytes),
        )
    table.add_row(
        "total",
        "",
        str(summary.hits),
        str(summary.misses),
        _rate(summary.hits, summary.misses),
        str(summary.entries),
        str(summary.evictions),
        str(summary.bytes),
        style="bold",
    )
    console = Console()
    if not console.is_terminal:  # piped: no terminal width to fit, print whole lines
        console = Console(width=160)
    console.print(table)


async def _cache(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    settings = Settings.from_env(env)
    async with open_bus("kafka", env, start_broker=False) as opened:
        await opened.bus.ensure_topics([settings.topics.control])
        if args.verb == "clear":
            summary = await cache_control.clear_cache(opened.bus, settings.topics, timeout_s=args.timeout_s)
        else:
            summary = await cache_control.request_cache_stats(opened.bus, settings.topics, timeout_s=args.timeout_s)
    if not summary.replicas:
        print(
            f"aipipe cache {args.verb}: error: no cache replica answered within {args.timeout_s:g} s "
            "(is `aipipe run` with the cache stage up?)",
            file=sys.stderr,
        )
        return EXIT_FAIL
    if args.json:
        data: dict[str, Any] = msgspec.to_builtins(summary)
        print(json.dumps(data))
    elif args.verb == "clear":
        print_summary(summary, f"cache cleared on {len(summary.replicas)} replica(s)")
    else:
        print_summary(summary, "response cache")
    return EXIT_OK


def add_cache_parser(sub: Any) -> None:
    """Add ``cache stats|clear [--json] [--timeout-s S]`` to the ``aipipe`` subcommands ``sub``."""
    p = sub.add_parser("cache", help="response cache: cache stats | cache clear")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    for verb, help_text in (
        ("stats", "hits, misses, hit rate, entries, evictions and bytes of every cache replica"),
        ("clear", "empty the response cache of every replica (a cache_clear command on ai.control)"),
    ):
        v = verbs.add_parser(verb, help=help_text, description=help_text)
        v.add_argument("--json", action="store_true", help="print the summary as JSON")
        v.add_argument(
            "--timeout-s", type=float, default=3.0, help="how long to wait for the replicas' answers (s, default 3)"
        )
        v.set_defaults(func=_cache, is_async=True)
