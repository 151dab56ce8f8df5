"""How a process finds its broker: ``AIPIPE_KAFKA_BOOTSTRAP``, the runtime file, or a new embedded broker.

The runtime file (``$AIPIPE_HOME/broker``, default ``~/.aipipe/broker``) holds
the address of the embedded broker a running ``aipipe run`` started, so other
``aipipe`` processes share it (DESIGN A6). ``resolve_broker`` applies the rules:
``AIPIPE_KAFKA_BOOTSTRAP`` first, then a runtime-file broker that answers, then
(when allowed) a new embedded broker whose address goes into the file; only
the process that started it stops it and removes the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.bus.embedded import BrokerError, EmbeddedBroker
from pipeline.bus.kafka import broker_answers

__all__ = [
    "BrokerHandle",
    "NoBrokerError",
    "aipipe_home",
    "read_runtime_broker",
    "read_runtime_broker_async",
    "read_runtime_broker_id",
    "remove_runtime_file",
    "resolve_broker",
    "runtime_file",
    "write_runtime_file",
]

log = logging.getLogger(__name__)

NO_BROKER_MESSAGE = "no broker: start `aipipe run` or set AIPIPE_KAFKA_BOOTSTRAP"
#: Beside the runtime file: the address of the last embedded broker started here (never removed), so a
#: restarted `aipipe run` listens where long-running clients (`tail`, `serve`) already reconnect.
LAST_ADDRESS_FILE = "broker.last"


class NoBrokerError(BrokerError):
    """No broker is configured or running, and starting one was not allowed."""

    def __init__(self, message: str = NO_BROKER_MESSAGE) -> None:
        super().__init__(message)


def aipipe_home(env: Mapping[str, str]) -> Path:
    """Return aipipe's state directory: ``$AIPIPE_HOME``, else ``~/.aipipe``."""
    home = env.get("AIPIPE_HOME", "").strip()
    return Path(home).expanduser() if home else Path.home() / ".aipipe"


def runtime_file(env: Mapping[str, str]) -> Path:
    """Return the runtime file's path: ``$AIPIPE_HOME/broker`` (default ``~/.aipipe/broker``)."""
    return aipipe_home(env) / "broker"


def broker_id_file(env: Mapping[str, str]) -> Path:
    """The file beside the runtime file holding the running embedded broker's id: ``$AIPIPE_HOME/broker.id``."""
    return aipipe_home(env) / "broker.id"


