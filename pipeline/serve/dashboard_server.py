"""``aipipe dashboard``: the operator dashboard alone, a client of the broker the stages run on (DESIGN A12).

It needs a broker (``AIPIPE_KAFKA_BOOTSTRAP``, or the one ``aipipe run``
started, found through the runtime file): the dashboard only reads topics.
The page is at ``http://HOST:PORT/dashboard/``; ``/`` redirects there.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping

import anyio
import anyio.abc
import uvicorn
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route

from pipeline.assembly.process import load_config, open_bus
from pipeline.bus.discovery import read_runtime_broker_async
from pipeline.bus.protocol import BusError
from pipeline.runtime.asgi import InLoopServer, bind_tcp, url_of
from pipeline.runtime.settings import Settings
from pipeline.runtime.signals import drain_on_signal
from pipeline.serve.dashboard import open_dashboard
from pipeline.serve.keys import ServeConfigError, api_keys_for

__all__ = ["DEFAULT_DASHBOARD_PORT", "run_dashboard", "serve_dashboard", "stop_dashboard"]

#: Default port of ``aipipe dashboard`` (``aipipe serve`` serves the page on its own port).
DEFAULT_DASHBOARD_PORT = 8001


async def run_dashboard(
    env: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_DASHBOARD_PORT,
) -> None:
    """Serve the dashboard until SIGINT/SIGTERM.

    Args:
        env: the environment (``AIPIPE_*``).
        host: interface to listen on.
        port: TCP port (0: a free one; the address is printed on stderr).

    Raises:
        ServeConfigError: an invalid ``AIPIPE_API_KEYS``, production without it, or the port cannot be bound.
        BusError: when no broker is configured or running, or it does not answer.
    """
    settings = Settings.from_env(env)
    if settings.env_name == "production" and settings.api_keys_path is None:
        raise ServeConfigError(
            "refusing to serve an open dashboard in production: set AIPIPE_API_KEYS to a TOML file "
            'with an [operators] table ("<operator key>" = "<name>")'
        )
    keys = api_keys_for(settings)
    if not settings.kafka_bootstrap and await read_runtime_broker_async(env) is None:
        raise BusError("no broker to read: start the stages first (`aipipe run`) or set AIPIPE_KAFKA_BOOTSTRAP")
    config = load_config(settings)
    try:
        sock = bind_tcp(host, port)
    except OSError as exc:
        raise ServeConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    async with open_bus("kafka", env, start_broker=False) as opened, anyio.create_task_group() as tg:
        feed, dashboard = open_dashboard(opened.bus, settings.topics, config, keys, env, bootstrap=opened.bootstrap)
        await tg.start(feed.run)
        server, url = await serve_dashboard(tg, dashboard, sock)
        stopping = anyio.Event()
        tg.start_soon(drain_on_signal, stopping.set, "the dashboard")
        open_note = " (open: no AIPIPE_API_KEYS, development only)" if keys is None else ""
        print(
            f"aipipe dashboard: {url}/dashboard/{open_note} reading {opened.bootstrap}; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        await stopping.wait()
        await stop_dashboard(server)
        tg.cancel_scope.cancel()


async def serve_dashboard(
    tg: anyio.abc.TaskGroup, dashboard: Starlette, sock: socket.socket
) -> tuple[InLoopServer, str]:
    """Serve ``dashboard`` at ``/dashboard`` (``/`` redirects there) on the bound ``sock`` in ``tg``.

    Returns:
        The server (stop it with ``stop_dashboard``) and its root URL, ``http://host:port``.
    """
    app = Starlette(
        routes=[
            Route("/", lambda _request: RedirectResponse("/dashboard/", status_code=307)),
            Mount("/dashboard", app=dashboard),
        ]
    )
    server = InLoopServer(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off", http="h11")
    )
    tg.start_soon(server.serve, [sock])
    host = sock.getsockname()[0]
    return server, url_of(host, sock)


async def stop_dashboard(server: InLoopServer, timeout_s: float = 2.0) -> None:
    """Ask ``server`` to exit and wait up to ``timeout_s`` (s); open event streams end with it."""
    server.should_exit = True
    with anyio.move_on_after(timeout_s):
        while server.started:
            await anyio.sleep(0.05)
