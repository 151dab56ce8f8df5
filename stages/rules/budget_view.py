"""The provider-budget view a router replica keeps, folded from ``budget_status`` events on ``ai.control``.

The budget gate publishes each limited provider scope's windows (limit,
spent, reserved, resets_at) on change and periodically; every router replica
reads ``ai.control`` as a broadcast and drops a provider from a request's
candidates while one of its windows is spent (spent + reserved >= limit,
until that window resets). A provider never mentioned has no budget.
"""

from __future__ import annotations

from datetime import datetime

from pipeline.runtime.runner import now_utc
from schemas.events import BudgetStatus, BudgetWindow, ControlEvent
from stages.rules.ledger import is_provider_scope


class ProviderBudgetView:
    """Provider -> its latest budget windows (latest ``at`` wins)."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[str, BudgetWindow]] = {}
        self._as_of: dict[str, datetime] = {}

    def apply(self, event: ControlEvent) -> None:
        """Fold one control event; only ``budget_status`` of provider scopes matters."""
        if not isinstance(event, BudgetStatus) or not is_provider_scope(event.scope):
            return
        known = self._as_of.get(event.scope)
        if known is not None and event.at < known:
            return
        self.windows[event.scope] = event.windows
        self._as_of[event.scope] = event.at

    def exhausted(self, provider: str, now: datetime | None = None) -> list[str]:
        """The windows (``daily``...) in which ``provider``'s budget is spent at ``now`` (default: the clock)."""
        at = now or now_utc()
        out: list[str] = []
        for name, window in self.windows.get(provider, {}).items():
            if window.limit_usd is None or window.resets_at <= at:
                continue
            if window.spent_usd + window.reserved_usd >= window.limit_usd:
                out.append(name)
        return out

    def allows(self, provider: str, now: datetime | None = None) -> bool:
        """Whether ``provider`` may take more traffic: no window of its budget is spent."""
        return not self.exhausted(provider, now)
