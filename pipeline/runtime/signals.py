"""Ctrl-C and SIGTERM for long-running commands: the first drains, a second stops at once.

The first SIGINT or SIGTERM calls ``drain`` (stop fetching, finish in-flight
work, commit, leave the group). A second one while draining prints one line
and ends the process at once with exit code 130, without a traceback from
any library (uvicorn, aiokafka) and without waiting for the drain window:
work not committed is taken again by the next owner of its partitions
(at-least-once delivery).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import anyio

log = logging.getLogger("aipipe.signals")

#: Exit code of a second interrupt (128 + SIGINT), as shells report an interrupted command.
EXIT_INTERRUPTED = 130

#: What must still happen when a second signal ends the process at once (e.g. remove the runtime file).
_AT_HARD_EXIT: list[Callable[[], None]] = []


def at_hard_exit(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` (quick, synchronous) if a second signal ends the process; returns its remover."""
    _AT_HARD_EXIT.append(callback)

    def remove() -> None:
        if callback in _AT_HARD_EXIT:
            _AT_HARD_EXIT.remove(callback)

    return remove


async def drain_on_signal(drain: Callable[[], None], what: str = "in-flight work") -> None:
    """Wait for SIGINT/SIGTERM: the first calls ``drain``, a second ends the process at once.

    Run it in a task group beside the work; cancel it when the work is done.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        draining = False
        async for sig in signals:
            name = signal.Signals(sig).name
            if not draining:
                draining = True
                log.info("received %s: finishing %s (press Ctrl-C again to stop at once)", name, what)
                drain()
                continue
            print(f"aipipe: received {name} again: stopping at once; uncommitted work is redone", file=sys.stderr)
            sys.stderr.flush()
            for callback in list(_AT_HARD_EXIT):
                try:
                    callback()
                except Exception:
                    pass
            logging.shutdown()
            os._exit(EXIT_INTERRUPTED)
