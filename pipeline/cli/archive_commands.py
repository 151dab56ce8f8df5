"""``aipipe archive stats`` (DESIGN A11): what the archive on disk holds, per topic and UTC day.

Reads only the files (no broker needed): records and bytes of every day,
closed (compressed) or open, with a total per topic; ``--json`` prints one
object per topic and day.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipeline.assembly.process import load_config
from pipeline.runtime.settings import Settings
from pipeline.stores.archive_store import FileArchive

EXIT_OK, EXIT_FAIL = 0, 1


def _archive(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    settings = Settings.from_env(dict(os.environ))
    config = load_config(settings)
    if settings.archive_path.exists() and not settings.archive_path.is_dir():
        print(f"aipipe archive stats: error: {settings.archive_path} is not a directory", file=sys.stderr)
        return EXIT_FAIL
    archive = FileArchive(settings.archive_path, settings.topics, retention_days=config.archive.retention())
    days = archive.stats()
    if args.json:
        print(
            json.dumps(
                {
                    "dir": str(settings.archive_path),
                    "days": [
                        {"topic": d.topic, "day": d.day, "records": d.records, "bytes": d.bytes, "closed": d.closed}
                        for d in days
                    ],
                }
            )
        )
        return EXIT_OK
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    if not days:
        console.print(f"the archive at {settings.archive_path} is empty")
        return EXIT_OK
    table = Table(title=f"archive at {settings.archive_path}")
    for column in ("topic", "day", "records", "bytes", "state"):
        table.add_column(column, justify="right" if column in ("records", "bytes") else "left", no_wrap=True)
    totals: dict[str, list[int]] = {}
    for d in days:
        table.add_row(d.topic, d.day, str(d.records), str(d.bytes), "closed (gzip)" if d.closed else "open")
        total = totals.setdefault(d.topic, [0, 0])
        total[0] += d.records
        total[1] += d.bytes
    for topic, (records, size) in totals.items():
        table.add_row(topic, "total", str(records), str(size), "", style="bold")
    console.print(table)
    return EXIT_OK


def add_archive_parser(sub: Any) -> None:
    """Add ``archive stats [--json]`` to the ``aipipe`` subcommands ``sub``."""
    p = sub.add_parser("archive", help="the archive on disk: archive stats")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    help_text = "records and bytes per topic and UTC day in the archive ($AIPIPE_ARCHIVE_DIR)"
    v = verbs.add_parser("stats", help=help_text, description=help_text)
    v.add_argument("--json", action="store_true", help="print the days as JSON")
    v.set_defaults(func=_archive, is_async=False)
