"""Provider budgets, held per attempt by the executor (DESIGN A3, A8): a provider with no room is skipped.

Before calling a deployment whose budget scope has a limit, the executor
reserves the call's worst case (the prompt's real token count at the dearer
of the input and cache-write prices, plus ``max_tokens`` at the output price;
a model without a price at the deployment's ``cost_per_token``) on that scope.
The reservation is atomic: one ``BudgetLedger`` in the process (no await
between check and hold), or one Lua script in Redis shared by every executor
and gate (``pipeline.stores.budget_store``). An answer settles it at the
cost of the usage the provider reported; a failure releases it. So a
provider's recorded spend exceeds its limit by at most one call's
estimation error (usage beyond the worst case), however many requests are in
flight and however many executors share the store.

The hold and the settlement are keyed ``<request id>@<deployment>``; the
budget gate settles the cost event of an answer under the same key, so the
provider's spend is counted once whoever sees it first (and is rebuilt from
``ai.costs`` after a restart). An executor that runs without the gate in its
process folds what the gate would: limits from ``set_budget`` on
``ai.control`` (``on_control``) and provider spend from ``ai.costs``
(``on_cost``, applied by ``background``). Several executors, or an executor
apart from the gate, share one budget only through Redis
(``AIPIPE_REDIS_URL``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import anyio

from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.runner import Emit, now_utc
from pipeline.stores.budget_store import BudgetStore, BudgetStoreError
from schemas.events import ControlEvent, CostEvent, SetBudget
from schemas.response import Usage
from stages.rules.ledger import apply_set_budget, is_provider_scope, provider_hold_id, provider_shares, zone
from stages.rules.pricing import PriceTable, worst_case_cost

log = logging.getLogger("aipipe.executor")

#: A hold outlives the request's deadline by this much, so a late answer still finds it (s).
HOLD_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class Hold:
    """A held worst case on one provider's scope (``hold_id``, USD), or a refusal (``reason``).

    ``held`` is false for a refusal and for a provider whose scope has no limit (nothing to settle).
    """

    provider: str
    hold_id: str
    amount_usd: Decimal = Decimal(0)
    held: bool = False
    reason: str | None = None
    unavailable: bool = False

    @property
    def refused(self) -> bool:
        """Whether the provider must be skipped (no room, or its store is down and the scope fails closed)."""
        return self.reason is not None


class ProviderBudgets:
    """Reserve, settle and release attempts against provider budget scopes.

    Args:
        store: where spend and reservations live (its ledger holds the limits folded from ``ai.control``).
        prices: the price table, as seen by the configuration's deployments.
        config: deployments (``cost_per_token``) and ``budget.fail_mode``.
        ready: events that say the limits and spend are known (the feeds caught up); holds wait for them.
    """

    def __init__(
        self,
        store: BudgetStore,
        prices: PriceTable,
        config: PipelineConfig,
        *,
        ready: tuple[anyio.Event, ...] = (),
        sync_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.prices = prices
        self.config = config
        self._ready = ready
        self._sync_timeout_s = sync_timeout_s
        self.store.ledger.tz = zone(config.budget.timezone)
        self._costs: deque[CostEvent] = deque()
        self._wake = anyio.Event()

    # --- folding, for an executor without the budget gate in its process --------------------

    def on_control(self, event: ControlEvent) -> None:
        """Fold a provider scope's ``set_budget`` into the limits (DESIGN A6 merge rules)."""
        if isinstance(event, SetBudget) and is_provider_scope(event.scope):
            apply_set_budget(self.store.ledger, event, now_utc())

    def on_cost(self, event: CostEvent) -> None:
        """Queue a cost event: its provider's spend, under the same key the executor settles."""
        if not event.cached and event.cost_usd > 0:
            self._costs.append(event)
            self._wake.set()

    async def background(self, publish: Callable[[Emit], Awaitable[None]]) -> None:
        """Apply queued cost events to the store, in order, retrying while the store is down."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._costs:
                event = self._costs[0]
                try:
                    for provider, share in provider_shares(event):
                        await self.store.settle(
                            provider_hold_id(event.id, provider), (provider,), share, event.at, now_utc()
                        )
                except BudgetStoreError as exc:
                    log.warning("provider spend of %s not applied yet (%s); retrying", event.id, exc)
                    await anyio.sleep(1.0)
                    continue
                self._costs.popleft()

    def limited(self, provider: str) -> bool:
        """Whether ``provider``'s budget scope has a limit now."""
        limits = self.store.ledger.limits.get(provider)
        return limits is not None and limits.any()

    def worst_case_usd(self, provider: str, model: str, prompt_tokens: int, max_tokens: int) -> Decimal:
        """The most one call can cost (USD): ``stages.rules.pricing.worst_case_cost``, else ``cost_per_token``."""
        price = self.prices.lookup(provider, model)
        if price is not None:
            return worst_case_cost(price, prompt_tokens, max_tokens)
        cfg = self.config.providers.get(provider)
        rate = Decimal(str(cfg.cost_per_token)) if cfg is not None else Decimal(0)
        return rate * (prompt_tokens + max_tokens)

    async def _wait_ready(self) -> None:
        for event in self._ready:
            if event.is_set():
                continue
            with anyio.move_on_after(self._sync_timeout_s):
                await event.wait()

    async def hold(
        self, request_id: str, provider: str, model: str, prompt_tokens: int, max_tokens: int, deadline_at_ms: int
    ) -> Hold:
        """Reserve a call's worst case on ``provider``'s scope, or say why there is no room.

        Returns:
            A held ``Hold`` to settle or release; an unheld one when the scope
            has no limit (or the store is down and ``budget.fail_mode`` is
            ``open``); a refused one (with ``reason``) when the provider must
            be skipped.
        """
        hold_id = provider_hold_id(request_id, provider)
        if not self.limited(provider):
            return Hold(provider, hold_id)
        await self._wait_ready()
        amount = self.worst_case_usd(provider, model, prompt_tokens, max_tokens)
        now = now_utc()
        expires = datetime.fromtimestamp(deadline_at_ms / 1000, now.tzinfo) + timedelta(seconds=HOLD_GRACE_S)
        try:
            verdict = await self.store.reserve(hold_id, (provider,), amount, now, max(expires, now))
        except BudgetStoreError as exc:
            if self.config.budget.fail_mode == "open":
                log.warning(
                    "request %s: %s called unreserved while the budget store is down (%s)", request_id, provider, exc
                )
                return Hold(provider, hold_id)
            return Hold(
                provider,
                hold_id,
                reason=f"budget store unavailable; the {provider} scope fails closed until it is back",
                unavailable=True,
            )
        if not verdict.admitted:
            return Hold(
                provider,
                hold_id,
                reason=(
                    f"budget of {provider} has no room: {verdict.window} limit ${verdict.limit_usd} "
                    f"(spent ${verdict.spent_usd:.6f}, held ${verdict.reserved_usd:.6f}, this call up to ${amount:.6f})"
                ),
            )
        return Hold(provider, hold_id, amount, held=True)

    async def settle(self, hold: Hold, model: str, usage: Usage) -> None:
        """Count an answered call at the cost of its reported usage and drop the hold (once per key)."""
        if not hold.held:
            return
        cfg = self.config.providers.get(hold.provider)
        default = Decimal(str(cfg.cost_per_token)) if cfg is not None else None
        cost = self.prices.cost(hold.provider, model, usage, default_cost_per_token=default).cost_usd
        now = now_utc()
        try:
            await self.store.settle(hold.hold_id, (hold.provider,), cost, now, now)
        except BudgetStoreError as exc:  # the gate settles the same key from ai.costs once the store is back
            log.warning(
                "%s: settling %s failed (%s); the budget gate settles it from ai.costs",
                hold.provider,
                hold.hold_id,
                exc,
            )

    async def release(self, hold: Hold) -> None:
        """Drop a failed or abandoned call's hold without spend."""
        if not hold.held:
            return
        try:
            await self.store.release(hold.hold_id)
        except BudgetStoreError as exc:  # it expires at the request's deadline
            log.warning("%s: releasing %s failed (%s); it expires at the deadline", hold.provider, hold.hold_id, exc)
