"""Running the emulator: in the caller's event loop (``EmulatorServer``) or as a process (``serve_forever``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from pipeline.emulator.app import create_app
from pipeline.emulator.spec import FaultProfile, Provider, load_profile
from pipeline.emulator.state import CallRecord, EmulatorState, FaultController
from pipeline.runtime.asgi import InLoopServer, bind_tcp, url_of

#: Port ``aipipe emulator`` listens on by default.
DEFAULT_PORT = 8900
#: How long ``start`` waits for the server to listen (s).
START_TIMEOUT_S = 10.0
#: How long uvicorn waits for in-flight calls at shutdown before cancelling them (s).
GRACEFUL_SHUTDOWN_S = 2
#: How long an idle keep-alive connection stays open (s).
KEEP_ALIVE_S = 75


def emulator_env(url: str) -> dict[str, str]:
    """Environment variables pointing every provider at the emulator at ``url`` (SDK conventions, DESIGN A7).

    Args:
        url: the emulator root, e.g. ``http://127.0.0.1:8900`` (a trailing ``/`` is ignored).

    Returns:
        ``{"OPENAI_BASE_URL": url + "/v1", "ANTHROPIC_BASE_URL": url,
        "CLOUDFLARE_BASE_URL": url + "/client/v4"}``.
    """
    root = url.rstrip("/")
    return {
        "OPENAI_BASE_URL": f"{root}/v1",
        "ANTHROPIC_BASE_URL": root,
        "CLOUDFLARE_BASE_URL": f"{root}/client/v4",
    }


class _UvicornServer(uvicorn.Server):
    """uvicorn server that ends held and hanging calls when it shuts down."""

    def __init__(self, config: uvicorn.Config, state: EmulatorState) -> None:
        super().__init__(config)
        self.emulator_state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.emulator_state.stopping.set()
        await super().shutdown(sockets=sockets)


class _InLoopServer(_UvicornServer, InLoopServer):
    """The emulator's server, leaving the caller's signal handlers (Ctrl-C) alone."""


def _config(state: EmulatorState, *, log_config: bool) -> uvicorn.Config:
    kwargs: dict[str, Any] = {} if log_config else {"log_config": None}
    return uvicorn.Config(
        create_app(state),
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # Longer than clients keep idle connections (aiohttp 15 s, httpx 5 s): with uvicorn's 5 s, a
        # client could reuse a connection the server was closing and get a reset (``aipipe bench``).
        timeout_keep_alive=KEEP_ALIVE_S,
        **kwargs,
    )


class EmulatorServer:
    """The provider emulator on a loopback port, running as a task in the caller's event loop.

    Use as ``async with EmulatorServer() as emu:`` then point clients at
    ``emulator_env(emu.url)``. Control it with ``emu.faults`` (a
    ``FaultController``), ``emu.calls()``, ``emu.reset()``, ``emu.hold()``,
    ``emu.release()`` and ``await emu.wait_for_calls()``, or over HTTP at
    ``{url}/_emulator/...`` (see ``pipeline.emulator.app``).

    Args:
        host: interface to listen on (loopback by default).
        port: TCP port; 0 picks a free one (read it from ``url`` after ``start``).
        profile: fault profile to start with (``pipeline.emulator.spec``); ``reset`` returns to it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, profile: FaultProfile | None = None) -> None:
        self.host = host
        self.port = port
        self.state = EmulatorState(profile)
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:43117``.

        Raises:
            RuntimeError: before ``start``.
        """
        if self._url is None:
            raise RuntimeError("EmulatorServer is not started")
        return self._url

    @property
    def env(self) -> dict[str, str]:
        """``emulator_env(self.url)``: the provider base-URL variables."""
        return emulator_env(self.url)

    @property
    def faults(self) -> FaultController:
        """The live fault rules (``set``, ``schedule``, ``load``, ``clear``, ``profile``)."""
        return self.state.faults

    async def start(self) -> None:
        """Bind the port and serve in a background task; returns once the server listens.

        Raises:
            RuntimeError: when already started, or the server failed to start within 10 s.
            OSError: when the port cannot be bound.
        """
        if self._task is not None:
            raise RuntimeError("EmulatorServer is already started")
        sock = bind_tcp(self.host, self.port)
        self.state.stopping.clear()
        server = _InLoopServer(_config(self.state, log_config=False), self.state)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="aipipe-emulator")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not server.started:
            if task.done():
                sock.close()
                exc = task.exception()
                raise RuntimeError(f"emulator failed to start: {exc!r}") from exc
            if loop.time() > deadline:
                server.should_exit = True
                task.cancel()
                sock.close()
                raise RuntimeError(f"emulator did not start within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.005)
        self._server, self._task, self._sock = server, task, sock
        self._url = url_of(self.host, sock)

    async def stop(self) -> None:
        """Stop serving: held and hanging calls end, in-flight calls get up to 2 s, then the port closes."""
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        self._url = None
        if server is None or task is None:
            return
        self.state.stopping.set()
        self.state.release()
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=GRACEFUL_SHUTDOWN_S + 5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            if sock is not None:
                sock.close()

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- control, delegated to the shared state ---

    def calls(self, provider: Provider | None = None) -> list[CallRecord]:
        """Calls received so far, oldest first (of one provider, or all)."""
        return self.state.calls(provider)

    def counts(self) -> dict[str, int]:
        """Calls received per provider."""
        return self.state.counts()

    def clear_calls(self) -> None:
        """Forget the call log (faults and holds are kept)."""
        self.state.clear_calls()

    def reset(self) -> None:
        """Empty call log, holds released, faults back to the start profile."""
        self.state.reset()

    def hold(self, n: int, provider: Provider | None = None) -> None:
        """Keep calls (to ``provider``, or any) waiting until ``n`` have arrived or ``release()``.

        Raises:
            ValueError: when ``n < 1``.
        """
        self.state.hold(n, provider)

    def release(self) -> int:
        """Let held calls go on now; returns how many were held."""
        return self.state.release()

    async def wait_for_calls(
        self, n: int, provider: Provider | None = None, *, timeout_s: float = 5.0, finished: bool = False
    ) -> list[CallRecord]:
        """Wait until ``n`` calls (to ``provider``, or any) arrived (or, with ``finished``, were answered).

        Raises:
            TimeoutError: when they did not within ``timeout_s`` (s).
        """
        return await self.state.wait_for_calls(n, provider, timeout_s=timeout_s, finished=finished)


def serve_forever(host: str = "127.0.0.1", port: int = DEFAULT_PORT, profile_path: str | Path | None = None) -> None:
    """Serve the emulator in this process until SIGINT/SIGTERM (``aipipe emulator``).

    Returns normally after Ctrl-C (SIGINT); SIGTERM ends the process the default
    way once the server has shut down (uvicorn re-raises the signal). Prints one line with the URL once listening, e.g.
    ``aipipe emulator listening on http://127.0.0.1:8900``.

    Args:
        host: interface to listen on.
        port: TCP port (0: a free one, printed).
        profile_path: a TOML fault profile loaded at start (``pipeline.emulator.spec``).

    Raises:
        OSError: when the port cannot be bound or the profile cannot be read.
        msgspec.ValidationError: when the profile is invalid (with the field's path).
    """
    profile = load_profile(profile_path) if profile_path is not None else None
    state = EmulatorState(profile)
    sock = bind_tcp(host, port)
    server = _UvicornServer(_config(state, log_config=True), state)
    print(f"aipipe emulator listening on {url_of(host, sock)}", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it handled; Ctrl-C is a normal way to stop
    finally:
        sock.close()
