"""What the benchmark drives: bare HTTP clients, LiteLLM's Router, and aipipe on either bus.

Every target answers the same chat completion of the same real prompt
(MT-Bench and Vicuna questions, ``pipeline.data.prompts``) against the same
emulator, and is used as an async context manager whose ``call(i)`` makes
request ``i`` and raises on failure.

* ``limit``: ``aiohttp.ClientSession`` posting to the emulator's OpenAI
  endpoint directly (the fastest bare client, ``PERFORMANCE-NOTES.md``).
* ``httpx-aiohttp`` and ``httpx``: the httpx API on the aiohttp transport and
  on httpx's own pool (the transport comparison).
* ``litellm``: ``litellm.Router`` with the emulator's OpenAI endpoint as an
  OpenAI-compatible deployment and a fallback deployment.
* ``aipipe-memory`` and ``aipipe-kafka``: the five stages and a
  ``PipelineClient`` in this process, on the in-process bus or on the Kafka
  bus with the embedded broker (a child process).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import anyio
import msgspec

from pipeline.assembly.build import Pipeline
from pipeline.bus.embedded import EmbeddedBroker
from pipeline.bus.kafka import KafkaBus, KafkaSettings
from pipeline.bus.memory import MemoryBus
from pipeline.bus.protocol import Bus
from pipeline.client.pipeline_client import PipelineClient
from pipeline.data.prompts import load_prompts
from pipeline.errors import error_from_response
from pipeline.runtime.config import BudgetConfig, RateLimit, preset
from pipeline.runtime.endpoints import resolve_endpoints
from pipeline.runtime.settings import Settings
from schemas.request import AIRequest, CacheOptions, Message

#: Model every target asks for: an OpenAI model on the emulator (and aipipe's model group of that name).
MODEL = "gpt-3.5-turbo"
#: The fallback model of the LiteLLM Router (another OpenAI-compatible deployment on the emulator).
FALLBACK_MODEL = "gpt-4o-mini"
#: Completion length asked for (tokens); the emulator's answers are shorter.
MAX_TOKENS = 256
#: Key sent to the emulator (it accepts any non-empty key).
EMULATOR_KEY = "bench-key"
#: HTTP connections a bare client may open (more than any run keeps busy).
BARE_CONNECTIONS = 1000
#: Every aipipe request skips the response cache, so each one reaches the emulator.
_BYPASS = CacheOptions(bypass=True)


def bench_prompts() -> list[str]:
    """The first turn of every MT-Bench and Vicuna question (160 real prompts)."""
    return [p.turns[0] for source in ("mt_bench", "vicuna_bench") for p in load_prompts(source)]


class Target(Protocol):
    """A system under test: ``async with target: await target.call(i)``."""

    key: str

    async def __aenter__(self) -> Target: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def call(self, index: int) -> None:
        """Make request ``index`` (prompt ``index`` modulo the prompt count); raise on failure."""
        ...

    def pids(self) -> dict[str, int]:
        """Processes the target runs besides the bench process (e.g. ``{"broker": pid}``)."""
        ...

    def info(self) -> dict[str, Any]:
        """Facts to report with the results (versions, settings)."""
        ...


class CallFailed(Exception):
    """A bare-client call that got a non-200 status or an empty answer; ``status_code`` is the HTTP status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message


class _Completion(msgspec.Struct):
    choices: list[_Choice]


#: Decoder of the few fields of an OpenAI chat completion the bench checks (the answer's text).
COMPLETION_DECODER = msgspec.json.Decoder(_Completion)
_ENCODER = msgspec.json.Encoder()


