"""``aipipe status`` (DESIGN A6): providers, circuit states and health, from ``ai.control``.

Reads ``ai.control`` from the beginning up to now (``pipeline.client.health_reader``)
and prints one row per provider: circuit state, healthy or not, error rate and
average response time over ``health.status_window_s``, calls in that window and
the time of the last call or probe; then each provider's last counted error. ``--json``
prints the ``HealthStatus`` list. Exits 0; 1 when no broker answers.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec

from pipeline.assembly.process import load_config, open_bus
from pipeline.client.health_board import HealthStatus
from pipeline.client.health_reader import HealthReader
from pipeline.client.strategy_control import configured_strategy, strategy_folder
from pipeline.runtime.settings import Settings
from schemas.events import ControlEvent

EXIT_OK = 0

_STATE_STYLE = {"CLOSED": "green", "HALF_OPEN": "yellow", "OPEN": "red"}


def print_status(statuses: list[HealthStatus]) -> None:
    """Print ``statuses`` as a table, one row per provider."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="aipipe providers")
    for column in ("provider", "circuit", "healthy", "errors", "avg ms", "calls", "seen (UTC)"):
        table.add_column(column, justify="right" if column in ("errors", "avg ms", "calls") else "left", no_wrap=True)
    for s in statuses:
        style = _STATE_STYLE.get(s.circuit_breaker_state, "")
        table.add_row(
            s.provider,
            f"[{style}]{s.circuit_breaker_state}[/]" if style else s.circuit_breaker_state,
            "yes" if s.is_healthy else "[red]no[/]",
            f"{100 * s.error_rate:.1f}%",
            f"{s.response_time_ms:.0f}" if s.response_time_ms else "-",
            str(s.calls_in_window),
            s.checked_at.strftime("%H:%M:%S") if s.checked_at else "never",
        )
    console = Console()
    console.print(table)
    for s in statuses:  # below the table, so the table fits an 80-column terminal
        if s.last_error:
            console.print(f"{s.provider}: last error {s.last_error}", highlight=False)


async def read_status(
    env: dict[str, str], *, timeout_s: float, listeners: Sequence[Callable[[ControlEvent], None]] = ()
) -> list[HealthStatus]:
    """``HealthStatus`` of every provider, read from ``ai.control`` up to now.

    ``listeners`` also get every control event read (e.g. the strategy fold of
    ``pipeline.client.strategy_control.strategy_folder``).

    Raises:
        NoBrokerError: when no broker answers (DESIGN A6).
        ValueError: for an invalid ``AIPIPE_CONFIG``.
    """
    settings = Settings.from_env(env)
    config = load_config(settings)
    statuses: list[HealthStatus] = []
    async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
        await opened.bus.ensure_topics([settings.topics.control])
        reader = HealthReader(opened.bus, settings.topics, config)
        reader.listeners.extend(listeners)
        await tg.start(reader.run)
        await reader.sync(timeout_s)
        reader.stop()
        statuses = reader.status()
    return statuses


async def _status(args: argparse.Namespace) -> int:
    on_event, strategy = strategy_folder(configured_strategy(dict(os.environ)))
    statuses = await read_status(dict(os.environ), timeout_s=args.timeout_s, listeners=[on_event])
    if args.json:
        data: list[dict[str, Any]] = msgspec.to_builtins(statuses)
        print(json.dumps(data))
    else:
        print_status(statuses)
        print(f"load balancing: {strategy().describe()}")
    return EXIT_OK


def add_status_parser(sub: Any) -> None:
    """Add ``status [--json] [--timeout-s S]`` to the ``aipipe`` subcommands ``sub``."""
    p = sub.add_parser("status", help="providers, circuit states and health (from ai.control)")
    p.add_argument("--json", action="store_true", help="print the HealthStatus list as JSON")
    p.add_argument(
        "--timeout-s", type=float, default=10.0, help="longest time to read ai.control up to now (s, default 10)"
    )
    p.set_defaults(func=_status, is_async=True, quiet=True)
