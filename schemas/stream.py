"""Values of ``ai.stream`` (or a request's ``stream_topic``): an answer as it arrives (DESIGN A9)."""

from __future__ import annotations

from datetime import datetime

from msgspec import Struct


class FunctionDelta(Struct, kw_only=True, omit_defaults=True, frozen=True):
    """A piece of a tool call's function: its ``name`` (first piece only) and the next ``arguments`` fragment."""

    name: str | None = None
    arguments: str = ""


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """A piece of one tool call, in OpenAI's ``delta.tool_calls[]`` shape (DESIGN A4, A9).

    ``index`` is the call's 0-based position in the answer's ``tool_calls``;
    the first piece of a call carries its ``id`` (the sanitised id the caller
    sends back) and ``type: "function"``; ``function.arguments`` fragments
    concatenate to the call's JSON arguments.
    """

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta = FunctionDelta()


class StreamChunk(Struct, kw_only=True):
    """One published piece of a streamed answer, keyed by request id.

    ``seq`` counts from 0 per ``generation`` (one execution of the request; a
    redelivered request runs as a new one). ``delta`` is the new text (several
    provider deltas coalesced for at most ``stream.flush_ms``); ``provider``
    and ``model`` name who produced it; ``attempt`` is the index in the
    response's ``attempts`` of the call that produced it (``None`` for a
    cache hit, which made no call). ``cached`` marks a cache hit replayed as
    a chunk. ``tool_call_deltas`` carries pieces of tool calls (DESIGN A4),
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
    tool_call_deltas: list[ToolCallDelta] = []
    at: datetime
