"""Running ``aipipe serve``: the endpoint over a started ``AIProviderManager``, in the caller's event loop.

The server is a client of the pipeline: with a broker (``AIPIPE_KAFKA_BOOTSTRAP``
or a live runtime file) it publishes to the stages running there; without one
its ``AIProviderManager`` runs every stage in-process on the in-process bus.
Without ``AIPIPE_API_KEYS`` the endpoint is open and logs a warning; in
``production`` it refuses to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sys
from collections.abc import Mapping
from types import TracebackType

import anyio
import uvicorn

from pipeline.assembly.process import BusKind
from pipeline.bus.discovery import read_runtime_broker_async
from pipeline.client.manager import AIProviderManager, create_ai_provider_manager
from pipeline.errors import ProviderTimeoutError
from pipeline.runtime.asgi import InLoopServer, bind_tcp
from pipeline.runtime.settings import Settings
from pipeline.runtime.signals import drain_on_signal
from pipeline.serve.dashboard import open_dashboard
from pipeline.serve.endpoint import ServeState, create_app
from pipeline.serve.keys import ApiKeys, ServeConfigError, api_keys_for
from schemas.request import AIRequest
from schemas.response import AIResponse

log = logging.getLogger("aipipe.serve")

#: Defaults of ``aipipe serve``.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
#: How long shutdown waits for in-flight calls before cancelling them (s).
GRACEFUL_SHUTDOWN_S = 10
#: How long ``OpenAIServer.start`` waits for the socket to listen (s).
START_TIMEOUT_S = 10.0


def _bind(host: str, port: int) -> socket.socket:
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise ServeConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


class OpenAIServer:
    """The OpenAI-compatible endpoint over a started ``AIProviderManager``, in the caller's event loop.

    Use as ``async with manager, OpenAIServer(manager) as server:`` and point the
    SDK at ``server.base_url``. Client keys come from ``AIPIPE_API_KEYS`` in the
    manager's environment (``api_keys_for``); an open endpoint logs a warning.
    The operator dashboard is served at ``/dashboard`` (``dashboard_url``), its
    readers of the topics running while the server runs.

    Args:
        manager: a started manager (its ``client`` answers, its ``config`` lists the models).
        host: interface to listen on.
        port: TCP port; 0 picks a free one (read ``url`` after ``start``).
        graceful_shutdown_s: how long ``stop`` lets in-flight calls finish (s).
    """

    def __init__(
        self,
        manager: AIProviderManager,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        graceful_shutdown_s: int = GRACEFUL_SHUTDOWN_S,
    ) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.graceful_shutdown_s = graceful_shutdown_s
        self.api_keys: ApiKeys | None = None
        self._feed_task: asyncio.Task[None] | None = None
        self._server: InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:8000``.

        Raises:
            RuntimeError: before ``start``.
        """
        if self._url is None:
            raise RuntimeError("OpenAIServer is not started")
        return self._url

    @property
    def dashboard_url(self) -> str:
        """The operator dashboard: ``url + "/dashboard/"``."""
        return f"{self.url}/dashboard/"

    @property
    def base_url(self) -> str:
        """The SDK's ``base_url``: ``url + "/v1"``."""
        return f"{self.url}/v1"

    async def _ask(self, request: AIRequest) -> AIResponse:
        client = self.manager.client
        # The client waits timeout_ms + slack for the answer; this outer limit also bounds the publish.
        limit_s = (request.timeout_ms + client.slack_ms) / 1000 + 1.0
        try:
            with anyio.fail_after(limit_s):
                return await client.request(request)
        except TimeoutError:
            raise ProviderTimeoutError(
                f"no response for request {request.id} within {limit_s:.1f}s", request_id=request.id
            ) from None

    async def start(self) -> None:
        """Check the client keys, bind the port and serve in a background task; returns once listening.

        Raises:
            ServeConfigError: invalid key file, production without keys, or the port cannot be bound.
            RuntimeError: when already started or the server did not start within 10 s.
        """
        if self._task is not None:
            raise RuntimeError("OpenAIServer is already started")
        self.api_keys = api_keys_for(self.manager.settings)
        sock = _bind(self.host, self.port)
        client = self.manager.client
        name = re.sub(r"[^A-Za-z0-9._-]", "-", f"serve-{socket.gethostname()}-{sock.getsockname()[1]}")
        client.stream_topic = f"{client.topics.stream}.{name}"[:249]  # this replica reads only its own chunks
        feed, dashboard = open_dashboard(
            client.bus,
            client.topics,
            self.manager.config,
            self.api_keys,
            self.manager.env,
            bootstrap=self.manager.bootstrap,
        )
        self._feed_task = asyncio.create_task(feed.run(), name="aipipe-dashboard-feed")
        app = create_app(
            ServeState(
                ask=self._ask,
                config=self.manager.config,
                api_keys=self.api_keys,
                stream=client.stream,
                dashboard=dashboard,
            )
        )
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=self.graceful_shutdown_s,
        )
        server = InLoopServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="aipipe-serve")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not server.started:
            if task.done():
                sock.close()
                exc = task.exception()
                raise RuntimeError(f"aipipe serve failed to start: {exc!r}") from exc
            if loop.time() > deadline:
                server.should_exit = True
                task.cancel()
                sock.close()
                raise RuntimeError(f"aipipe serve did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.005)
        self._server, self._task, self._sock = server, task, sock
        port = sock.getsockname()[1]
        self._url = f"http://[{self.host}]:{port}" if ":" in self.host else f"http://{self.host}:{port}"
        if self.api_keys is None:
            log.warning(
                "AIPIPE_API_KEYS is not set: %s/v1 is open to anyone who can reach it (development only)", self._url
            )
        else:
            log.info("serving %s/v1 for %d client keys", self._url, len(self.api_keys))

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish (up to ``graceful_shutdown_s``), close the port."""
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        self._url = None
        feed_task, self._feed_task = self._feed_task, None
        if feed_task is not None:
            feed_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed_task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.graceful_shutdown_s + 5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if sock is not None:
                sock.close()

    async def __aenter__(self) -> OpenAIServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve_bus_kind(settings: Settings, env: Mapping[str, str]) -> BusKind:
    """``kafka`` when a broker is configured or the runtime file names a live one, else ``memory``."""
    if settings.kafka_bootstrap or await read_runtime_broker_async(env) is not None:
        return "kafka"
    return "memory"


async def run_server(env: Mapping[str, str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """``aipipe serve``: run the endpoint until SIGINT/SIGTERM, then finish in-flight calls and stop.

    With a broker the server is a client of the stages running there; without
    one it runs every stage in-process on the in-process bus.

    Raises:
        ServeConfigError: invalid ``AIPIPE_API_KEYS``, production without it, or the port is taken.
        BusError: when the broker does not answer.
    """
    settings = Settings.from_env(env)
    api_keys_for(settings)  # fail before starting anything
    kind = await serve_bus_kind(settings, env)
    manager = create_ai_provider_manager(settings.env_name, env, bus=kind)
    stopping = anyio.Event()
    async with anyio.create_task_group() as signals:  # watching until the server and manager have closed
        signals.start_soon(drain_on_signal, stopping.set, "in-flight calls")
        async with manager, OpenAIServer(manager, host=host, port=port) as server:
            where = f"broker {manager.bootstrap}" if manager.pipeline is None else "in-process stages"
            print(
                f"aipipe serve: {server.base_url} ({where}; streamed chunks on {manager.client.stream_topic}; "
                f"operator dashboard {server.dashboard_url}; Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )
            await stopping.wait()
        signals.cancel_scope.cancel()
