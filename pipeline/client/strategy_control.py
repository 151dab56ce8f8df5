"""Switching the load-balancing strategy at run time: the ``set_strategy`` command on ``ai.control``.

The CLI (``aipipe strategy set``) and ``AIProviderManager.set_load_balancing_strategy``
publish one ``set_strategy`` event keyed ``*``; every router replica reads
``ai.control`` as a broadcast and applies it (``stages.rules.strategies.StrategyState.apply``),
and a replica that starts later replays it from the topic, so all agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import anyio

from pipeline.assembly.process import load_config
from pipeline.bus.protocol import Bus, Outgoing
from pipeline.bus.topics import Topics
from pipeline.runtime.runner import SCHEMA_HEADER, encode, now_utc, publish_with_retry
from pipeline.runtime.settings import Settings
from schemas import SCHEMA_VERSION
from schemas.events import ControlEvent, SetStrategy
from stages.rules.strategies import StrategySpec, StrategyState, parse_strategy


def set_strategy_event(spec: StrategySpec) -> SetStrategy:
    """The ``set_strategy`` event for ``spec``, stamped now (UTC)."""
    return SetStrategy(name=spec.name, weights=dict(spec.weights) if spec.weights else None, at=now_utc())


async def publish_strategy(bus: Bus, topics: Topics, spec: StrategySpec) -> SetStrategy:
    """Publish ``set_strategy`` for ``spec`` on ``ai.control`` (key ``*``) and return the event.

    Retries until the broker acknowledges (cancel the caller to give up).
    """
    event = set_strategy_event(spec)
    await publish_with_retry(
        bus,
        Outgoing(
            topic=topics.control,
            value=encode(event),
            key=b"*",
            headers=((SCHEMA_HEADER, str(SCHEMA_VERSION).encode()),),
        ),
    )
    return event


async def wait_applied(state: StrategyState, event: SetStrategy, *, timeout_s: float = 5.0) -> bool:
    """Wait until ``state`` (a local router's) has applied ``event``; False after ``timeout_s`` (s)."""
    with anyio.move_on_after(timeout_s):
        while event.at is not None and (state.last_command_at is None or state.last_command_at < event.at):
            await anyio.sleep(0.01)
        return True
    return False


def configured_strategy(env: Mapping[str, str]) -> StrategySpec:
    """The configuration's strategy (preset of ``AIPIPE_ENV`` plus ``AIPIPE_CONFIG``), weights included.

    Raises:
        ValueError: for an invalid configuration, strategy name or weights.
    """
    config = load_config(Settings.from_env(env))
    spec = parse_strategy(config.strategy)
    if spec.name == "weighted" and config.weights:
        return StrategySpec("weighted", dict(config.weights))
    return spec


def strategy_status(default: StrategySpec, events: Iterable[ControlEvent]) -> StrategySpec:
    """The strategy routers run after ``events`` (``ai.control`` in order), starting from ``default``.

    The last valid ``set_strategy`` wins; ``default`` is the configuration's
    strategy when no command was ever published.
    """
    state = StrategyState(default)
    for event in events:
        if isinstance(event, SetStrategy):
            state.apply(event)
    return state.spec


def strategy_folder(default: StrategySpec) -> tuple[Callable[[ControlEvent], None], Callable[[], StrategySpec]]:
    """A listener to subscribe to an ``ai.control`` reader and a getter of the strategy it saw last.

    For ``aipipe status``: ``on_event, current = strategy_folder(spec)``; feed
    every control event to ``on_event``; ``current().describe()`` is the line.
    """
    state = StrategyState(default)

    def on_event(event: ControlEvent) -> None:
        if isinstance(event, SetStrategy):
            state.apply(event)

    def current() -> StrategySpec:
        return state.spec

    return on_event, current
