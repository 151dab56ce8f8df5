"""Serving an ASGI app (the emulator, ``aipipe serve``) with uvicorn inside the caller's event loop."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator

import uvicorn


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one), ready for ``uvicorn.Server.serve``.

    ``IPPROTO_TCP`` is given explicitly: asyncio turns ``TCP_NODELAY`` on for
    accepted connections only when the socket's ``proto`` says TCP
    (``asyncio.base_events._set_nodelay``); with the default 0, Nagle's
    algorithm and the client's delayed ACK held each keep-alive answer ~40 ms
    (h11 writes the head and the body separately). Measured with ``aipipe
    bench``: sequential calls 44 ms -> 0.4 ms.

    Raises:
        OSError: when the address cannot be bound (in use, not local).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def url_of(host: str, sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (IPv6 hosts in brackets)."""
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class InLoopServer(uvicorn.Server):
    """uvicorn server that leaves the process's signal handlers (Ctrl-C) to its owner."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install nothing: the embedding program handles signals."""
        yield
