"""Values of ``ai.stream`` (or a request's ``stream_topic``): an answer as it arrives (DESIGN A9)."""

from __future__ import annotations

from datetime import datetime

from msgspec import Struct


class StreamChunk(Struct, kw_only=True):
    """One published piece of a streamed answer, keyed by request id.

    ``seq`` counts from 0 per ``generation`` (one execution of the request; a
    redelivered request runs as a new one). ``delta`` is the new text (several
    provider deltas coalesced for at most ``stream.flush_ms``); ``provider``
    and ``model`` name who produced it; ``attempt`` is the index in the
    response's ``attempts`` of the call that produced it (``None`` for a
    cache hit, which made no call). ``cached`` marks a cache hit replayed as
    a chunk. ``tool_call_deltas`` is reserved for tool calls (DESIGN A4) and
    empty for text.
    """

    id: str
    seq: int
    generation: str
    delta: str
    provider: str | None = None
    model: str | None = None
    attempt: int | None = None
    cached: bool = False
    tool_call_deltas: list[dict[str, object]] = []
    at: datetime
