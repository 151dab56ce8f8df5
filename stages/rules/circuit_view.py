"""The circuit view every replica keeps: provider -> circuit state, folded from ``ai.control``.

Circuit state changes only through ``circuit_transition`` events (and the
periodic ``circuit_snapshot``) published by the breaker stage, so every
replica of the router and executor that reads ``ai.control`` agrees (DESIGN
A3). A provider never mentioned is ``CLOSED``.
"""

from __future__ import annotations

from datetime import datetime

from schemas.events import CircuitSnapshot, CircuitState, CircuitTransition, ControlEvent


class CircuitView:
    """Provider -> circuit state, from transition and snapshot events (latest ``at`` wins)."""

    def __init__(self) -> None:
        self.states: dict[str, CircuitState] = {}
        self._as_of: dict[str, datetime] = {}

    def apply(self, event: ControlEvent) -> None:
        """Fold one control event; events other than transitions and snapshots are ignored."""
        if isinstance(event, CircuitTransition):
            self._set(event.provider, event.to_state, event.at)
        elif isinstance(event, CircuitSnapshot):
            for provider, state in event.states.items():
                self._set(provider, state, event.at)

    def _set(self, provider: str, state: CircuitState, at: datetime) -> None:
        known = self._as_of.get(provider)
        if known is not None and at < known:
            return
        self.states[provider] = state
        self._as_of[provider] = at

    def state(self, provider: str) -> CircuitState:
        """The provider's circuit state (``CLOSED`` when never reported)."""
        return self.states.get(provider, "CLOSED")

    def allows_traffic(self, provider: str) -> bool:
        """Whether user traffic may go to ``provider``: only a ``CLOSED`` circuit takes it.

        In ``HALF_OPEN`` only the health monitor's probes test the provider (DESIGN B1).
        """
        return self.state(provider) == "CLOSED"
