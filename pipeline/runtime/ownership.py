"""Which providers one replica owns, among the replicas of a stage that reads ``ai.control`` in a group.

``ai.control`` is keyed by provider, so every event about provider ``P`` lands on
one partition, ``partition_for(ai.control, P)``; the consumer-group member
holding that partition owns ``P`` (DESIGN A3, B1). The breaker and the health
monitor each read ``ai.control`` in their own group, so for each provider
exactly one breaker replica folds its health events and times its cool-off,
and exactly one health replica probes it; replicas never multiply probes.
During a rebalance a provider may briefly have no owner (its timers wait a
tick); it never has two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.bus.protocol import BusError, TopicPartition

log = logging.getLogger("aipipe.ownership")

Assignment = Callable[[], frozenset[TopicPartition]]


class Ownership:
    """Decides whether this replica owns a provider; unbound (no runner), it owns every provider.

    Args:
        cache_s: how long a provider's partition number is remembered (s); the
            partition count of a topic rarely changes.
    """

    def __init__(self, *, cache_s: float = 60.0) -> None:
        self._bus: Any = None
        self._topic = ""
        self._assignment: Assignment | None = None
        self._cache_s = cache_s
        self._partitions: dict[str, tuple[int, float]] = {}

    def bind(self, bus: Any, topic: str, assignment: Assignment) -> None:
        """Tie ownership to the group member reading ``topic`` on ``bus`` (``assignment`` gives its partitions)."""
        self._bus = bus
        self._topic = topic
        self._assignment = assignment

    @property
    def bound(self) -> bool:
        """Whether a group member decides ownership (else every provider is owned)."""
        return self._assignment is not None

    async def partition(self, provider: str) -> int | None:
        """The partition of ``provider``'s events on the topic, or ``None`` when the bus cannot tell partitions.

        Raises:
            BusError: when the bus cannot learn the topic's partitions now (and none is remembered).
        """
        cached = self._partitions.get(provider)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self._cache_s:
            return cached[0]
        finder = getattr(self._bus, "partition_for", None)
        if finder is None:
            return None
        try:
            found = int(await finder(self._topic, provider.encode("utf-8")))
        except BusError:
            if cached is not None:
                return cached[0]
            raise
        self._partitions[provider] = (found, now)
        return found

    async def owns(self, provider: str) -> bool:
        """Whether this replica owns ``provider`` now.

        Bound to a group member: it holds the provider's partition (a bus that
        cannot tell partitions makes any member with partitions the owner; when
        the partitions cannot be learnt now, nobody acts for the provider).
        """
        if self._assignment is None:
            return True
        held = self._assignment()
        if not held:
            return False
        try:
            partition = await self.partition(provider)
        except BusError as exc:
            log.warning("partition of %s on %s unknown (%s); not acting for it now", provider, self._topic, exc)
            return False
        if partition is None:
            return True
        return (self._topic, partition) in held
