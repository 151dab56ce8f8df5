"""Assembles and runs the stages of one process over a bus (the runner owns the plumbing).

``Pipeline`` builds the shared resources a process needs (HTTP client,
provider adapters, price table, cache store, budget ledger, control and cost
feeds), one ``StageRunner`` per requested stage, and runs them in one task
group until stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
import httpx

from pipeline.bus.protocol import Bus
from pipeline.runtime import telemetry
from pipeline.runtime.config import PipelineConfig
from pipeline.runtime.endpoints import Resolved
from pipeline.runtime.feeds import BroadcastFeed
from pipeline.runtime.http_client import ProviderHttpClient
from pipeline.runtime.messages import CONTROL_DECODER, COST_DECODER
from pipeline.runtime.runner import Emit, Stage, StageRunner
from pipeline.runtime.settings import Settings
from pipeline.stores.archive_store import FileArchive
from pipeline.stores.blob_store import BlobStore, open_blob_store
from pipeline.stores.budget_store import BudgetStore, open_budget_store
from pipeline.stores.cache_store import build_cache_store
from pipeline.stores.rate_limit_store import open_rate_limiter
from schemas.events import CostEvent
from stages.archive.stage import ArchiveStage
from stages.breaker.stage import BreakerStage
from stages.budget.stage import BudgetGateStage
from stages.cache.stage import CacheLookupStage
from stages.executor.budgets import ProviderBudgets
from stages.executor.stage import ExecutorStage
from stages.health.stage import HealthStage
from stages.providers import ProviderAdapter, build_adapter
from stages.recorder.stage import RecorderStage
from stages.router.stage import RouterStage
from stages.rules.archive_state import is_restored_id
from stages.rules.budget_view import ProviderBudgetView
from stages.rules.circuit_view import CircuitView
from stages.rules.ledger import BudgetLedger
from stages.rules.pricing import PriceTable
from stages.rules.rate_limits import RateLimiter
from stages.rules.recent_ids import RecentIds
from stages.rules.strategies import StrategyState

log = logging.getLogger("aipipe.app")

#: The five stages on the request path, in pipeline order; ``aipipe run`` runs ``ALL_STAGES`` (DESIGN A6).
PIPELINE_STAGES: tuple[str, ...] = ("cache", "budget", "router", "executor", "recorder")
ALL_STAGES: tuple[str, ...] = (*PIPELINE_STAGES, "breaker", "health")
#: Stages off the request path: their consumers fetch with ``background_fetch_max_wait_ms`` (less idle CPU).
BACKGROUND_STAGES: frozenset[str] = frozenset({"breaker", "health", "archive"})
#: What ``aipipe run`` runs by default: the seven stages and the archive (DESIGN A11), off the request path.
RUN_STAGES: tuple[str, ...] = (*ALL_STAGES, "archive")
#: A draining stage stops once it has fetched nothing for this long (s) after the stages before it stopped.
DRAIN_QUIET_S = 0.3
#: Longest time (s) the archive gets, after the request path stopped, to write what the stages wrote.
ARCHIVE_DRAIN_S = 30.0


def build_adapters(resolved: Resolved) -> dict[str, ProviderAdapter]:
    """One adapter per enabled deployment with an endpoint: an instance of its type's wire format."""
    adapters: dict[str, ProviderAdapter] = {}
    for name, endpoint in resolved.endpoints.items():
        cfg = resolved.config.providers[name]
        adapters[name] = build_adapter(
            name,
            base_url=endpoint.base_url,
            api_key=endpoint.api_key.reveal() if endpoint.api_key else None,
            account_id=endpoint.account_id,
            kind=resolved.config.type_of(name),
            api_version=endpoint.api_version,
            azure_deployments=cfg.azure_deployments,
            max_tokens_field=cfg.max_tokens_field,
        )
    return adapters


def _read_to_end(runner: StageRunner, since: float) -> bool:
    """Whether ``runner`` has read every partition to its end after ``since`` (monotonic s).

    A fetch that came back empty after ``since`` says so; under steady
    traffic none does, so a lag of zero on every partition read (the end
    offsets as of the latest fetch) says so too.
    """
    if runner.last_empty_fetch_at > since:
        return True
    lag = runner.lag()
    return bool(lag) and not any(lag.values())


