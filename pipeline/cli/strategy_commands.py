"""``aipipe strategy set NAME [--weights openai=0.6,anthropic=0.3,cloudflare=0.1]`` (DESIGN A6), ``strategy show``.

Validates the name and weights (a usage error exits 2 with the reason), then
publishes one ``set_strategy`` command on ``ai.control``; every router replica
applies it for its next requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import msgspec

from pipeline.assembly.process import load_config, open_bus
from pipeline.cli.status_command import read_status
from pipeline.client.strategy_control import configured_strategy, publish_strategy, strategy_folder
from pipeline.runtime.config import STRATEGY_NAMES, normalize_strategy_name, validate_weights
from pipeline.runtime.settings import Settings
from stages.rules.strategies import StrategySpec, parse_strategy

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def strategy_name(text: str) -> str:
    """Parse a strategy name for argparse (kebab-case and camelCase accepted) -> canonical name.

    Raises:
        argparse.ArgumentTypeError: for an unknown name, listing the known ones.
    """
    try:
        return normalize_strategy_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def weights_arg(text: str) -> dict[str, float]:
    """Parse ``--weights`` for argparse: ``openai=0.6,anthropic=0.3,cloudflare=0.1`` -> ``{provider: weight}``.

    Raises:
        argparse.ArgumentTypeError: for a malformed pair, a repeated or unknown
            provider, or a weight that is not a finite number >= 0.
    """
    weights: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        provider, sep, raw = part.partition("=")
        provider, raw = provider.strip(), raw.strip()
        if not sep or not provider or not raw:
            raise argparse.ArgumentTypeError(f"expected PROVIDER=WEIGHT pairs separated by commas, got {part!r}")
        if provider in weights:
            raise argparse.ArgumentTypeError(f"weight for {provider} given twice")
        try:
            weights[provider] = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {provider} must be a number, got {raw!r}") from None
    if not weights:
        raise argparse.ArgumentTypeError("no weights given (e.g. --weights openai=0.6,cloudflare=0.4)")
    try:
        return validate_weights(weights)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


async def _set(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    settings = Settings.from_env(env)
    try:
        deployments = load_config(settings).providers
    except ValueError as exc:
        print(f"aipipe strategy set: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    try:
        spec: StrategySpec = parse_strategy(args.name, args.weights, known_providers=deployments)
    except ValueError as exc:
        where = f"AIPIPE_CONFIG={settings.config_path}" if settings.config_path else "AIPIPE_CONFIG is unset"
        hint = f" [deployments from this shell's configuration: {where}]" if "unknown provider" in str(exc) else ""
        print(f"aipipe strategy set: error: {exc}{hint}", file=sys.stderr)
        return EXIT_USAGE
    async with open_bus("kafka", env, start_broker=False) as opened:
        await opened.bus.ensure_topics([settings.topics.control])
        event = await publish_strategy(opened.bus, settings.topics, spec)
    if args.json:
        print(json.dumps(msgspec.to_builtins(event)))
    else:
        print(f"strategy set: {spec.describe()} (published on {settings.topics.control}; routers apply it now)")
    return EXIT_OK


async def _show(args: argparse.Namespace) -> int:

    env = dict(os.environ)
    on_event, current = strategy_folder(configured_strategy(env))
    await read_status(env, timeout_s=args.timeout_s, listeners=[on_event])
    spec = current()
    if args.json:
        print(json.dumps({"name": spec.name, "weights": dict(spec.weights) if spec.weights else None}))
    else:
        print(spec.describe())
    return EXIT_OK


def add_strategy_parser(sub: Any) -> None:
    """Add ``strategy set NAME [--weights ...] [--json]`` and ``strategy show`` to the ``aipipe`` subcommands."""
    p = sub.add_parser("strategy", help="load balancing: strategy set NAME [--weights p=w,...]")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))
    s = verbs.add_parser(
        "set",
        help="switch every router to a load-balancing strategy",
        description="Publish a set_strategy command on ai.control; every router replica applies it.",
    )
    s.add_argument("name", type=strategy_name, metavar="NAME", help=f"one of {', '.join(STRATEGY_NAMES)}")
    s.add_argument(
        "--weights",
        type=weights_arg,
        metavar="P=W,...",
        help="weighted only: relative weight per provider, e.g. openai=0.6,anthropic=0.3,cloudflare=0.1 "
        "(0 = never; a provider left out gets the mean of the others)",
    )
    s.add_argument("--json", action="store_true", help="print the published event as JSON")
    s.set_defaults(func=_set, is_async=True)
    show = verbs.add_parser("show", help="the strategy the routers run now (from ai.control)")
    show.add_argument("--json", action="store_true", help='print {"name": ..., "weights": ...}')
    show.add_argument("--timeout-s", type=float, default=10.0, help="longest time to read ai.control (s)")
    show.set_defaults(func=_show, is_async=True, quiet=True)