def write_runtime_file(env: Mapping[str, str], address: str, broker_id: str | None = None) -> None:
    """Write ``address`` (``host:port``) to the runtime file, and ``broker_id`` to ``broker.id``, atomically.

    The id goes first, so a reader that finds the address finds its id. Creates the directory.

    Raises:
        OSError: when the directory or the file cannot be written.
    """
    path = runtime_file(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if broker_id:
        id_temporary = path.with_name(f".broker.id.{os.getpid()}.tmp")
        id_temporary.write_text(broker_id + "\n", encoding="utf-8")
        os.replace(id_temporary, broker_id_file(env))
    temporary.write_text(address + "\n", encoding="utf-8")
    os.replace(temporary, path)
    with contextlib.suppress(OSError):  # kept after exit: the next embedded broker takes the same address
        last = path.with_name(f".{LAST_ADDRESS_FILE}.{os.getpid()}.tmp")
        last.write_text(address + "\n", encoding="utf-8")
        os.replace(last, path.with_name(LAST_ADDRESS_FILE))


def _read_runtime_address(env: Mapping[str, str]) -> str | None:
    try:
        text = runtime_file(env).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.strip().splitlines()
    return lines[0].strip() if lines and lines[0].strip() else None


def read_runtime_broker_id(env: Mapping[str, str]) -> str | None:
    """The id of the embedded broker the runtime file names (``broker.id``), or ``None``."""
    try:
        text = broker_id_file(env).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text.splitlines()[0].strip() if text else None


def _answers_sync(address: str, timeout_s: float) -> bool:
    """Whether a plaintext Kafka broker at ``host:port`` answers a metadata request within ``timeout_s`` (s).

    Blocking; one raw Metadata v0 request for no particular topic, so nothing is auto-created.
    """
    host, sep, port_text = address.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        return False
    host = host.strip("[]")
    correlation_id = 0x41495050  # "AIPP"
    client_id = b"aipipe-probe"
    # Header v0: api_key 3 (Metadata), api_version 0, correlation id, client id; body: empty topic array.
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            received = b""
            while len(received) < 8:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sock.settimeout(remaining)
                chunk = sock.recv(8 - len(received))
                if not chunk:
                    return False
                received += chunk
    except (OSError, ValueError):
        return False
    size, answered_id = struct.unpack(">ii", received)
    answered: bool = size >= 4 and answered_id == correlation_id
    return answered


def read_runtime_broker(env: Mapping[str, str], timeout_s: float = 1.0) -> str | None:
    """Return the runtime file's broker address if a broker answers there within ``timeout_s`` (s).

    Blocking (at most ``timeout_s``; instant on loopback when nothing listens),
    so it can be called from synchronous code; async code may prefer
    ``read_runtime_broker_async``.

    Returns:
        The address, or ``None`` when the file is missing, empty, or names a
        broker that does not answer (a stale file is left in place).
    """
    address = _read_runtime_address(env)
    if address is None:
        return None
    if _answers_sync(address, timeout_s):
        return address
    log.debug("runtime file %s names %s, which does not answer", runtime_file(env), address)
    return None


async def read_runtime_broker_async(env: Mapping[str, str], timeout_s: float = 1.0) -> str | None:
    """Like ``read_runtime_broker``, without blocking the event loop."""
    address = _read_runtime_address(env)
    if address is None:
        return None
    if await broker_answers(address, timeout_s=timeout_s):
        return address
    log.debug("runtime file %s names %s, which does not answer", runtime_file(env), address)
    return None


def remove_runtime_file(env: Mapping[str, str], address: str) -> None:
    """Remove the runtime file, but only while it still holds ``address`` (another broker may own it now)."""
    path = runtime_file(env)
    if _read_runtime_address(env) == address:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            broker_id_file(env).unlink()


# --------------------------------------------------------------------------- resolution


class BrokerHandle:
    """The broker a process uses: its ``bootstrap`` address and, if this process started it, ``owned``.

    ``close`` stops an owned broker and removes the runtime file (only if it
    still names that broker); for a broker found elsewhere it does nothing.
    Also an async context manager.
    """

    def __init__(
        self,
        bootstrap: str,
        owned: EmbeddedBroker | None,
        env: Mapping[str, str],
        *,
        runtime_file_written: bool = True,
        broker_id: str | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.owned = owned
        self.from_runtime_file = owned is None and broker_id is None and not env.get("AIPIPE_KAFKA_BOOTSTRAP")
        self._broker_id = broker_id
        self._file_id: tuple[float, str] | None = None  # (read at, monotonic s; id) of the broker.id file
        self._env = dict(env)
        self._runtime_file_written = runtime_file_written and owned is not None

    def __repr__(self) -> str:
        return f"BrokerHandle({self.bootstrap!r}, owned={self.owned is not None})"

    @property
    def broker_id(self) -> str:
        """The identity of the broker's current run (DESIGN A11: archived records are keyed by it).

        An embedded broker this process started: its ``instance_id`` (new at
        every start, so after a rotation too); one found through the runtime
        file: the id written there (re-read each time); a configured cluster:
        ``AIPIPE_BROKER_ID``, else ``kafka:<bootstrap>``.
        """
        if self.owned is not None:
            return self.owned.instance_id
        if self._broker_id is not None:
            return self._broker_id
        if self.from_runtime_file:  # re-read at most once a second: it changes when the owner rotates it
            now = time.monotonic()
            if self._file_id is None or now - self._file_id[0] >= 1.0:
                self._file_id = (now, read_runtime_broker_id(self._env) or f"embedded:{self.bootstrap}")
            return self._file_id[1]
        return self._env.get("AIPIPE_BROKER_ID", "").strip() or f"kafka:{self.bootstrap}"

    async def __aenter__(self) -> BrokerHandle:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def forget_now(self) -> None:
        """At a hard exit (a second Ctrl-C): remove the runtime file naming a broker this process started.

        Synchronous and quick; the broker child dies with this process (``PR_SET_PDEATHSIG``).
        """
        if self.owned is not None and self._runtime_file_written:
            remove_runtime_file(self._env, self.bootstrap)

    async def close(self) -> None:
        """Stop the broker if this process started it and remove the runtime file naming it; idempotent."""
        owned, self.owned = self.owned, None
        if owned is None:
            return
        if self._runtime_file_written:
            remove_runtime_file(self._env, self.bootstrap)
        await owned.stop()


async def _start_where_last(home: Path) -> EmbeddedBroker:
    """Start the embedded broker on the port the last one here had (``broker.last``) when it is free, else any."""
    port: int | None = None
    try:
        last = (home / LAST_ADDRESS_FILE).read_text(encoding="utf-8").strip()
        port_text = last.rpartition(":")[2]
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else None
    except (OSError, UnicodeDecodeError):
        port = None
    if port is not None:
        broker = EmbeddedBroker(port=port, log_path=home / "logs" / "broker.log")
        try:
            await broker.start()
            return broker
        except BrokerError as exc:
            log.info("the embedded broker's last port %d is taken (%s); using another", port, exc)
    broker = EmbeddedBroker(log_path=home / "logs" / "broker.log")
    await broker.start()
    return broker


@contextlib.asynccontextmanager
async def _runtime_lock(env: Mapping[str, str], timeout_s: float = 30.0) -> Any:
    """Hold ``$AIPIPE_HOME/broker.lock`` so two processes do not both start a broker (POSIX; else no-op)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, accept the small race
        yield
        return
    path = aipipe_home(env) / "broker.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BrokerError(f"timed out waiting for the lock {path}") from None
                await asyncio.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def resolve_broker(
    env: Mapping[str, str],
    *,
    start_if_missing: bool,
    force_new: bool = False,
    on_new_broker: Callable[[EmbeddedBroker], Awaitable[None]] | None = None,
) -> BrokerHandle:
    """Find the broker to use (DESIGN A6).

    In order: ``AIPIPE_KAFKA_BOOTSTRAP`` when set (not probed: the bus retries
    at start); else the broker named in the runtime file, when it answers
    within about 1 s; else, if ``start_if_missing``, a new embedded broker
    whose address is written to the runtime file (its output goes to
    ``$AIPIPE_HOME/logs/broker.log``). A lock file keeps two processes from
    both starting one.

    Args:
        env: the environment (``AIPIPE_KAFKA_BOOTSTRAP``, ``AIPIPE_HOME``).
        start_if_missing: whether to start an embedded broker when none is found.
        force_new: start a private embedded broker whatever the environment
            says (``aipipe demo``); the runtime file is neither read nor written.
        on_new_broker: awaited with a new (shared) embedded broker before its
            address goes into the runtime file, so no other process sees it
            before it is ready (``aipipe run`` restores the archive there).

    Returns:
        A handle; ``close()`` it when done (it stops the broker only if it started it).

    Raises:
        NoBrokerError: with "no broker: start `aipipe run` or set
            AIPIPE_KAFKA_BOOTSTRAP", when none is found and starting is not allowed.
        BrokerError: when the embedded broker cannot be started.
    """
    home = aipipe_home(env)
    if force_new:
        broker = EmbeddedBroker(log_path=home / "logs" / "broker-private.log")
        await broker.start()
        return BrokerHandle(broker.address, broker, env, runtime_file_written=False)
    bootstrap = env.get("AIPIPE_KAFKA_BOOTSTRAP", "").strip()
    if bootstrap:
        return BrokerHandle(bootstrap, None, env)
    found = await read_runtime_broker_async(env)
    if found is not None:
        return BrokerHandle(found, None, env)
    if not start_if_missing:
        raise NoBrokerError()
    async with _runtime_lock(env):
        found = await read_runtime_broker_async(env)  # someone may have started one while we waited
        if found is not None:
            return BrokerHandle(found, None, env)
        broker = await _start_where_last(home)
        try:
            if on_new_broker is not None:
                await on_new_broker(broker)
            write_runtime_file(env, broker.address, broker.instance_id)
        except BaseException:
            await broker.stop()
            raise
    log.info("started the embedded broker at %s (runtime file %s)", broker.address, runtime_file(env))
    return BrokerHandle(broker.address, broker, env)
