"""breaker: fold health events into circuit state and publish each transition on ``ai.control`` (DESIGN B1).

Input ``ai.control``, read in the stage's own consumer group: since the topic
is keyed by provider, each provider's health events have exactly one owner
among the breaker replicas (``pipeline.runtime.ownership``). The owner feeds every
``health`` event to that provider's ``stages.breaker.circuit_breaker.CircuitBreaker`` and
publishes what it decides as a ``circuit_transition`` keyed by the provider;
a timer (``background``) moves ``OPEN`` circuits to ``HALF_OPEN`` after their
cool-off and re-opens a ``HALF_OPEN`` one that gets no probe result, and
publishes a ``circuit_snapshot`` (keyed ``*``) of the owned providers every
``health.snapshot_interval_s``.

Rebuilding at start or after a rebalance: the stage also listens to the
process's broadcast feed of ``ai.control`` (``on_control``) and keeps the last
published state of every provider. Until that feed has replayed the topic's
history it holds back; afterwards, a machine whose provider has a newer
published state than its own last change adopts it
(``CircuitBreaker.restore``), so a new owner continues where the previous one
left off, and health events older than the last transition are not counted
twice.

Transitions and snapshots leave through one ordered outbox, so they reach the
topic in the order they were decided; a transition decided while handling a
record is acknowledged before that record is committed (at-least-once).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec

from pipeline.bus.topics import Topics
from pipeline.runtime.config import BreakerPolicy, PipelineConfig
from pipeline.runtime.messages import CONTROL_DECODER
from pipeline.runtime.ownership import Ownership
from pipeline.runtime.runner import Emit, InvalidInput, MessageContext, decode_or_invalid
from schemas.events import CircuitSnapshot, CircuitState, CircuitTransition, ControlEvent, Health
from schemas.response import ErrorInfo
from stages.breaker.circuit_breaker import CircuitBreaker, Observation, Transition

log = logging.getLogger("aipipe.breaker")


#: How long handling waits for the broadcast feed to replay the topic's history at start (s).
READY_TIMEOUT_S = 15.0
#: A published state newer than a machine's last change by more than this (s) is adopted.
_CLOCK_SLACK_S = 0.001

Publish = Callable[[Emit], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Published:
    """The last state published for a provider: state, since when (epoch s), cool-off (s) when ``OPEN``."""

    state: CircuitState
    at_s: float
    cool_off_s: float | None = None


class _TypeOnly(msgspec.Struct):
    type: str


_TYPE_DECODER = msgspec.json.Decoder(_TypeOnly)
#: The ``type`` tags of every control event this version knows.
KNOWN_TYPES: frozenset[str] = frozenset(
    str(cls.__struct_config__.tag)
    for cls in ControlEvent.__args__  # type: ignore[attr-defined]
)


def _unknown_type(raw: bytes) -> bool:
    """Whether ``raw`` is a JSON object with a string ``type`` this version does not know."""
    try:
        return _TYPE_DECODER.decode(raw).type not in KNOWN_TYPES
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False


def to_event(transition: Transition) -> CircuitTransition:
    """The ``circuit_transition`` event of a decided transition (``at`` in UTC)."""
    return CircuitTransition(
        provider=transition.provider,
        from_state=transition.from_state,
        to_state=transition.to_state,
        reason=transition.reason,
        cool_off_s=transition.cool_off_s,
        at=datetime.fromtimestamp(transition.at_s, UTC),
    )


def observation(event: Health) -> Observation:
    """A health event as a breaker ``Observation``."""
    return Observation(
        ok=event.ok,
        at_s=event.at.timestamp(),
        source=event.source,
        error_type=event.error_type,
        status_code=event.status_code,
        retry_after_s=event.retry_after_s,
    )


class BreakerStage:
    """One breaker replica: the circuits of the providers it owns.

    Args:
        topics: topic names.
        config: provider ``breaker`` policies and ``health`` timing.
        clock: current time as Unix epoch seconds (tests pass a fake clock).
        ready: set once the broadcast feed has replayed ``ai.control`` (``None``: ready now).
        tick_s: how often the timer runs (s).
    """

    name = "breaker"

    def __init__(
        self,
        topics: Topics,
        config: PipelineConfig,
        *,
        clock: Callable[[], float] = time.time,
        ready: anyio.Event | None = None,
        tick_s: float = 0.1,
    ) -> None:
        self.topics = topics
        self.config = config
        self.clock = clock
        self.input_topic = topics.control
        self.tick_s = tick_s
        self.machines: dict[str, CircuitBreaker] = {}
        self.published: dict[str, Published] = {}
        self.ownership = Ownership()
        self._ready = ready
        self._ready_forced = False
        self._outbox: deque[Emit] = deque()
        self._lock = anyio.Lock()
        self._next_snapshot_s = clock() + config.health.snapshot_interval_s

    # --- wiring -----------------------------------------------------------------------------------

    def bind_runner(self, runner: Any) -> None:
        """Decide ownership from ``runner``'s group assignment (``runner.bus``, ``runner.assignment``)."""
        self.ownership.bind(runner.bus, self.input_topic, runner.assignment)

    def decode(self, raw: bytes) -> ControlEvent | None:
        """Decode a control event; ``None`` for a well-formed event of a type this version does not know.

        The breaker's group is the one that dead-letters unreadable ``ai.control``
        values (the health monitor's group skips them, so each is dead-lettered once).

        Raises:
            InvalidInput: when the value is not JSON, has no ``type``, or is a
                known type with invalid fields.
        """
        try:
            event: ControlEvent = decode_or_invalid(CONTROL_DECODER, raw)
        except InvalidInput:
            if _unknown_type(raw):
                return None  # a newer producer's event type: not ours to judge
            raise
        return event

    def reject(self, request_id: str, error: ErrorInfo, ctx: MessageContext) -> list[Emit]:
        """Nothing: ``ai.control`` is not keyed by request id, so there is no request to answer."""
        return []

    # --- decisions --------------------------------------------------------------------------------

    def policy(self, provider: str) -> BreakerPolicy:
        """The provider's ``breaker`` policy (defaults of DESIGN A8 for a provider not configured here)."""
        cfg = self.config.providers.get(provider)
        return cfg.breaker if cfg is not None else BreakerPolicy()

    def machine(self, provider: str, now_s: float) -> CircuitBreaker:
        """The provider's breaker, created or brought up to the last published state."""
        machine = self.machines.get(provider)
        if machine is None:
            machine = self.machines[provider] = CircuitBreaker(
                provider, self.policy(provider), probe_deadline_s=self.config.health.probe_result_deadline_s()
            )
        known = self.published.get(provider)
        if known is not None and known.at_s > machine.changed_at_s + _CLOCK_SLACK_S and known.state != machine.state:
            log.info("circuit %s: adopting published state %s", provider, known.state)
            machine.restore(known.state, known.at_s, known.cool_off_s, now_s)
        return machine

    def on_control(self, event: ControlEvent) -> None:
        """Remember published circuit states (listener of the broadcast feed; also fed the group's events)."""
        if isinstance(event, CircuitTransition):
            at_s = event.at.timestamp()
            known = self.published.get(event.provider)
            if known is None or at_s >= known.at_s:
                self.published[event.provider] = Published(event.to_state, at_s, event.cool_off_s)
        elif isinstance(event, CircuitSnapshot):
            at_s = event.at.timestamp()
            for provider, state in event.states.items():
                known = self.published.get(provider)
                if known is None or (at_s > known.at_s and state != known.state):
                    self.published[provider] = Published(state, at_s)

    def observe(self, event: Health) -> Transition | None:
        """Fold one health event into its provider's circuit; the transition to publish, if any."""
        now_s = self.clock()
        transition = self.machine(event.provider, now_s).observe(observation(event), now_s)
        if transition is not None:
            self._queue(transition)
        return transition

    async def tick(self) -> list[Transition]:
        """Let time pass for every owned provider; the transitions decided (queued for publishing)."""
        now_s = self.clock()
        decided: list[Transition] = []
        for provider in self._providers():
            if not await self.ownership.owns(provider):
                continue
            transition = self.machine(provider, now_s).tick(now_s)
            if transition is not None:
                self._queue(transition)
                decided.append(transition)
        return decided

    async def snapshot(self) -> CircuitSnapshot | None:
        """The states of the owned providers (``None`` when this replica owns none), queued for publishing."""
        now_s = self.clock()
        states: dict[str, CircuitState] = {}
        for provider in self._providers():
            if await self.ownership.owns(provider):
                states[provider] = self.machine(provider, now_s).state
        if not states:
            return None
        event = CircuitSnapshot(states=states, at=datetime.fromtimestamp(now_s, UTC))
        self._outbox.append(Emit(self.topics.control, "*", event))
        return event

    def _providers(self) -> list[str]:
        return sorted(set(self.config.enabled_providers()) | set(self.machines) | set(self.published))

    def _queue(self, transition: Transition) -> None:
        event = to_event(transition)
        self.published[transition.provider] = Published(transition.to_state, transition.at_s, transition.cool_off_s)
        log.info(
            "circuit %s: %s -> %s (%s)",
            transition.provider,
            transition.from_state,
            transition.to_state,
            transition.reason,
        )
        self._outbox.append(Emit(self.topics.control, transition.provider, event))

    # --- runner hooks -----------------------------------------------------------------------------

    async def handle(self, value: Any, ctx: MessageContext) -> list[Emit]:
        """Fold a health event (publishing any transition at once); remember published circuit states."""
        if not self.is_ready():
            await self._wait_ready()
        if isinstance(value, Health):
            if self.observe(value) is not None:
                await self._flush(ctx.emit_now)
        else:
            self.on_control(value)
        return []

    async def background(self, publish: Publish) -> None:
        """The timer: cool-offs, stuck ``HALF_OPEN`` circuits, periodic snapshots; returns when cancelled."""
        if not self.is_ready():
            await self._wait_ready()
        while True:
            await anyio.sleep(self.tick_s)
            try:
                await self.tick()
                if self.clock() >= self._next_snapshot_s:
                    self._next_snapshot_s = self.clock() + self.config.health.snapshot_interval_s
                    await self.snapshot()
                await self._flush(publish)
            except Exception:
                log.exception("breaker timer failed; going on")

    def is_ready(self) -> bool:
        """Whether the broadcast feed has replayed ``ai.control`` (or the wait for it gave up)."""
        return self._ready is None or self._ready.is_set() or self._ready_forced

    async def _wait_ready(self) -> None:
        ready = self._ready
        if ready is None:
            return
        with anyio.move_on_after(READY_TIMEOUT_S):
            await ready.wait()
        if not ready.is_set() and not self._ready_forced:
            log.warning("breaker: ai.control history not replayed after %.0fs; deciding without it", READY_TIMEOUT_S)
        self._ready_forced = True

    async def _flush(self, publish: Publish) -> None:
        """Publish the outbox in order; returns once everything queued before the call is acknowledged."""
        async with self._lock:
            while self._outbox:
                await publish(self._outbox[0])
                self._outbox.popleft()
