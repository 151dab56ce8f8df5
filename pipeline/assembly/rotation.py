"""Rotation of the embedded broker (DESIGN A11): a fresh broker before the old one slows down.

The embedded broker keeps every record in memory, cannot delete any, and
its fetches crawl once a topic holds about 100,000 records
(``EMBEDDED-BROKER.md``). ``BrokerRotation`` watches the records this
process has written per topic (the request path writes one record per
request on each stage topic) and the broker's resident memory; when either
passes its limit (``broker.rotate_records``, ``broker.max_memory_mb``) it:

1. pauses intake (the cache stage stops fetching ``requests``);
2. waits until the request path is idle (nothing in flight, nothing fetched
   for a moment; at most ``DRAIN_LIMIT_S``) and the archive has written
   every record it read;
3. restarts the broker on the same address (clients reconnect by
   themselves, as after any broker restart), empty;
4. restores the compact state into it (``pipeline.assembly.restore``):
   commands, circuits, the open windows' spend, unanswered requests;
5. tells the stages the broker changed and resumes intake.

Requests published during the pause stay in ``requests`` and are archived;
those the archive had not read when the old broker stopped are restored as
unanswered. This process's budget state already holds the spend the restore
re-publishes as roll-ups, so its stages skip those (``Pipeline.rotated``).
Only the process that started the embedded broker rotates it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio

from pipeline.assembly.build import Pipeline
from pipeline.assembly.restore import restore
from pipeline.bus.discovery import write_runtime_file
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.bus.kafka import KafkaBus
from pipeline.runtime.config import BrokerConfig, PipelineConfig
from pipeline.runtime.settings import Settings

log = logging.getLogger("aipipe.rotation")

#: Longest wait (s) for the request path to finish its in-flight work before the broker restarts anyway.
DRAIN_LIMIT_S = 15.0


@dataclass
class RotationStats:
    """One rotation: why, how long intake was paused (s), and what the restore published."""

    reason: str
    paused_s: float
    restored_requests: int
    restored_records: int


class BrokerRotation:
    """Moves ``pipeline`` (this process's stages) to a fresh embedded broker when the old one grows too large.

    Args:
        broker: the embedded broker this process started.
        bus: the process's Kafka bus (its published-record counts are the trigger).
        pipeline: the stages of this process.
        settings: runtime settings (the runtime file, the archive directory).
        config: the configuration (``broker``, ``archive``, ``budget.timezone``).
    """

    def __init__(
        self, broker: EmbeddedBroker, bus: KafkaBus, pipeline: Pipeline, settings: Settings, config: PipelineConfig
    ) -> None:
        self.broker = broker
        self.bus = bus
        self.pipeline = pipeline
        self.settings = settings
        self.config = config
        self.limits: BrokerConfig = config.broker
        self.rotations: list[RotationStats] = []
        #: Records the requests a restore carried over will add (they go through every stage again).
        self._carried = 0

    def reason(self) -> str | None:
        """Why the broker should be rotated now, or ``None``."""
        if self.limits.rotate_records:
            counts = self.bus.published_counts()
            if counts:
                topic, count = max(counts.items(), key=lambda kv: kv[1])
                if count >= self.limits.rotate_records + self._carried:
                    return f"{topic} holds {count} records (broker.rotate_records = {self.limits.rotate_records})"
        if self.limits.max_memory_mb:
            memory = self.broker.memory_mb()
            if memory is not None and memory >= self.limits.max_memory_mb:
                return f"the broker uses {memory:.0f} MiB (broker.max_memory_mb = {self.limits.max_memory_mb})"
        return None

    async def run(self) -> None:
        """Check every ``broker.check_interval_s`` and rotate when needed; returns when cancelled."""
        while True:
            await anyio.sleep(self.limits.check_interval_s)
            why = self.reason()
            if why is not None and not self.pipeline.stopping:
                await self.rotate(why)

    async def rotate(self, why: str) -> RotationStats:
        """Move to a fresh broker now (see the module docstring).

        Raises:
            BrokerError: when the new broker cannot be started.
        """
        log.info("rotating the embedded broker: %s", why)
        started = time.monotonic()
        self.pipeline.pause_intake()
        try:
            drained, path_s, archive_s = await self.pipeline.drain_for_rotation(DRAIN_LIMIT_S)
            if not drained:
                log.warning(
                    "rotation: still busy after %.0f s (%s); rotating anyway (what is in flight is restored "
                    "as unanswered, and a late answer is deduplicated by the cost-recorder)",
                    DRAIN_LIMIT_S,
                    self.pipeline.busy_runners(),
                )
            if not await self.pipeline.park(DRAIN_LIMIT_S):  # the last fetches from the old broker are handled
                log.warning(
                    "rotation: a stage did not park within %.0f s (%s)", DRAIN_LIMIT_S, self.pipeline.busy_runners()
                )
            stopping = time.monotonic()
            await self.broker.stop()
            await self.broker.start()
            await self.pipeline.rotated()
            plan = await restore(self.bus, self.pipeline.archive_store(), self.settings.topics, self.config)
            self.bus.reset_counts()  # what the restore wrote is not growth
            self._carried = plan.pending_requests
            write_runtime_file({"AIPIPE_HOME": str(self.settings.home)}, self.broker.address, self.broker.instance_id)
        finally:
            self.pipeline.resume_intake()
        stats = RotationStats(
            reason=why,
            paused_s=time.monotonic() - started,
            restored_requests=plan.pending_requests,
            restored_records=len(plan.messages),
        )
        self.rotations.append(stats)
        log.info(
            "rotated the embedded broker in %.2f s (drain %.2f s, archive %.2f s, new broker and restore %.2f s; "
            "now %s): %d unanswered request(s) carried over",
            stats.paused_s,
            path_s,
            archive_s,
            time.monotonic() - stopping,
            self.broker.instance_id,
            stats.restored_requests,
        )
        return stats