def _body(prompt: str) -> bytes:
    return _ENCODER.encode(
        {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_completion_tokens": MAX_TOKENS}
    )


def _check(status: int, raw: bytes) -> None:
    if status != 200:
        raise CallFailed(f"HTTP {status}", status)
    completion = COMPLETION_DECODER.decode(raw)
    if not completion.choices or not completion.choices[0].message.content:
        raise CallFailed("empty answer", status)


class BaseTarget:
    """What every target shares: the emulator URL, the prompts, and an exit stack closed by ``__aexit__``."""

    key = ""

    def __init__(self, emulator_url: str, prompts: Sequence[str]) -> None:
        self.emulator_url = emulator_url.rstrip("/")
        self.prompts = list(prompts)
        self._stack = AsyncExitStack()
        self._broker_pid: int | None = None

    async def _start_embedded_broker(self, prefix: str) -> str:
        """Start an embedded broker (its log in a new temporary folder ``prefix...``), stopped on exit; its address."""
        log_dir = Path(tempfile.mkdtemp(prefix=prefix))
        broker = EmbeddedBroker(log_path=log_dir / "broker.log")
        await broker.start()
        self._stack.push_async_callback(broker.stop)
        self._broker_pid = broker.pid
        return broker.address

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def pids(self) -> dict[str, int]:
        """The embedded broker's pid, when this target started one (else no process besides the bench's)."""
        return {"broker": self._broker_pid} if self._broker_pid is not None else {}

    def info(self) -> dict[str, Any]:
        """Nothing to report."""
        return {}


class AiohttpTarget(BaseTarget):
    """The limit: ``aiohttp.ClientSession`` (keep-alive pool of up to 1,000 connections) posting to the emulator."""

    key = "limit"

    async def __aenter__(self) -> AiohttpTarget:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=BARE_CONNECTIONS)
        self._session = await self._stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        self._url = f"{self.emulator_url}/v1/chat/completions"
        self._headers = {"authorization": f"Bearer {EMULATOR_KEY}", "content-type": "application/json"}
        return self

    async def call(self, index: int) -> None:
        """POST one chat completion and check its answer.

        Raises:
            CallFailed: on a non-200 status or an empty answer.
        """
        body = _body(self.prompts[index % len(self.prompts)])
        async with self._session.post(self._url, data=body, headers=self._headers) as response:
            raw = await response.read()
            status = response.status
        _check(status, raw)

    def info(self) -> dict[str, Any]:
        """The client library and its version."""
        import aiohttp

        return {"client": f"aiohttp {aiohttp.__version__}", "max_connections": BARE_CONNECTIONS}


class HttpxTarget(BaseTarget):
    """The httpx API posting to the emulator, on the aiohttp transport (``httpx-aiohttp``) or httpx's own pool."""

    def __init__(self, emulator_url: str, prompts: Sequence[str], *, transport: str) -> None:
        super().__init__(emulator_url, prompts)
        if transport not in ("httpx-aiohttp", "httpx"):
            raise ValueError(f"unknown transport {transport!r}")
        self.key = transport

    async def __aenter__(self) -> HttpxTarget:
        import httpx

        limits = httpx.Limits(max_connections=BARE_CONNECTIONS, max_keepalive_connections=BARE_CONNECTIONS)
        client: httpx.AsyncClient
        if self.key == "httpx-aiohttp":
            from httpx_aiohttp import HttpxAiohttpClient

            client = HttpxAiohttpClient(limits=limits, timeout=None)
        else:
            client = httpx.AsyncClient(limits=limits, timeout=None)
        self._client = await self._stack.enter_async_context(client)
        self._url = f"{self.emulator_url}/v1/chat/completions"
        self._headers = {"authorization": f"Bearer {EMULATOR_KEY}", "content-type": "application/json"}
        return self

    async def call(self, index: int) -> None:
        """POST one chat completion and check its answer.

        Raises:
            CallFailed: on a non-200 status or an empty answer.
        """
        body = _body(self.prompts[index % len(self.prompts)])
        response = await self._client.post(self._url, content=body, headers=self._headers)
        _check(response.status_code, response.content)

    def info(self) -> dict[str, Any]:
        """The client and its transport."""
        import httpx

        return {"client": f"httpx {httpx.__version__} ({self.key})", "max_connections": BARE_CONNECTIONS}


