"""``aipipe costs`` and ``aipipe budget set|status`` (DESIGN A6).

``costs`` reads ``ai.costs`` and ``ai.control`` from the beginning (a
``pipeline.client.report_reader.ReportReader``) and prints the manager's reports as
tables: cost per provider, budgets, the projection of one scope, top models,
top users and cost per day; ``--json`` prints them as one JSON object.
``budget set SCOPE --daily --weekly --monthly`` publishes ``set_budget`` on
``ai.control`` and waits (``--wait-s``) for a budget gate to confirm it;
``budget status [SCOPE]`` prints a scope's windows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio
import msgspec
from msgspec import UNSET

from pipeline.assembly.process import load_config, open_bus
from pipeline.client.cost_book import BudgetReport, CostBook
from pipeline.client.report_reader import ReportReader, limits_applied, publish_control, set_budget_event
from pipeline.runtime.runner import now_utc
from pipeline.runtime.settings import Settings
from stages.rules.ledger import WINDOWS, validate_scope, zone

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.6f}"


def _reports(book: CostBook, *, days: int, top: int, scope: str) -> dict[str, Any]:
    now = now_utc()
    scopes = book.budget_scopes()
    return {
        "at": now.isoformat(),
        "cost_summary": book.cost_summary(),
        "budgets": [book.budget_status(s, now) for s in scopes],
        "projection": book.projection(scope, days, now),
        "top_models": book.top_models(top),
        "top_users": book.top_users(top),
        "daily_costs": book.daily_costs(days, now),
    }


async def _read_book(env: dict[str, str], settings: Settings) -> CostBook:
    tz = zone(load_config(settings).budget.timezone)
    async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
        await opened.bus.ensure_topics([settings.topics.costs, settings.topics.control])
        reader = ReportReader(opened.bus, settings.topics, tz)
        await tg.start(reader.run)
        await reader.sync(timeout_s=30.0)
        reader.stop()
    return reader.book


def _budget_table(reports: list[BudgetReport]) -> Any:
    from rich.table import Table

    table = Table(title="budgets (spent from ai.costs; limits and reservations from the gates)")
    for col in ("scope", "window", "limit", "spent", "reserved", "used %", "resets at"):
        table.add_column(col, justify="right" if col in ("limit", "spent", "reserved", "used %") else "left")
    for report in reports:
        for name in WINDOWS:
            w = report.window(name)
            pct = "-" if w.percentage is None else f"{w.percentage:.1f}"
            table.add_row(
                report.scope,
                name,
                _money(w.limit_usd),
                _money(w.spent_usd),
                _money(w.reserved_usd),
                pct,
                w.resets_at.isoformat(timespec="minutes"),
            )
    return table


async def _costs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.days < 1 or args.top < 0:
        print("aipipe costs: error: --days must be >= 1 and --top >= 0", file=sys.stderr)
        return EXIT_USAGE
    env = dict(os.environ)
    settings = Settings.from_env(env)
    book = await _read_book(env, settings)
    data = _reports(book, days=args.days, top=args.top, scope=args.scope)
    if args.json:
        print(json.dumps(msgspec.to_builtins(data)))
        return EXIT_OK
    console = Console()
    table = Table(title=f"cost per provider ({book.events} cost events, {book.duplicates} duplicates ignored)")
    for col in ("provider", "requests", "tokens", "cost", "USD / 1M tokens", "cache hits", "saved"):
        table.add_column(col, justify="left" if col == "provider" else "right")
    for provider, s in data["cost_summary"].items():
        table.add_row(
            provider,
            str(s.request_count),
            f"{s.total_tokens:,}",
            _money(s.total_cost_usd),
            f"{s.average_cost_per_token_usd * 1e6:.4f}",
            str(s.cache_hits),
            _money(s.saved_usd),
        )
    console.print(table)
    if data["budgets"]:
        console.print(_budget_table(data["budgets"]))
    p = data["projection"]
    console.print(
        f"projection for {p.scope} (rate over {p.days} day(s): {_money(p.rate_usd_per_day)}/day): "
        f"end of day {_money(p.daily)}, week {_money(p.weekly)}, month {_money(p.monthly)}"
    )
    table = Table(title=f"top {args.top} models")
    for col in ("provider", "model", "requests", "cache hits", "tokens", "cost"):
        table.add_column(col, justify="left" if col in ("provider", "model") else "right")
    for m in data["top_models"]:
        table.add_row(
            m.provider,
            m.model,
            str(m.request_count),
            str(m.cache_hits),
            f"{m.total_tokens:,}",
            _money(m.total_cost_usd),
        )
    console.print(table)
    table = Table(title=f"top {args.top} users")
    for col in ("user", "requests", "cache hits", "tokens", "cost", "saved"):
        table.add_column(col, justify="left" if col == "user" else "right")
    for u in data["top_users"]:
        table.add_row(
            u.user,
            str(u.request_count),
            str(u.cache_hits),
            f"{u.total_tokens:,}",
            _money(u.total_cost_usd),
            _money(u.saved_usd),
        )
    console.print(table)
    table = Table(title=f"cost per day, last {args.days} day(s)")
    for col in ("date", "requests", "cache hits", "tokens", "cost", "saved"):
        table.add_column(col, justify="left" if col == "date" else "right")
    for d in data["daily_costs"]:
        table.add_row(
            d.date.isoformat(),
            str(d.request_count),
            str(d.cache_hits),
            f"{d.total_tokens:,}",
            _money(d.total_cost_usd),
            _money(d.saved_usd),
        )
    console.print(table)
    return EXIT_OK


async def _budget_set(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    settings = Settings.from_env(env)
    try:
        deployments = load_config(settings).providers
    except ValueError as exc:
        print(f"aipipe budget set: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not args.clear and all(w is UNSET for w in (args.daily, args.weekly, args.monthly)):
        print(
            "aipipe budget set: error: give the windows to change (--daily, --weekly, --monthly: USD, or none "
            "to remove one), or --clear to remove every limit of the scope",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.clear:
        if any(w is not UNSET for w in (args.daily, args.weekly, args.monthly)):
            print("aipipe budget set: error: --clear removes every limit; give no window with it", file=sys.stderr)
            return EXIT_USAGE
        args.daily = args.weekly = args.monthly = None
    try:
        event = set_budget_event(args.scope, args.daily, args.weekly, args.monthly, deployments=deployments)
    except ValueError as exc:
        hint = _config_hint(settings) if "unknown budget scope" in str(exc) else ""
        print(f"aipipe budget set: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USAGE
    confirmed = False
    async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
        await opened.bus.ensure_topics([settings.topics.costs, settings.topics.control])
        reader = ReportReader(opened.bus, settings.topics)
        if args.wait_s > 0:
            await tg.start(reader.run)
        await publish_control(opened.bus, settings.topics, event)
        if args.wait_s > 0:
            confirmed = await reader.wait_for(limits_applied(event), args.wait_s)
            reader.stop()
    if args.json:
        print(json.dumps({"command": msgspec.to_builtins(event), "confirmed": confirmed}))
        return EXIT_OK
    named = [(w, getattr(event, f"{w}_usd")) for w in WINDOWS if getattr(event, f"{w}_usd") is not UNSET]
    limits = ", ".join(f"{w} {_money(v) if v is not None else 'unlimited'}" for w, v in named)
    note = "applied by a budget gate" if confirmed else "published; a budget gate applies it when it reads ai.control"
    print(f"budget {event.scope}: {limits} ({note})")
    return EXIT_OK


async def _budget_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    env = dict(os.environ)
    settings = Settings.from_env(env)
    if args.scope:
        try:
            validate_scope(args.scope, tuple(load_config(settings).providers))
        except ValueError as exc:
            print(f"aipipe budget status: error: {exc}{_config_hint(settings)}", file=sys.stderr)
            return EXIT_USAGE
    book = await _read_book(env, settings)
    now = now_utc()
    scopes = [args.scope] if args.scope else book.budget_scopes()
    reports = [book.budget_status(s, now) for s in scopes]
    if args.json:
        print(json.dumps(msgspec.to_builtins(reports)))
        return EXIT_OK
    if not reports:
        print("no budgets set (aipipe budget set SCOPE --daily USD)")
        return EXIT_OK
    Console().print(_budget_table(reports))
    return EXIT_OK


def _config_hint(settings: Settings) -> str:
    """Where the deployment names came from, for an error about an unknown one."""
    where = f"AIPIPE_CONFIG={settings.config_path}" if settings.config_path else "AIPIPE_CONFIG is unset"
    return f" [deployments from the configuration of this shell: {where}; use the one `aipipe run` uses]"


def _usd_or_none(text: str) -> float | None:
    """A window's limit: an amount in USD, or ``none``/``unlimited`` to remove the limit."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    return _usd(text)


