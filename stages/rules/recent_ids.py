"""Recent ids: a de-duplication memory bounded by a window of stream time and by a count.

Stages that must act once per request id (the cost-recorder writes one cost
event, the budget ledger settles one cost) remember the ids they handled. The
memory is bounded by configuration, never by traffic:

* **by time**: ids are kept in two generations, each covering ``window_s``
  seconds of the *stream's* clock (the newest event time seen so far: ``at`` of
  the cost events), not the wall clock. An id is remembered for at least
  ``window_s`` and at most ``2 * window_s`` of stream time. A record can come
  back only while its offset is uncommitted: at most the messages in flight
  when a replica stopped, seconds apart in stream time however long the
  restart takes (the clock stands still while nothing is written);
* **by count**: a generation holds at most ``max_ids // 2`` ids; a full one
  starts the next early, so at most ``max_ids`` are held (about 120 bytes each
  in a ``dict``, plus its value) and an id is remembered for at least the next ``max_ids // 2``.

Each id may carry a value of bytes (the cost-recorder keeps the response it
sent). Generations are plain ``dict``s of strings to bytes rather than an
expiring map with a node per entry: such a dict is not tracked by the garbage
collector,
whose full passes over 100,000+ tracked nodes cut the pipeline's throughput by
a quarter (``bench/memory_growth.py``: 100,000 requests in 246 s with
``cachetools.TTLCache``, 190 s with plain containers).

What happens to an id that comes back after it was forgotten is the caller's
rule, stated where it is used (``stages.recorder``, ``stages.rules.ledger``).
"""

from __future__ import annotations

from pipeline.runtime.settings import DEFAULT_DEDUP_MAX_IDS, DEFAULT_DEDUP_WINDOW_S


class RecentIds:
    """Ids added within the last ``window_s`` (at least) seconds of stream time, at most ``max_ids`` of them.

    Args:
        window_s: how long an id is remembered at least (s of stream time), > 0.
        max_ids: most ids held, >= 2.

    Raises:
        ValueError: for a window that is not positive or fewer than 2 ids.
    """

    def __init__(self, window_s: float = DEFAULT_DEDUP_WINDOW_S, max_ids: int = DEFAULT_DEDUP_MAX_IDS) -> None:
        if not window_s > 0 or max_ids < 2:
            raise ValueError(f"window_s must be > 0 and max_ids >= 2, got {window_s} and {max_ids}")
        self.window_s = window_s
        self.max_ids = max_ids
        self._per_generation = max_ids // 2
        self._clock = 0.0
        self._started: float | None = None  # stream time the current generation began
        self._current: dict[str, bytes] = {}
        self._previous: dict[str, bytes] = {}

    @property
    def clock(self) -> float:
        """The stream clock: the newest ``at`` seen (Unix s; 0 before the first id)."""
        return self._clock

    def add(self, item: str, at_s: float, value: bytes = b"") -> None:
        """Remember ``item`` (with ``value``), seen at ``at_s`` (Unix s); the clock moves to ``at_s`` if newer."""
        if at_s > self._clock:
            self._clock = at_s
        if self._started is None:
            self._started = self._clock
        elapsed = self._clock - self._started
        if elapsed >= self.window_s or len(self._current) >= self._per_generation:
            # the current generation is done: it becomes the previous one, unless the stream moved on
            # by two windows since it began (then nothing in it is within the window any more)
            self._previous = self._current if elapsed < 2 * self.window_s else {}
            self._current = {}
            self._started = self._clock
        self._current[item] = value

    def get(self, item: str) -> bytes | None:
        """The value ``item`` was added with, or ``None`` when it is not remembered."""
        found = self._current.get(item)
        return found if found is not None else self._previous.get(item)

    def __contains__(self, item: object) -> bool:
        return item in self._current or item in self._previous

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