def litellm_available() -> bool:
    """Whether ``litellm`` can be imported (the ``bench`` extra installs it).

    Sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` first (unless set): LiteLLM otherwise fetches its price
    map from the network at import, and retries for ~7 s when there is none.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm  # noqa: F401
    except ImportError:
        return False
    return True


async def close_litellm() -> None:
    """Close the HTTP clients LiteLLM caches for the whole process (once, after its last Router).

    LiteLLM keeps them in a module-level cache that a later ``Router`` reuses, so closing them
    between targets would leave the next one with closed clients.
    """
    import sys

    litellm = sys.modules.get("litellm")
    closer = getattr(litellm, "close_litellm_async_clients", None) if litellm is not None else None
    if closer is not None:
        await closer()


class LiteLLMTarget(BaseTarget):
    """LiteLLM's ``Router`` with the emulator as OpenAI-compatible deployments.

    ``gpt-3.5-turbo``, falling back to ``gpt-4o-mini``, two retries (LiteLLM's documented Router options:
    https://docs.litellm.ai/docs/routing).

    LiteLLM is imported with ``LITELLM_LOCAL_MODEL_COST_MAP=True``, so it reads its bundled price map instead of
    fetching one at import.
    """

    key = "litellm"

    def __init__(self, emulator_url: str, prompts: Sequence[str], *, timeout_s: float) -> None:
        super().__init__(emulator_url, prompts)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> LiteLLMTarget:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm
        from litellm.router import Router

        litellm.suppress_debug_info = True
        litellm.telemetry = False
        # LiteLLM logs a warning per call once its pool is saturated, through its own handler and
        # the root one: errors only, as aipipe logs nothing per successful call either.
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            logging.getLogger(name).setLevel(logging.ERROR)
        base = f"{self.emulator_url}/v1"

        def deployment(name: str, model: str) -> dict[str, Any]:
            return {
                "model_name": name,
                "litellm_params": {"model": f"openai/{model}", "api_base": base, "api_key": EMULATOR_KEY},
            }

        self._router = Router(
            model_list=[deployment(MODEL, MODEL), deployment(f"{MODEL}-fallback", FALLBACK_MODEL)],
            fallbacks=[{MODEL: [f"{MODEL}-fallback"]}],
            num_retries=2,
            timeout=self.timeout_s,
        )
        return self

    async def call(self, index: int) -> None:
        """One ``Router.acompletion`` call.

        Raises:
            CallFailed: on an empty answer; LiteLLM's own errors otherwise.
        """
        response = await self._router.acompletion(
            model=MODEL,
            messages=[{"role": "user", "content": self.prompts[index % len(self.prompts)]}],
            max_tokens=MAX_TOKENS,
        )
        if not response.choices or not response.choices[0].message.content:
            raise CallFailed("empty answer")

    def info(self) -> dict[str, Any]:
        """LiteLLM's version."""
        from importlib.metadata import version

        return {"litellm": version("litellm")}


class AipipeTarget(BaseTarget):
    """aipipe: the five stages and a ``PipelineClient`` in this process, on the ``memory`` or ``kafka`` bus.

    The configuration is the production preset with OpenAI first and Cloudflare as its fallback, no rate
    limits and no budget; requests bypass the response cache, so each one reaches the emulator. On Kafka,
    an embedded broker is started (a child process) unless ``bootstrap`` names one; ``AIPIPE_KAFKA_*``
    settings apply, with a 2 s session timeout by default so the stage groups join fast.

    Args:
        emulator_url: the emulator's root URL.
        prompts: the prompts.
        bus: ``memory`` or ``kafka``.
        timeout_s: each request's ``timeout_ms`` (s).
        bootstrap: an existing broker to use instead of starting one (Kafka only).
        env: environment for the Kafka settings (default ``os.environ``).
    """

    def __init__(
        self,
        emulator_url: str,
        prompts: Sequence[str],
        *,
        bus: str,
        timeout_s: float,
        bootstrap: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(emulator_url, prompts)
        if bus not in ("memory", "kafka"):
            raise ValueError(f"bus must be 'memory' or 'kafka', got {bus!r}")
        self.bus_kind = bus
        self.key = f"aipipe-{bus}"
        self.timeout_ms = int(timeout_s * 1000)
        self.bootstrap = bootstrap
        self.env = dict(os.environ if env is None else env)
        self._pipeline: Any = None
        self._kafka_settings: Any = None
        self._run = secrets.token_hex(3)

    async def __aenter__(self) -> AipipeTarget:

        prefix = f"bench-{self._run}."
        settings = Settings.from_env(
            {
                "AIPIPE_TOPIC_PREFIX": prefix,
                "AIPIPE_EMULATE": "1",
                "AIPIPE_EMULATOR_URL": self.emulator_url,
                "AIPIPE_MAX_IN_FLIGHT": self.env.get("AIPIPE_MAX_IN_FLIGHT", ""),
            },
            env_name="production",
        )
        bus: Bus
        if self.bus_kind == "memory":
            bus = MemoryBus()
        else:
            bus = await self._kafka_bus()
        await bus.start()
        self._stack.push_async_callback(bus.stop)
        resolved = resolve_endpoints(settings, bench_config(), self.emulator_url)
        self._pipeline = await self._stack.enter_async_context(Pipeline(settings, resolved, bus))
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        self._client = PipelineClient(bus, settings.topics)
        await tg.start(self._client.run)
        self._stack.callback(self._client.stop)
        return self

    async def _kafka_bus(self) -> Any:

        self._kafka_settings = bench_kafka_settings(self.env)
        bootstrap = self.bootstrap or await self._start_embedded_broker("aipipe-bench-broker-")
        return KafkaBus(bootstrap, self._kafka_settings)

    async def call(self, index: int) -> None:
        """Publish request ``index`` and await its response.

        Raises:
            AIProviderError: the typed error of a ``status: error`` response, or
                ``ProviderTimeoutError`` when no response arrives in time.
        """
        request = AIRequest(
            id=f"b{self._run}-{index}",
            model=MODEL,
            messages=[Message(role="user", content=self.prompts[index % len(self.prompts)])],
            max_tokens=MAX_TOKENS,
            cache=_BYPASS,
            timeout_ms=self.timeout_ms,
        )
        response = await self._client.request(request)
        if response.status != "ok":
            raise error_from_response(response)

    def backlog(self) -> int:
        """Messages the stages still hold: in flight, plus not yet read from their input partitions."""
        total = 0
        for runner in self._pipeline.runners if self._pipeline is not None else ():
            total += runner.in_flight
            try:
                total += sum(runner.lag().values())
            except RuntimeError:  # a tracker changed while reading: count it as busy
                total += 1
        return total

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the stages have no backlog (requests a client gave up on still run to their end).

        Returns:
            False when a backlog is left after ``timeout_s`` (s).
        """
        with anyio.move_on_after(timeout_s):
            while self.backlog():
                await anyio.sleep(0.1)
            return True
        return False

    def info(self) -> dict[str, Any]:
        """The bus, and on Kafka the client settings that set its latency (``fetch_max_wait_ms``, ``linger_ms``)."""
        out: dict[str, Any] = {"bus": self.bus_kind}
        if self._kafka_settings is not None:
            s = self._kafka_settings
            out.update(
                fetch_max_wait_ms=s.fetch_max_wait_ms,
                linger_ms=s.linger_ms,
                partitions=s.partitions,
                acks=s.acks,
                broker="embedded (Tansu)" if self.bootstrap is None else self.bootstrap,
            )
        return out


def bench_kafka_settings(env: dict[str, str]) -> KafkaSettings:
    """The Kafka client settings of the bench's Kafka targets: ``AIPIPE_KAFKA_*`` with a 2 s session timeout.

    The short session makes the groups join fast on the embedded broker (a join is held for half of it).
    """
    merged = {"AIPIPE_KAFKA_SESSION_TIMEOUT_MS": "2000", **{k: v for k, v in env.items() if v}}
    return KafkaSettings.from_env(merged)


def bench_config() -> Any:
    """The benchmark configuration of aipipe: production preset, OpenAI (priority 1) then Cloudflare, no limits.

    Anthropic is disabled; rate limits and budgets are off, so the benchmark measures the pipeline,
    not a limit.
    """
    base = preset("production")
    providers = {}
    for name, provider in base.providers.items():
        providers[name] = msgspec.structs.replace(
            provider,
            enabled=name in ("openai", "cloudflare"),
            priority={"openai": 1, "cloudflare": 2}.get(name, 3),
            rate_limit=RateLimit(),
        )
    return msgspec.structs.replace(base, providers=providers, budget=BudgetConfig(global_daily_usd=None))
