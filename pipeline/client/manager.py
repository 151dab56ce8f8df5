"""``AIProviderManager``: the seed's API (DESIGN A5) on top of the topics.

With the in-process bus every stage runs inside the manager's process (as the
seed's manager did). With ``bus="kafka"`` and a broker (``AIPIPE_KAFKA_BOOTSTRAP``
or the runtime file) the manager is a client of stages running elsewhere;
with neither, it starts the embedded broker and every stage in-process.
Every method is ``async`` because each one talks to the bus.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import anyio
import msgspec
from msgspec import UNSET, UnsetType

from pipeline.assembly.build import ALL_STAGES, Pipeline
from pipeline.assembly.process import BusKind, OpenBus, load_config, open_bus, open_providers
from pipeline.bus.discovery import read_runtime_broker
from pipeline.client import cache_control, strategy_control
from pipeline.client.cost_book import BudgetReport, CostProjection, CostSummary, DailyCost, ModelUsage, UserUsage
from pipeline.client.health_board import HealthStatus
from pipeline.client.health_reader import HealthReader
from pipeline.client.metrics_book import MetricsBook, ProviderMetrics
from pipeline.client.pipeline_client import PipelineClient, as_request
from pipeline.client.report_reader import ReportReader, limits_applied, publish_control, set_budget_event
from pipeline.client.stream_handle import StreamHandle
from pipeline.errors import AIProviderError, InvalidRequestError, ServiceUnavailableError, error_from_response
from pipeline.runtime import telemetry
from pipeline.runtime.config import PROVIDER_NAMES, STRATEGY_NAMES, PipelineConfig, config_from_mapping, preset
from pipeline.runtime.runner import now_utc
from pipeline.runtime.settings import Settings
from pipeline.stores.blob_store import open_blob_store
from schemas.request import AIRequest
from schemas.response import AIResponse
from schemas.stream import StreamChunk
from stages.rules.ledger import zone
from stages.rules.strategies import StrategySpec, parse_strategy

log = logging.getLogger("aipipe.manager")

#: Strategy names (DESIGN A5), mapped to the values ``set_load_balancing_strategy`` accepts
#: (the canonical names themselves: ``round_robin``, ``weighted``, ``least_latency``,
#: ``cost_optimized``, ``priority``; ``stages.rules.strategies`` documents each).
LOAD_BALANCING_STRATEGIES: dict[str, str] = {name: name for name in STRATEGY_NAMES}


def _coerce_config(config: PipelineConfig | Mapping[str, Any] | None, env_name: str) -> PipelineConfig:
    if config is None:
        return preset(env_name)
    if isinstance(config, PipelineConfig):
        return config
    data = dict(config)
    if data and all(k in PROVIDER_NAMES for k in data):  # the seed's shape: {provider: ProviderConfig}
        data = {"providers": data}
    return config_from_mapping(data, base=preset(env_name))


class AIProviderManager:
    """The provider manager of the seed, as an async context manager.

    Args:
        config: a ``PipelineConfig``, a mapping in the TOML shape or the seed's
            ``{provider: {...}}`` shape (camelCase accepted), or ``None`` for
            the preset of ``AIPIPE_ENV``.
        env: environment variables of DESIGN A7 (default ``os.environ``).
        bus: ``"memory"`` or ``"kafka"``; default ``kafka`` when
            ``AIPIPE_KAFKA_BOOTSTRAP`` is set, else ``memory``.

    Raises:
        ValueError: for an invalid configuration or bus name.
    """

    def __init__(
        self,
        config: PipelineConfig | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        bus: str | None = None,
    ) -> None:
        self.env: dict[str, str] = dict(os.environ if env is None else env)
        self.settings = Settings.from_env(self.env)
        self.config = _coerce_config(config, self.settings.env_name)
        kind = bus or ("kafka" if self.settings.kafka_bootstrap else "memory")
        if kind not in ("memory", "kafka"):
            raise ValueError(f"bus must be 'memory' or 'kafka', got {bus!r}")
        self.bus_kind: BusKind = kind  # type: ignore[assignment]
        self._stack = AsyncExitStack()
        self._client: PipelineClient | None = None
        self._pipeline: Pipeline | None = None
        self._open_bus: OpenBus | None = None
        self._started = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._reports: ReportReader | None = None
        self._health: HealthReader | None = None
        self._calls = MetricsBook()

    def spawn(self, func: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``func`` in the manager's task group (stopped at shutdown).

        Raises:
            RuntimeError: when the manager is not started.
        """
        if self._tg is None:
            raise RuntimeError("the manager is not started: use `async with` or `await manager.start()`")
        self._tg.start_soon(func)

    @property
    def bootstrap(self) -> str | None:
        """The Kafka broker address in use (``None`` on the in-process bus)."""
        return self._open_bus.bootstrap if self._open_bus else None

    @property
    def pipeline(self) -> Pipeline | None:
        """The in-process stages, when this manager runs them."""
        return self._pipeline

    @property
    def client(self) -> PipelineClient:
        """The manager's one shared ``PipelineClient`` (publishes requests, awaits responses by id).

        Raises:
            RuntimeError: when the manager is not started.
        """
        if self._client is None:
            raise RuntimeError("the manager is not started: use `async with` or `await manager.start()`")
        return self._client

    async def start(self) -> AIProviderManager:
        """Open the bus, start the stages (unless they run elsewhere) and the response reader.

        Raises:
            BusError: when the broker cannot be reached.
        """
        if self._started:
            return self
        telemetry.ensure_configured(self.env)  # OTEL_* and LOG_LEVEL=debug tracing, once per process
        runs_stages = True
        if self.bus_kind == "kafka":
            has_broker = bool(self.settings.kafka_bootstrap) or read_runtime_broker(self.env) is not None
            runs_stages = not has_broker
        try:
            opened = await self._stack.enter_async_context(open_bus(self.bus_kind, self.env, start_broker=True))
            self._open_bus = opened
            await opened.bus.ensure_topics(self.settings.topics.all())
            tg = await self._stack.enter_async_context(anyio.create_task_group())
            self._stack.callback(tg.cancel_scope.cancel)
            self._tg = tg
            if runs_stages:
                resolved = await self._stack.enter_async_context(open_providers(self.settings, self.config))
                self.config = resolved.config
                self._pipeline = await self._stack.enter_async_context(
                    Pipeline(self.settings, resolved, opened.bus, stages=ALL_STAGES)
                )
            blobs = open_blob_store(self.settings.redis_url, self.settings.home, prefix=self.settings.topics.prefix)
            self._stack.push_async_callback(blobs.aclose)
            client = PipelineClient(
                opened.bus, self.settings.topics, blobs=blobs, max_image_bytes=self.config.images.max_bytes
            )
            await tg.start(client.run)
            self._stack.callback(client.stop)
            self._client = client
        except BaseException:
            await self._stack.aclose()
            raise
        self._started = True
        return self

    async def __aenter__(self) -> AIProviderManager:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop the response reader and the in-process stages, close the bus (idempotent)."""
        if self._pipeline is not None:
            self._pipeline.stop()
        await self._stack.aclose()
        self._started = False
        self._client = None
        self._pipeline = None

    async def generate_content(self, request: AIRequest | Mapping[str, Any]) -> AIResponse:
        """Publish ``request`` and return its ``AIResponse``.

        ``request`` is an ``AIRequest`` or a dict of its JSON fields (an ``id``
        is generated when absent).

        Raises:
            InvalidRequestError: when the dict is not a valid request.
            AIProviderError: the typed error (``RateLimitError``,
                ``AllProvidersFailedError`` with every attempt, ...) of a
                ``status: error`` response.
            ProviderTimeoutError: when no response arrives in time.
        """
        if self._client is None:
            await self.start()
        assert self._client is not None
        try:
            req = as_request(request)
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid request: {exc}") from exc
        response = await self._client.request(req)
        if response.status == "error":
            raise error_from_response(response)
        return response

    def stream_content(self, request: AIRequest | Mapping[str, Any]) -> ContentStream:
        """Stream ``request``'s answer: ``async for chunk in manager.stream_content(request)``, then ``.response``.

        ``request`` is an ``AIRequest`` or a dict of its JSON fields; it is
        sent with ``stream: true`` (DESIGN A9). Each item is a ``StreamChunk``
        (``delta`` is the new text). Leave early with ``await stream.aclose()``
        (or ``async with``): the request is then cancelled and the provider
        call stopped.

        Raises (while iterating):
            InvalidRequestError: when the dict is not a valid request.
            AIProviderError: the typed error of a request that failed before any text.
            StreamInterruptedError: when the answer stopped after text was shown.
            StreamCancelledError: when the request was cancelled.
            ProviderTimeoutError: when no response arrives in time.
        """
        return ContentStream(self, request)

    # --- management (DESIGN A5); capabilities land issue by issue -------------------------

    async def set_load_balancing_strategy(self, strategy: str | Mapping[str, Any] | StrategySpec) -> None:
        """Switch every router replica to ``strategy``: publishes ``set_strategy`` on ``ai.control``.

        ``strategy`` is a name (``"cost_optimized"``), a
        ``LOAD_BALANCING_STRATEGIES`` value, or the seed's shape
        (``{"type": "weighted", "weights": {"openai": 0.6, ...}}``, kebab-case
        type names too). When this manager runs the router in-process, the
        call returns once that router has applied it, so the next request
        uses the new strategy.

        Raises:
            ValueError: for an unknown strategy or invalid weights (nothing is published).
        """
        spec = parse_strategy(strategy, known_providers=self.config.providers)
        if self._open_bus is None:
            await self.start()
        assert self._open_bus is not None
        event = await strategy_control.publish_strategy(self._open_bus.bus, self.settings.topics, spec)
        if self._pipeline is not None and "router" in self._pipeline.stages:
            await strategy_control.wait_applied(self._pipeline.strategy, event)

    async def get_health_status(self) -> list[HealthStatus]:
        """Per provider: ``is_healthy``, ``error_rate``, ``response_time_ms``, ``circuit_breaker_state``, ...

        Folded in this process from ``ai.control`` (executor attempts, health
        probes, the breaker's transitions; ``pipeline.client.health_board`` says how),
        read up to the moment of the call. Enabled providers of the manager's
        configuration come first, then any other provider seen on the topic.
        """
        reader = await self._health_reader()
        return reader.status()

    async def _health_reader(self) -> HealthReader:
        """The manager's reader of ``ai.control`` (health and call metrics), started on first use, caught up to now."""
        if self._open_bus is None:
            await self.start()
        assert self._open_bus is not None and self._tg is not None
        reader = self._health
        if reader is None or reader.bus is not self._open_bus.bus:
            reader = HealthReader(self._open_bus.bus, self.settings.topics, self.config)
            self._calls = MetricsBook()
            reader.listeners.append(self._calls.apply)  # before it reads: every event is counted
            await self._tg.start(reader.run)
            self._stack.callback(reader.stop)
            self._health = reader
        await reader.sync()
        return reader

    async def test_provider(self, name: str) -> bool:
        """One real call through the pipeline to provider ``name``; True when it answers.

        Sends a short request (``max_tokens`` 8, cache bypassed) for the
        provider's probe model (``health.probe_models``, else its first model)
        with ``providers: [name]``, so no other provider may answer. False when
        the provider is disabled, its circuit is not ``CLOSED``, or the call fails.

        Raises:
            ValueError: for a provider name aipipe does not know.
        """
        if name not in self.config.providers:
            raise ValueError(f"unknown provider {name!r}; expected one of {', '.join(self.config.providers)}")
        model = self.config.probe_model(name)
        cfg = self.config.providers.get(name)
        if model is None or cfg is None or not cfg.enabled:
            return False
        request = {
            "model": model,
            "prompt": "Reply with the word OK.",
            "max_tokens": 8,
            "temperature": 0.0,
            "providers": [name],
            "cache": {"bypass": True},
        }
        try:
            response = await self.generate_content(request)
        except AIProviderError as exc:
            log.info("test_provider(%s): %s: %s", name, exc.error_type, exc.message)
            return False
        return response.provider == name

    # --- costs and budgets: folded from ai.costs and ai.control (pipeline.client.report_reader) -------------

    async def _report_reader(self) -> ReportReader:
        """The manager's reader of ``ai.costs`` and ``ai.control``, started on first use and caught up to now."""
        if self._open_bus is None:
            await self.start()
        assert self._open_bus is not None and self._tg is not None
        reader = self._reports
        if reader is None or reader.bus is not self._open_bus.bus:
            reader = ReportReader(self._open_bus.bus, self.settings.topics, zone(self.config.budget.timezone))
            await self._tg.start(reader.run)
            self._stack.callback(reader.stop)
            self._reports = reader
        await reader.sync()
        return reader

    async def get_cost_summary(self) -> dict[str, CostSummary]:
        """Per provider: ``total_cost_usd``, ``total_tokens``, ``average_cost_per_token_usd``, ``request_count``.

        Computed from every ``CostEvent`` on ``ai.costs`` (each request id
        once); cache hits are counted apart (``cache_hits``, ``saved_usd``).
        """
        return (await self._report_reader()).book.cost_summary()

    async def set_budget(
        self,
        scope: str,
        limits: Mapping[str, float | None] | None = None,
        *,
        daily: float | UnsetType | None = UNSET,
        weekly: float | UnsetType | None = UNSET,
        monthly: float | UnsetType | None = UNSET,
        wait_s: float = 5.0,
    ) -> None:
        """Change a budget scope's limits (USD per window): ``set_budget`` on ``ai.control`` (DESIGN A6).

        Only the windows given change: a number sets the window's limit,
        ``None`` removes it, a window not given keeps its limit. ``scope`` is
        ``global``, ``user:NAME`` or a deployment name. The seed's shape works
        too: ``set_budget("openai", {"daily": 10, "weekly": 50, "monthly":
        200})``. User and global budgets refuse requests with
        ``budget_exceeded``; a provider (deployment) with no room left is
        skipped by the executor. Returns once a budget gate has published the
        new limits (or after ``wait_s`` s, with a warning: gates apply the
        command whenever they read it).

        Raises:
            ValueError: for an unknown scope form, a negative amount, or no window given
                (nothing is published).
        """
        if limits is not None:
            daily = limits.get("daily", daily) if "daily" in limits else daily
            weekly = limits.get("weekly", weekly) if "weekly" in limits else weekly
            monthly = limits.get("monthly", monthly) if "monthly" in limits else monthly
        event = set_budget_event(scope, daily, weekly, monthly, deployments=self.config.providers)
        reader = await self._report_reader()
        await publish_control(reader.bus, self.settings.topics, event)
        if wait_s > 0 and not await reader.wait_for(limits_applied(event), wait_s):
            log.warning("no budget gate confirmed the budget of %s within %.0fs; gates apply it on read", scope, wait_s)

    async def get_budget_status(self, scope: str) -> BudgetReport:
        """Per window (``.daily``, ``.weekly``, ``.monthly``): limit, spent, reserved (USD), percentage, resets_at.

        Spent is the sum of the scope's ``CostEvent`` whose own time falls in
        the calendar window (time zone ``budget.timezone``); the limit and the
        reserved amount come from the gates' ``budget_status`` events.
        """
        return (await self._report_reader()).book.budget_status(scope, now_utc())

    async def get_cost_projection(self, scope: str, days: int = 7) -> CostProjection:
        """Spend of ``scope`` projected to the end of the day, week and month (USD; ``.monthly`` as in the seed).

        Method (``pipeline.client.cost_book``): the spend rate since local midnight
        ``days - 1`` days ago, times the time left in each window, plus what
        the window has spent so far.

        Raises:
            ValueError: when ``days`` < 1.
        """
        return (await self._report_reader()).book.projection(scope, days, now_utc())

    async def get_cache_stats(self) -> dict[str, Any]:
        """Cache hits, misses, hit rate, entries, evictions, bytes, summed over every cache replica.

        Asks every cache replica for its ``cache_stats`` now, on ``ai.control``
        (``pipeline.client.cache_control``).

        Returns:
            ``{"hits": int, "misses": int, "hit_rate": float (0..1), "entries":
            int, "evictions": int, "bytes": int, "replicas": [cache_stats, ...]}``.

        Raises:
            ServiceUnavailableError: when no cache replica answers within 3 s.
        """
        bus, expected = await self._cache_replicas()
        summary = await cache_control.request_cache_stats(bus, self.settings.topics, expected_replicas=expected)
        if not summary.replicas:
            raise ServiceUnavailableError("no cache replica answered within 3 s: is the cache stage running?")
        stats: dict[str, Any] = msgspec.to_builtins(summary)
        return stats

    async def clear_cache(self) -> None:
        """Empty every cache replica (a ``cache_clear`` on ``ai.control``); returns once they confirmed.

        Raises:
            ServiceUnavailableError: when no cache replica confirms within 3 s.
        """
        bus, expected = await self._cache_replicas()
        summary = await cache_control.clear_cache(bus, self.settings.topics, expected_replicas=expected)
        if not summary.replicas:
            raise ServiceUnavailableError("no cache replica confirmed the clear within 3 s: is the cache stage up?")

    async def _cache_replicas(self) -> tuple[Any, int | None]:
        """The bus, and how many cache replicas answer (1 when this manager runs them all in-process)."""
        if self._open_bus is None:
            await self.start()
        assert self._open_bus is not None
        local = self.bus_kind == "memory" and self._pipeline is not None and "cache" in self._pipeline.stages
        return self._open_bus.bus, 1 if local else None

    async def get_metrics(self) -> dict[str, ProviderMetrics]:
        """Per provider: calls, successes, failures, latency (average, p50/p95/p99, ms), cost (USD), tokens.

        Computed from the topics, read up to the moment of the call: calls and
        latencies from the executor's ``health`` events on ``ai.control`` (one
        per provider call, retries included; probes left out), cost and tokens
        from ``ai.costs`` (``pipeline.client.metrics_book`` says how). Enabled
        providers are listed even with no calls. The seed's names work too:
        ``request_count``, ``success_count``, ``average_latency`` (ms),
        ``total_cost`` (USD).
        """
        await self._health_reader()
        costs = (await self._report_reader()).book.cost_summary()
        return self._calls.metrics(costs, list(self.config.enabled_providers()))

    async def get_top_models(self, n: int = 5) -> list[ModelUsage]:
        """The ``n`` provider models with the most requests (from ``ai.costs``), with tokens and cost (USD)."""
        return (await self._report_reader()).book.top_models(n)

    async def get_top_users(self, n: int = 10) -> list[UserUsage]:
        """The ``n`` users with the highest cost (USD, from ``ai.costs``), with requests and tokens."""
        return (await self._report_reader()).book.top_users(n)

    async def get_daily_costs(self, days: int = 30) -> list[DailyCost]:
        """Cost (USD), requests and tokens per calendar day (``budget.timezone``) for the last ``days`` days."""
        return (await self._report_reader()).book.daily_costs(days, now_utc())


class ContentStream:
    """The async iterator ``AIProviderManager.stream_content`` returns; ``response`` once it has ended."""

    def __init__(self, manager: AIProviderManager, request: AIRequest | Mapping[str, Any]) -> None:
        self._manager = manager
        self._request = request
        self._handle: StreamHandle | None = None

    @property
    def response(self) -> AIResponse | None:
        """The final ``AIResponse`` (``None`` until the stream has ended)."""
        return self._handle.response if self._handle is not None else None

    @property
    def text(self) -> str:
        """The text received so far."""
        return self._handle.text if self._handle is not None else ""

    def __aiter__(self) -> ContentStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._handle is None:
            if self._manager._client is None:
                await self._manager.start()
            assert self._manager._client is not None
            try:
                req = as_request(self._request, stream=True)
            except msgspec.ValidationError as exc:
                raise InvalidRequestError(f"invalid request: {exc}") from exc
            self._handle = await self._manager._client.stream(req)
        return await self._handle.__anext__()

    async def aclose(self) -> None:
        """Stop reading; a request still running is cancelled."""
        if self._handle is not None:
            await self._handle.aclose()

    async def __aenter__(self) -> ContentStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def create_ai_provider_manager(
    env_name: str, env: Mapping[str, str] | None = None, *, bus: str | None = None
) -> AIProviderManager:
    """A manager with the ``development`` or ``production`` preset (plus ``AIPIPE_CONFIG`` if set).

    Raises:
        ValueError: for an unknown environment name or an invalid configuration file.
    """
    merged = dict(os.environ if env is None else env)
    merged["AIPIPE_ENV"] = env_name
    settings = Settings.from_env(merged)
    return AIProviderManager(load_config(settings, env_name), merged, bus=bus)