def _usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite amount >= 0 (USD), got {text!r}")
    return value


def add_cost_parsers(sub: Any) -> None:
    """Add ``costs`` and ``budget`` (``set``, ``status``) to the ``aipipe`` subcommands ``sub``."""
    p = sub.add_parser("costs", help="cost reports: per provider, budgets, projection, top models/users, per day")
    p.add_argument("--days", type=int, default=7, help="days of daily costs and of the projection's rate (default 7)")
    p.add_argument("--top", type=int, default=10, help="rows of the top models and users tables (default 10)")
    p.add_argument("--scope", default="global", help="scope of the projection (default global)")
    p.add_argument("--json", action="store_true", help="print every report as one JSON object")
    p.set_defaults(func=_costs, is_async=True, quiet=True)

    p = sub.add_parser("budget", help="budgets: budget set SCOPE --daily --weekly --monthly | budget status [SCOPE]")
    budget = p.add_subparsers(dest="budget_command", required=True, parser_class=type(p))
    q = budget.add_parser(
        "set",
        help="change a scope's limits (USD): only the windows given change",
        description="Change a budget scope's limits. Only the windows given change; `none` removes a "
        "window's limit; --clear removes every limit. At least one window or --clear is required.",
    )
    q.add_argument(
        "scope", help="global | user:NAME | a deployment (openai, anthropic, cloudflare, or a configured one)"
    )
    q.add_argument("--daily", type=_usd_or_none, default=UNSET, help="USD per calendar day, or none")
    q.add_argument("--weekly", type=_usd_or_none, default=UNSET, help="USD per calendar week from Monday, or none")
    q.add_argument("--monthly", type=_usd_or_none, default=UNSET, help="USD per calendar month, or none")
    q.add_argument("--clear", action="store_true", help="remove every limit of the scope")
    q.add_argument("--wait-s", type=float, default=5.0, help="wait this long for a gate to confirm (default 5)")
    q.add_argument("--json", action="store_true", help="print the command as JSON")
    q.set_defaults(func=_budget_set, is_async=True, quiet=True)
    q = budget.add_parser("status", help="a scope's windows: limit, spent, reserved, percent, reset time")
    q.add_argument("scope", nargs="?", help="scope (default: every scope with a budget)")
    q.add_argument("--json", action="store_true", help="print the windows as JSON")
    q.set_defaults(func=_budget_status, is_async=True, quiet=True)


__all__ = ["add_cost_parsers"]
