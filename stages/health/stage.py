"""health: active probes of the providers, published as ``health`` events with ``source: probe`` (DESIGN B1).

A probe is the cheapest request a provider accepts: one user message
(``"ping"``), ``max_tokens`` 1, temperature 0, to ``config.probe_model(P)``
(``health.probe_models``, else the provider's first model), bounded by
``health.probe_timeout_ms``. A probe that never finishes is published as a
``timeout`` failure at that limit. A probe refused for its own parameters
(``invalid_request``, ``model_not_found``, ``context_length_exceeded``,
``content_filter``) is published as what it is; it is not a provider failure,
so neither the breaker nor ``HealthStatus`` count it (a warning names the
setting to fix).

What is probed:

* every enabled provider, every ``health.interval_s`` (0: never), except one
  being probed already or ``HALF_OPEN``;
* every ``HALF_OPEN`` provider: at once when it enters ``HALF_OPEN``, then every
  ``health.half_open_interval_s``, one probe at a time, until the breaker
  decides. Per ``HALF_OPEN`` period it sends ``breaker.success_threshold``
  successful probes and then waits for the breaker's verdict (probing again
  only if none comes), so the breaker sees exactly the probes it needs.

Ownership (one prober per provider among replicas): the stage reads
``ai.control`` in its own consumer group (``ai.health``) and probes only the
providers whose ``ai.control`` partition it holds (``pipeline.runtime.ownership``), the
partition every event about that provider is keyed to. Circuit states come
from the process's broadcast feed (``on_control``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import anyio
import httpx
import msgspec

from pipeline.bus.topics import Topics
from pipeline.errors import AIProviderError
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.messages import CONTROL_DECODER
from pipeline.runtime.ownership import Ownership
from pipeline.runtime.runner import Emit, MessageContext, now_utc
from schemas.events import CircuitSnapshot, CircuitTransition, ControlEvent, Health
from schemas.request import Message
from schemas.response import ErrorInfo
from stages.providers import ProviderAdapter, ProviderCall
from stages.rules.circuit_view import CircuitView

log = logging.getLogger("aipipe.health_stage")

#: Probe errors caused by the probe's own parameters: not a provider failure.
PROBE_PARAMETER_ERRORS: frozenset[str] = frozenset(
    {"invalid_request", "model_not_found", "context_length_exceeded", "content_filter"}
)
#: Extra time (s) past ``probe_timeout_ms`` before an unfinished probe is abandoned as a timeout.
PROBE_ABANDON_SLACK_S = 1.0

Publish = Callable[[Emit], Awaitable[None]]


def probe_call(model: str) -> ProviderCall:
    """The probe request: one short user message, 1 output token, temperature 0."""
    return ProviderCall(model=model, messages=[Message(role="user", content="ping")], max_tokens=1, temperature=0.0)


class HealthStage:
    """One health-monitor replica: probes the providers it owns.

    Args:
        topics: topic names.
        config: enabled providers, probe models, ``health`` timing, ``breaker.success_threshold``.
        adapters: provider adapters (one HTTP call per probe).
        client: the shared HTTP client.
        tick_s: how often ``HALF_OPEN`` circuits are looked for when no event wakes the stage (s).
    """

    name = "health"

    def __init__(
        self,
        topics: Topics,
        config: PipelineConfig,
        adapters: Mapping[str, ProviderAdapter],
        client: httpx.AsyncClient,
        *,
        tick_s: float = 0.5,
    ) -> None:
        self.topics = topics
        self.config = config
        self.adapters = adapters
        self.client = client
        self.tick_s = tick_s
        self.input_topic = topics.control
        self.view = CircuitView()
        self.ownership = Ownership()
        self.probes_sent = 0
        self._episode: dict[str, datetime] = {}
        self._changed = anyio.Event()
        self._busy: set[str] = set()

    # --- wiring -----------------------------------------------------------------------------------

    def bind_runner(self, runner: Any) -> None:
        """Decide ownership from ``runner``'s group assignment (``runner.bus``, ``runner.assignment``)."""
        self.ownership.bind(runner.bus, self.input_topic, runner.assignment)

    def decode(self, raw: bytes) -> ControlEvent | None:
        """Decode a control event; ``None`` when it cannot be (the breaker's group dead-letters those, once)."""
        try:
            event: ControlEvent = CONTROL_DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return event

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Nothing to publish: the group membership decides ownership; states come from the broadcast feed."""
        return []

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """Nothing: ``ai.control`` is not keyed by request id."""
        return []

    def on_control(self, event: ControlEvent) -> None:
        """Follow circuit states (listener of the broadcast feed); wakes the ``HALF_OPEN`` prober."""
        if not isinstance(event, CircuitTransition | CircuitSnapshot):
            return
        self.view.apply(event)
        if isinstance(event, CircuitTransition):
            known = self._episode.get(event.provider)
            if known is None or event.at >= known:
                self._episode[event.provider] = event.at
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # --- probing ----------------------------------------------------------------------------------

    def providers(self) -> list[str]:
        """The enabled providers this process can call."""
        return [p for p in self.config.enabled_providers() if p in self.adapters]

    async def probe(self, provider: str, publish: Publish) -> Health | None:
        """Probe ``provider`` once and publish the ``health`` event; ``None`` when it has no probe model.

        Raises:
            BusError: never; publishing retries until acknowledged (cancel to give up).
        """
        model = self.config.probe_model(provider)
        adapter = self.adapters.get(provider)
        if model is None or adapter is None:
            log.warning(
                "cannot probe %s: no probe model (set health.probe_models.%s) or no endpoint", provider, provider
            )
            return None
        timeout_s = self.config.health.probe_timeout_ms / 1000
        ok = False
        error_type: str | None = None
        status_code: int | None = None
        retry_after_s: float | None = None
        started = time.perf_counter()
        with anyio.move_on_after(timeout_s + PROBE_ABANDON_SLACK_S) as scope:
            try:
                result = await adapter.complete(self.client, probe_call(model), timeout_s)
            except AIProviderError as exc:
                error_type, status_code, retry_after_s = exc.error_type, exc.status_code, exc.retry_after_s
            except Exception:
                log.exception("probe of %s failed in aipipe itself (not published)", provider)
                return None
            else:
                ok, status_code = True, result.status_code
        if scope.cancelled_caught:
            error_type, status_code = "timeout", None
        latency_ms = (time.perf_counter() - started) * 1000
        if error_type in PROBE_PARAMETER_ERRORS:
            log.warning(
                "probe of %s (%s) was refused for its own parameters (%s): not a provider failure; "
                "set health.probe_models.%s to a model it serves",
                provider,
                model,
                error_type,
                provider,
            )
        event = Health(
            provider=provider,
            model=model,
            ok=ok,
            error_type=error_type,
            status_code=status_code,
            latency_ms=round(latency_ms, 3),
            source="probe",
            retry_after_s=retry_after_s,
            at=now_utc(),
        )
        self.probes_sent += 1
        await publish(Emit(self.topics.control, provider, event))
        return event

    def _in_episode(self, provider: str, episode: datetime | None) -> bool:
        return self.view.state(provider) == "HALF_OPEN" and self._episode.get(provider) == episode

    async def _until_episode_ends(self, provider: str, episode: datetime | None, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` (s) for the ``HALF_OPEN`` period to end; whether it did."""
        with anyio.move_on_after(timeout_s):
            while self._in_episode(provider, episode):
                await self._changed.wait()
        return not self._in_episode(provider, episode)

    async def _probe_half_open(self, provider: str, publish: Publish) -> None:
        """Probe a ``HALF_OPEN`` provider until the breaker decides (see the module docstring)."""
        health = self.config.health
        cfg = self.config.providers.get(provider)
        needed = cfg.breaker.success_threshold if cfg is not None else 2
        stall_s = 2 * health.half_open_interval_s + 1.0
        episode = self._episode.get(provider)
        oks = 0
        try:
            while self._in_episode(provider, episode):
                if oks >= needed:
                    if not await self._until_episode_ends(provider, episode, stall_s):
                        oks = 0  # no verdict: the breaker may have lost count; probe again
                    continue
                event = await self.probe(provider, publish)
                if event is not None and event.ok:
                    oks += 1
                    if oks >= needed:
                        continue
                elif event is not None and event.error_type not in PROBE_PARAMETER_ERRORS:
                    oks = 0  # a failed probe: the breaker re-opens the circuit; wait for it
                    await self._until_episode_ends(provider, episode, stall_s)
                    continue
                await self._until_episode_ends(provider, episode, health.half_open_interval_s)
        finally:
            self._busy.discard(provider)

    async def _probe_once(self, provider: str, publish: Publish) -> None:
        try:
            await self.probe(provider, publish)
        finally:
            self._busy.discard(provider)

    async def _owned(self, provider: str) -> bool:
        return provider not in self._busy and await self.ownership.owns(provider)

    async def background(self, publish: Publish) -> None:
        """Run the ``HALF_OPEN`` prober and the periodic probes; returns when cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._periodic, publish, tg)
            while True:
                try:
                    for provider in self.providers():
                        if self.view.state(provider) == "HALF_OPEN" and await self._owned(provider):
                            self._busy.add(provider)
                            tg.start_soon(self._probe_half_open, provider, publish)
                except Exception:
                    log.exception("health: half-open scan failed; going on")
                with anyio.move_on_after(self.tick_s):
                    await self._changed.wait()

    async def _periodic(self, publish: Publish, tg: anyio.abc.TaskGroup) -> None:
        interval_s = self.config.health.interval_s
        if interval_s <= 0:
            return
        while True:
            await anyio.sleep(interval_s)
            try:
                for provider in self.providers():
                    if self.view.state(provider) != "HALF_OPEN" and await self._owned(provider):
                        self._busy.add(provider)
                        tg.start_soon(self._probe_once, provider, publish)
            except Exception:
                log.exception("health: periodic probe round failed; going on")
