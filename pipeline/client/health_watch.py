"""``monitor_provider_health``: log each provider's health on an interval (the seed's helper)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from pipeline.client.manager import AIProviderManager

log = logging.getLogger("aipipe.health")


async def monitor_provider_health(manager: AIProviderManager, interval_s: float) -> Callable[[], None]:
    """Start a background task that reads ``manager.get_health_status()`` every ``interval_s`` seconds.

    Logs one line per provider and a warning when a provider's health changes.
    Returns a callable that stops the task. The task runs on the manager's
    own task group, so it also stops when the manager shuts down.

    Raises:
        ValueError: when ``interval_s`` is not positive.
    """
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    stop = anyio.Event()
    previous: dict[str, bool] = {}

    async def loop() -> None:
        while not stop.is_set():
            try:
                statuses = await manager.get_health_status()
            except NotImplementedError as exc:
                log.warning("health monitor: %s", exc)
                return
            for status in statuses:
                name = getattr(status, "provider", "?")
                healthy = bool(getattr(status, "is_healthy", False))
                log.info("provider %s healthy=%s", name, healthy)
                if name in previous and previous[name] != healthy:
                    log.warning("provider %s health changed: %s -> %s", name, previous[name], healthy)
                previous[name] = healthy
            with anyio.move_on_after(interval_s):
                await stop.wait()

    manager.spawn(loop)
    return stop.set
