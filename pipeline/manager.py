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

from pipeline.app import Pipeline
from pipeline.broker import read_runtime_broker
from pipeline.client import PipelineClient, as_request
from pipeline.config import PROVIDER_NAMES, PipelineConfig, config_from_mapping, preset
from pipeline.errors import InvalidRequestError, error_from_response
from pipeline.runtime import BusKind, OpenBus, load_config, open_bus, open_providers
from pipeline.settings import Settings
from schemas.request import AIRequest
from schemas.response import AIResponse

log = logging.getLogger("aipipe.manager")

#: Strategy names (DESIGN A5), mapped to the values ``set_load_balancing_strategy`` accepts.
LOAD_BALANCING_STRATEGIES: dict[str, str] = {
    "round_robin": "round_robin",
    "weighted": "weighted",
    "least_latency": "least_latency",
    "cost_optimized": "cost_optimized",
    "priority": "priority",
}


def _missing(capability: str) -> NotImplementedError:
    return NotImplementedError(f"{capability} is not built yet in this version of aipipe")


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

    async def start(self) -> AIProviderManager:
        """Open the bus, start the stages (unless they run elsewhere) and the response reader.

        Raises:
            BusError: when the broker cannot be reached.
        """
        if self._started:
            return self
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
                self._pipeline = await self._stack.enter_async_context(Pipeline(self.settings, resolved, opened.bus))
            client = PipelineClient(opened.bus, self.settings.topics)
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

    # --- management (DESIGN A5); capabilities land issue by issue -------------------------

    async def set_load_balancing_strategy(self, strategy: str | Mapping[str, Any]) -> None:
        """Switch every router replica to ``strategy`` (name or the seed's ``{"type": ...}`` shape)."""
        raise _missing("switching load-balancing strategies at run time")

    async def get_health_status(self) -> list[Any]:
        """Per provider: health, error rate, response time (ms), circuit state."""
        raise _missing("health monitoring")

    async def test_provider(self, name: str) -> bool:
        """One real call through the pipeline to provider ``name``; True when it answers."""
        raise _missing("provider testing")

    async def get_cost_summary(self) -> dict[str, Any]:
        """Per provider: total cost (USD), tokens, average cost per token, request count."""
        raise _missing("the cost summary")

    async def set_budget(
        self, scope: str, *, daily: float | None = None, weekly: float | None = None, monthly: float | None = None
    ) -> None:
        """Set a budget scope's limits (USD)."""
        raise _missing("budgets by scope")

    async def get_budget_status(self, scope: str) -> dict[str, Any]:
        """Per window: limit, spent, reserved (USD), percentage, resets_at."""
        raise _missing("budget status")

    async def get_cost_projection(self, scope: str, days: int) -> dict[str, Any]:
        """Spend projected to the end of the day, week and month (USD)."""
        raise _missing("cost projections")

    async def get_cache_stats(self) -> dict[str, Any]:
        """Cache hits, misses, hit rate, entries, evictions, bytes."""
        raise _missing("cache statistics")

    async def clear_cache(self) -> None:
        """Empty every cache replica."""
        raise _missing("clearing the cache")

    async def get_metrics(self) -> dict[str, Any]:
        """Per provider: request, success and failure counts, latency percentiles (ms), cost (USD)."""
        raise _missing("provider metrics")

    async def get_top_models(self, n: int = 5) -> list[Any]:
        """The ``n`` models with the most requests."""
        raise _missing("usage analytics")

    async def get_top_users(self, n: int = 10) -> list[Any]:
        """The ``n`` users with the highest cost."""
        raise _missing("usage analytics")

    async def get_daily_costs(self, days: int = 30) -> list[Any]:
        """Cost per day (USD) over the last ``days`` days."""
        raise _missing("usage analytics")


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