class Pipeline:
    """The stages of one process, running over ``bus``.

    Args:
        settings: runtime settings (topics, concurrency).
        resolved: configuration and provider endpoints (emulator rule applied).
        bus: a started bus.
        stages: stage names to run (subset of ``RUN_STAGES``).
        prices: price table (default: the packaged one).
        rate_limiter: RPM/TPM limiter shared by this process's router and
            executor (default: Redis-shared with ``AIPIPE_REDIS_URL``, else in-process).
        broker_id: the identity of the broker's current run, for the archive
            (``pipeline.bus.discovery.BrokerHandle.broker_id``).
        archive: the archive to write (default: one under ``settings.archive_path``); the
            process's restore passes its own, whose folds a rotation reuses.

    Raises:
        ValueError: for an unknown stage, or an invalid ``strategy``/``weights`` in the configuration.
    """

    def __init__(
        self,
        settings: Settings,
        resolved: Resolved,
        bus: Bus,
        *,
        stages: Sequence[str] = PIPELINE_STAGES,
        prices: PriceTable | None = None,
        rate_limiter: RateLimiter | None = None,
        broker_id: Callable[[], str] = lambda: "memory",
        archive: FileArchive | None = None,
    ) -> None:
        unknown = [s for s in stages if s not in RUN_STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(RUN_STAGES)}")
        self.broker_id = broker_id
        self._archive: FileArchive | None = archive
        self._rotations = 0
        self._archive_closing = False
        self.settings = settings
        self.resolved = resolved
        self.config: PipelineConfig = resolved.config
        self.bus = bus
        self.stage_names = [s for s in RUN_STAGES if s in stages]
        self.topics = settings.topics
        self.prices = (prices or PriceTable.load()).with_deployments(self.config)
        # Redis (AIPIPE_REDIS_URL) shares the cache between replicas; in-process it is shared by this
        # process's cache stage and recorder only.
        self.cache_store = build_cache_store(
            settings.redis_url, self.config.cache, namespace=f"aipipe:{{{self.topics.prefix}cache}}"
        )
        self._cache_shared = self.cache_store.kind == "redis" or {"cache", "recorder"} <= set(self.stage_names)
        self.ledger = BudgetLedger(settled=RecentIds(settings.dedup_window_s, settings.dedup_max_ids))
        self._budgets: BudgetStore | None = None
        self._blobs: BlobStore | None = None
        self._run_beside: list[Callable[[Callable[[Emit], Awaitable[None]]], Coroutine[Any, Any, None]]] = []
        self.circuits = CircuitView()
        self.provider_budgets = ProviderBudgetView()
        self.strategy = StrategyState.from_config(self.config, prices=self.prices)
        self.rate_limiter: RateLimiter = rate_limiter or open_rate_limiter(settings)
        self.control_feed = BroadcastFeed(bus, self.topics.control, CONTROL_DECODER, background=True)
        self.control_feed.subscribe(self.provider_budgets.apply)  # budget_status, for readers of the pipeline
        self.cost_feed = BroadcastFeed(bus, self.topics.costs, COST_DECODER, background=True)
        self.budget_gauges = telemetry.BudgetGauges()
        self.runners: list[StageRunner] = []
        self.stages: dict[str, Stage] = {}
        self._client: httpx.AsyncClient | None = None
        self._exit = AsyncExitStack()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopped = anyio.Event()
        self._background = anyio.CancelScope()
        self.drain_grace_s = settings.drain_grace_s

    def blob_store(self) -> BlobStore:
        """The process's image blob store (DESIGN A4): Redis when configured, else ``$AIPIPE_HOME/blobs``."""
        if self._blobs is None:
            self._blobs = open_blob_store(self.settings.redis_url, self.settings.home, prefix=self.topics.prefix)
            self._exit.push_async_callback(self._blobs.aclose)
        return self._blobs

    def archive_store(self) -> FileArchive:
        """The process's archive (DESIGN A11): files under ``AIPIPE_ARCHIVE_DIR`` (default ``$AIPIPE_HOME/archive``)."""
        if self._archive is None:
            cfg = self.config.archive
            self._archive = FileArchive(
                self.settings.archive_path, self.topics, flush_ms=cfg.flush_ms, retention_days=cfg.retention()
            )
        if not self._archive_closing:
            self._archive_closing = True
            self._exit.push_async_callback(self._archive.aclose)
        return self._archive

    def _budget_store(self) -> BudgetStore:
        """The process's one budget store, shared by the gate and the executor (Redis when configured)."""
        if self._budgets is None:
            self._budgets = open_budget_store(self.settings.redis_url, self.topics.prefix, self.ledger)
            self._exit.push_async_callback(self._budgets.aclose)
        return self._budgets

    def _build(self, client: httpx.AsyncClient) -> None:
        t = self.topics
        for name in self.stage_names:
            stage: Stage
            if name == "cache":
                stage = CacheLookupStage(
                    t, self.cache_store, enabled=self.config.cache.enabled, coalesce=self._cache_shared
                )
                self.control_feed.subscribe(stage.on_control)
            elif name == "budget":
                gate = BudgetGateStage(t, self.config, self.prices, self.ledger, store=self._budget_store())
                self.cost_feed.subscribe(self._unless_restored(gate.on_cost))
                self.control_feed.subscribe(gate.on_control)
                gate.follow(self.cost_feed.caught_up, self.control_feed.caught_up)  # no admission before replay
                self.control_feed.subscribe(self.budget_gauges.apply)  # aipipe.budget.* metrics
                stage = gate
            elif name == "router":
                stage = RouterStage(t, self.config, strategy=self.strategy, rate_limiter=self.rate_limiter)
                self.control_feed.subscribe(self.strategy.apply)
            elif name == "executor":
                budgets = ProviderBudgets(
                    self._budget_store(),
                    self.prices,
                    self.config,
                    ready=(self.control_feed.caught_up, self.cost_feed.caught_up),
                )
                if "budget" not in self.stage_names:  # no gate here: the executor folds what it needs itself
                    self.control_feed.subscribe(budgets.on_control)
                    self.cost_feed.subscribe(self._unless_restored(budgets.on_cost))
                    self._run_beside.append(budgets.background)
                    if self.settings.redis_url is None:
                        log.warning(
                            "executor without the budget gate in its process and without AIPIPE_REDIS_URL: "
                            "provider budgets are this process's alone (set AIPIPE_REDIS_URL to share them)"
                        )
                stage = ExecutorStage(
                    t,
                    self.config,
                    build_adapters(self.resolved),
                    client,
                    circuits=self.circuits,
                    rate_limiter=self.rate_limiter,
                    prices=self.prices,
                    budgets=budgets,
                    secrets=self.settings.secret_values(
                        tuple(c.api_key_env for c in self.config.providers.values() if c.api_key_env)
                    ),
                    control_ready=self.control_feed.caught_up,
                    blobs=self.blob_store(),
                )
                self.control_feed.subscribe(stage.on_control)  # cancel_request of streams (DESIGN A9)
                if self.circuits.apply not in self.control_feed.listeners:
                    self.control_feed.subscribe(self.circuits.apply)
            elif name == "recorder":
                stage = RecorderStage(
                    t,
                    self.config,
                    self.prices,
                    self.cache_store if self._cache_shared else None,
                    costed=RecentIds(self.settings.dedup_window_s, self.settings.dedup_max_ids),
                    answered=RecentIds(self.settings.dedup_window_s, self.settings.dedup_max_ids),
                )
                self.cost_feed.subscribe(stage.on_cost)  # ids already costed, also before a restart
                stage.follow(self.cost_feed.caught_up)
            elif name == "breaker":
                breaker = BreakerStage(t, self.config, ready=self.control_feed.caught_up)
                self.control_feed.subscribe(breaker.on_control)
                stage = breaker
            elif name == "health":
                health = HealthStage(t, self.config, build_adapters(self.resolved), client)
                self.control_feed.subscribe(health.on_control)
                stage = health
            elif name == "archive":
                stage = ArchiveStage(t, self.archive_store(), self.config.archive.topics, self.broker_id)
            else:
                log.info("stage %s is not built yet; skipping", name)
                continue
            self.stages[name] = stage
            self.runners.append(
                StageRunner(
                    self.bus,
                    stage,
                    group=f"{self.topics.prefix}{name}",
                    deadletter_topic=t.deadletter,
                    keyed_by_request_id=name != "archive" and t.keyed_by_request_id(stage.input_topic),
                    carries_request_key=t.carries_request_key,
                    beside_path=t.is_stream_topic,
                    max_in_flight=self.settings.max_in_flight,
                    grace_s=self.settings.drain_grace_s,
                    background=name in BACKGROUND_STAGES,
                )
            )
            bind_runner = getattr(stage, "bind_runner", None)
            if bind_runner is not None:  # breaker, health: own the providers whose partition they hold
                bind_runner(self.runners[-1])

    async def __aenter__(self) -> Pipeline:
        await self.bus.ensure_topics(self.topics.all())
        self._exit.push_async_callback(self.rate_limiter.aclose)
        self._exit.push_async_callback(self.cache_store.aclose)
        self._client = await self._exit.enter_async_context(
            ProviderHttpClient(max_connections=self.settings.max_in_flight, timeout=None)
        )
        self._build(self._client)
        self._exit.callback(
            telemetry.watch(
                self,
                runners=self.runners,
                cache=self.stages.get("cache"),
                circuits=self.circuits if {"router", "executor"} & set(self.stages) else None,
                budget=self.budget_gauges if "budget" in self.stages else None,
            )
        )
        self._tg = await self._exit.enter_async_context(anyio.create_task_group())
        if self.control_feed.listeners:
            await self._tg.start(self.control_feed.run)
        if self.cost_feed.listeners:
            await self._tg.start(self.cost_feed.run)
        tg = self._tg
        async with anyio.create_task_group() as starting:  # group joins run in parallel
            for runner in self.runners:
                starting.start_soon(tg.start, runner.run)
        self._background = anyio.CancelScope()
        tg.start_soon(self._run_background)
        log.info("stages running: %s", ", ".join(self.stages))
        return self

    async def _run_background(self) -> None:
        """Run each stage's optional ``background(publish)`` until the pipeline drains."""
        with self._background:
            async with anyio.create_task_group() as bg:
                for runner in self.runners:
                    background = getattr(runner.stage, "background", None)
                    if background is not None:
                        bg.start_soon(background, runner.publish)
                    if runner.stage.name == "executor":
                        for beside in self._run_beside:
                            bg.start_soon(beside, runner.publish)
                await anyio.sleep_forever()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        await self._exit.__aexit__(exc_type, exc, tb)

    def stop(self) -> None:
        """Wind the process down in pipeline order (idempotent; returns at once).

        The first stage stops fetching at once; each later stage keeps
        consuming until what the stages before it produced has been handled
        (no record fetched for ``DRAIN_QUIET_S`` and nothing in flight), then
        stops — so a request in flight inside this process at SIGTERM is
        still answered, within ``drain_grace_s`` in all. Work left on a
        topic is never lost: another replica, or this one after a restart,
        takes it from the committed offset.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._tg is None:
            self._stop_all()
            return
        self._tg.start_soon(self._drain)

    def _stop_all(self) -> None:
        for runner in self.runners:
            runner.stop()
        self.control_feed.stop()
        self.cost_feed.stop()
        self._background.cancel()

    async def _drain(self) -> None:
        """Stop the stages in pipeline order within ``drain_grace_s`` in all; then abandon what is left.

        Each stage of the request path stops once the stages before it have
        stopped and its own work is done (nothing fetched for ``DRAIN_QUIET_S``,
        nothing in flight), so an answer being computed still reaches the
        recorder. When the window ends, every stage still running gives up its
        in-flight messages at once (one log line each, offsets uncommitted).
        The archive stops last, in a window of its own (``ARCHIVE_DRAIN_S``),
        once it has written everything the other stages wrote: with the
        embedded broker, what it has not written is gone when the broker stops.
        """
        chain = [r for r in self.runners if r.stage.name in PIPELINE_STAGES]
        archive = [r for r in self.runners if r.stage.name == "archive"]
        others = [r for r in self.runners if r not in chain and r not in archive]
        for runner in others:
            runner.stop()
        with anyio.move_on_after(self.drain_grace_s):
            for i, runner in enumerate(chain):
                if i > 0:
                    while runner.quiet_for_s() < DRAIN_QUIET_S:
                        await anyio.sleep(0.05)
                runner.stop()
                await runner.finished.wait()
        for runner in chain + others:
            if not runner.finished.is_set():
                runner.abandon(self.drain_grace_s)
        with anyio.move_on_after(ARCHIVE_DRAIN_S):
            mark = time.monotonic()
            for runner in archive:  # an empty fetch after the others stopped: everything they wrote is read
                while not (runner.in_flight == 0 and runner.last_empty_fetch_at > mark):
                    await anyio.sleep(0.01)
                runner.stop()
                await runner.finished.wait()
        for runner in archive:
            if not runner.finished.is_set():
                runner.abandon(ARCHIVE_DRAIN_S)
        self._stop_all()

    # --- broker rotation (pipeline.assembly.rotation) ------------------------------------------

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stopped.is_set()

    def pause_intake(self) -> None:
        """The first stage of the request path stops fetching new requests (in-flight work goes on)."""
        for runner in self.runners:
            if runner.stage.name == PIPELINE_STAGES[0]:
                runner.pause()

    def resume_intake(self) -> None:
        """Every stage fetches again (after ``pause_intake`` or ``park``)."""
        for runner in self.runners:
            runner.resume()

    async def park(self, limit_s: float) -> bool:
        """Pause every stage and wait until none is inside a fetch or has work in flight (at most ``limit_s``).

        Then no record of the current broker can reach a stage any more, so
        the broker can be replaced (a rotation). Returns whether all parked.
        """
        for runner in self.runners:
            runner.pause()
        with anyio.move_on_after(limit_s) as waited:
            while not all(r.parked or r.finished.is_set() for r in self.runners):
                await anyio.sleep(0.005)
        return not waited.cancelled_caught

    async def drain_for_rotation(self, limit_s: float) -> tuple[bool, float, float]:
        """Wait until the request path and then the archive have done all they read (at most ``limit_s`` each).

        In pipeline order, a stage is done once it has nothing in flight and
        a fetch came back empty after the stage before it was done (so it
        has read what that stage wrote); the archive last. Intake must be
        paused first (``pause_intake``).

        Returns:
            (whether everything drained, the request path's drain time (s), the archive's (s)).
        """
        started = time.monotonic()
        chain = [r for r in self.runners if r.stage.name in PIPELINE_STAGES]
        archive = [r for r in self.runners if r.stage.name == "archive"]
        drained = True
        mark = started
        with anyio.move_on_after(limit_s) as waited:
            for runner in chain:  # a paused stage (the first) reads nothing more: done once its work is
                while not (runner.in_flight == 0 and (runner.paused or runner.last_empty_fetch_at > mark)):
                    await anyio.sleep(0.01)
                mark = time.monotonic()
        drained = drained and not waited.cancelled_caught
        path_s = time.monotonic() - started
        with anyio.move_on_after(limit_s) as waited:
            for runner in archive:  # caught up: nothing in flight and read to the end of every partition
                while not (runner.in_flight == 0 and _read_to_end(runner, mark)):
                    await anyio.sleep(0.005)
        drained = drained and not waited.cancelled_caught
        return drained, path_s, time.monotonic() - started - path_s

    def busy_runners(self) -> str:
        """The stages with messages in flight (for a log line): name and count."""
        return ", ".join(f"{r.stage.name}: {r.in_flight} in flight" for r in self.runners if r.in_flight) or "none"

    async def rotated(self) -> None:
        """The broker was replaced by an empty one that a restore fills: read every topic from its start.

        From now on the restore's roll-ups of older spend (``restored-`` cost
        events) are skipped by this process's budget state, which counted
        that spend already.
        """
        self._rotations += 1
        for runner in self.runners:
            await runner.restart_positions()
        await self.control_feed.restart_from_zero()
        await self.cost_feed.restart_from_zero()

    def _unless_restored(self, listener: Callable[[CostEvent], None]) -> Callable[[CostEvent], None]:
        """``listener``, skipping a restore's roll-ups of spend this process's budget state holds already.

        That is after a rotation (this process counted the spend as it
        happened) and with Redis (the shared state keeps the spend).
        """

        def listen(event: CostEvent) -> None:
            # After a rotation this process counted that spend already; with Redis the shared state holds it.
            if is_restored_id(event.id) and (self._rotations or self.settings.redis_url is not None):
                return
            listener(event)

        return listen

    async def wait_stopped(self) -> None:
        """Return once ``stop()`` has been called."""
        await self._stopped.wait()
