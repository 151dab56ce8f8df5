"""The demo's circuit-breaker moment: a provider's circuit opens, is skipped, and closes after probes.

``DEMO_CIRCUIT_CONFIG`` gives Anthropic small breaker settings (opens after 2
consecutive failures, 1 s cool-off, 2 probes 0.3 s apart to close) and 2
attempts per request; ``circuit_moment`` then

1. makes the emulator answer Anthropic's next 2 calls with 529 (overloaded):
   the first request (allow-list ``anthropic, openai``) fails twice on
   Anthropic, is answered by OpenAI, and the circuit opens;
2. sends a second request while it is ``OPEN``: Anthropic is skipped, not called;
3. waits while the breaker moves it to ``HALF_OPEN`` and the health monitor's
   probes close it, then sends a third request, answered by Anthropic again;

and returns the transitions it saw on ``ai.control`` with their times.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import msgspec

from pipeline.assembly.build import Pipeline
from pipeline.emulator import EmulatorServer
from schemas.events import CircuitTransition
from schemas.request import AIRequest, CacheOptions
from schemas.response import AIResponse

#: The provider whose circuit the demo opens and closes.
DEMO_CIRCUIT_PROVIDER: Final = "anthropic"

#: Configuration layered on the demo's preset (``config_from_mapping``).
DEMO_CIRCUIT_CONFIG: dict[str, Any] = {
    "providers": {
        DEMO_CIRCUIT_PROVIDER: {
            "retry": {"max_attempts": 2, "base_delay_ms": 50, "max_delay_ms": 1000},
            "breaker": {"failure_threshold": 2, "cool_off_s": 1, "max_cool_off_s": 4, "success_threshold": 2},
        }
    },
    "health": {"half_open_interval_s": 0.3, "probe_timeout_ms": 3000},
}

#: Longest wait for the circuit to open, and then to close (s).
WAIT_S = 15.0


@dataclass
class CircuitMoment:
    """What the moment showed: transitions as ``(seconds since start, transition)`` and the three answers."""

    provider: str
    transitions: list[tuple[float, CircuitTransition]] = field(default_factory=list)
    responses: list[AIResponse] = field(default_factory=list)

    @property
    def shown(self) -> bool:
        """Opened, skipped while open, half-opened and closed, and answered again by the provider."""
        path = [(t.from_state, t.to_state) for _, t in self.transitions]
        if path != [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")] or len(self.responses) != 3:
            return False
        tripped, skipped, back = self.responses
        return (
            tripped.status == "ok"
            and skipped.status == "ok"
            and self.provider not in {a.provider for a in skipped.attempts if a.outcome != "skipped"}
            and back.provider == self.provider
        )

    def lines(self) -> list[str]:
        """The timeline as text, one line per transition."""
        out = []
        for offset, t in self.transitions:
            cool = f"; cool-off {t.cool_off_s:g}s" if t.cool_off_s is not None else ""
            out.append(f"  +{offset:5.2f}s  {t.provider}: {t.from_state} → {t.to_state} ({t.reason}{cool})")
        return out


async def circuit_moment(
    pipeline: Pipeline,
    emulator: EmulatorServer,
    ask: Callable[[str, AIRequest], Awaitable[AIResponse]],
    templates: Sequence[AIRequest],
) -> CircuitMoment:
    """Open and close ``DEMO_CIRCUIT_PROVIDER``'s circuit with three requests built from ``templates``.

    ``ask(phase, request)`` sends one request and returns its response (and
    records it for the demo's table).

    Raises:
        ValueError: when fewer than 3 templates are given.
    """
    if len(templates) < 3:
        raise ValueError("circuit_moment needs 3 request templates")
    provider = DEMO_CIRCUIT_PROVIDER
    moment = CircuitMoment(provider)
    started = time.monotonic()
    changed = anyio.Event()

    def on_control(event: Any) -> None:
        nonlocal changed
        if isinstance(event, CircuitTransition) and event.provider == provider:
            moment.transitions.append((time.monotonic() - started, event))
            changed.set()
            changed = anyio.Event()

    async def until_state(state: str) -> None:
        with anyio.move_on_after(WAIT_S):
            while pipeline.circuits.state(provider) != state:
                await changed.wait()

    pipeline.control_feed.subscribe(on_control)
    requests = [
        msgspec.structs.replace(
            r, id=f"{r.id}-cb", providers=[provider, "openai"], cache=CacheOptions(bypass=True), model="chat-small"
        )
        for r in templates[:3]
    ]
    emulator.faults.schedule(DEMO_CIRCUIT_PROVIDER, {"status": 529}, {"status": 529})
    moment.responses.append(await ask("circuit", requests[0]))
    await until_state("OPEN")
    moment.responses.append(await ask("circuit", requests[1]))
    await until_state("CLOSED")
    moment.responses.append(await ask("circuit", requests[2]))
    return moment
