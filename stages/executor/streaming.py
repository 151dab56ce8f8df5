"""One streamed attempt: read a provider's deltas under the stream time limits and publish them as chunks.

DESIGN A9. The first content delta of a generation is published at once;
later ones are coalesced and published at most ``flush_ms`` after the
previous chunk. Until an attempt's first delta only its first-chunk timeout
applies (a failure then is an ordinary failure the chain falls back from,
invisible to the reader); after it, the idle timeout (the longest gap
between deltas), the request's deadline and the stream's maximum duration.
Protocol keep-alives never reach this module (the adapters yield content
deltas only). A ``cancel_request`` stops the read at once; leaving the
adapter's iterator closes the HTTP response, so the provider stops generating.

Tool calls (DESIGN A4) stream as ``tool_call_deltas`` on the chunks, in
OpenAI's ``delta.tool_calls`` shape with a 0-based ``index`` per call: the
first piece of a call carries its id and name, later pieces fragments of its
arguments (consecutive fragments of one call are joined within a flush
window). They count as content: the first one is published at once, and the
calls assembled from them are the answer's ``tool_calls``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio

from pipeline.errors import AIProviderError, ProviderTimeoutError
from schemas.envelope import OutcomePart
from schemas.request import FunctionCall, ToolCall
from schemas.response import Usage
from schemas.stream import FunctionDelta, StreamChunk, ToolCallDelta
from stages.providers.base import StreamDelta, StreamEnd, StreamEvent, StreamToolDelta
from stages.rules.tokens import estimate_tokens
from stages.rules.tool_ids import synthesized_tool_call_id

#: How long (s) a chunk's publish may go on after its stream was stopped or cancelled (a shutdown): long
#: enough for a broker's acknowledgement, short enough that a broker outage never holds the process.
CHUNK_PUBLISH_SHIELD_S = 5.0

#: Why an attempt's stream stopped.
StopReason = Literal[
    "complete", "provider_error", "first_chunk_timeout", "idle_timeout", "deadline", "max_duration", "cancelled"
]


@dataclass
class StreamRun:
    """One execution (``generation``) of a streamed request, across its attempts.

    ``text`` is what has been published so far (every attempt's part joined),
    ``seq`` the next chunk's number, ``parts`` what each attempt generated
    (one cost line each). Times: ``flush_s``, ``idle_timeout_s`` in s;
    ``ends_at`` is a ``time.monotonic()`` instant (the deadline or the
    maximum duration, whichever comes first) and ``ends_by`` names it.
    """

    request_id: str
    topic: str
    generation: str
    flush_s: float
    idle_timeout_s: float
    resume: bool
    ends_at: float
    ends_by: Literal["deadline", "max_duration"]
    text: str = ""
    seq: int = 0
    parts: list[OutcomePart] = field(default_factory=list)
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    unsettled: OutcomePart | None = None
    calls: dict[int, list[str]] = field(default_factory=dict)  # tool call index -> [id, name, arguments]

    def add_tool_delta(self, delta: StreamToolDelta) -> None:
        """Fold one tool-call piece into the calls being assembled."""
        call = self.calls.setdefault(delta.index, ["", "", ""])
        if delta.id:
            call[0] = delta.id
        if delta.name:
            call[1] = delta.name
        call[2] += delta.arguments

    def tool_calls(self) -> list[ToolCall] | None:
        """The tool calls assembled so far, by index (``None`` when there are none)."""
        if not self.calls:
            return None
        return [
            ToolCall(
                id=cid or synthesized_tool_call_id(name, args, i, self.request_id),
                function=FunctionCall(name=name, arguments=args or "{}"),
            )
            for i, (cid, name, args) in sorted(self.calls.items())
        ]

    def attempt_parts(self, provider: str) -> list[OutcomePart]:
        """The parts ``provider`` generated (for its budget's settlement)."""
        return [p for p in self.parts if p.provider == provider]

    @property
    def started(self) -> bool:
        """Whether a chunk has been published (the reader has seen text)."""
        return self.seq > 0

    def chunk(
        self,
        delta: str,
        provider: str,
        model: str,
        attempt: int,
        at: object,
        tool_call_deltas: list[ToolCallDelta] | None = None,
    ) -> StreamChunk:
        """The next chunk of this generation (``seq`` advances)."""
        chunk = StreamChunk(
            id=self.request_id,
            seq=self.seq,
            generation=self.generation,
            delta=delta,
            provider=provider,
            model=model,
            attempt=attempt,
            tool_call_deltas=tool_call_deltas or [],
            at=at,  # type: ignore[arg-type]
        )
        self.seq += 1
        return chunk


@dataclass
class AttemptStream:
    """What one streamed attempt produced: its ``text``, how it stopped, its end or error, its timings (ms)."""

    text: str = ""
    stop: StopReason = "complete"
    end: StreamEnd | None = None
    error: AIProviderError | None = None
    first_chunk_ms: float | None = None
    chunks: int = 0
    tool_deltas: int = 0

    @property
    def produced(self) -> bool:
        """Whether the attempt generated anything: text or tool-call pieces."""
        return bool(self.text) or self.tool_deltas > 0


async def read_stream(
    run: StreamRun,
    events: AsyncIterator[StreamEvent],
    *,
    provider: str,
    model: str,
    attempt: int,
    first_chunk_timeout_s: float,
    publish: Callable[[StreamChunk], Awaitable[None]],
    now: Callable[[], object],
) -> AttemptStream:
    """Read ``events`` to their end, a failure, a time limit or a cancellation, publishing chunks.

    Args:
        run: the generation's state (its text and ``seq`` advance).
        events: the adapter's ``stream()`` iterator; it is closed on return.
        provider: deployment name put on the chunks.
        model: model put on the chunks (the one asked for).
        attempt: index in ``attempts`` of this call, put on the chunks.
        first_chunk_timeout_s: how long (s) to wait for this attempt's first delta.
        publish: publishes one chunk (awaits the broker's acknowledgement).
        now: the clock for the chunks' ``at``.

    Returns:
        The attempt's text and how it stopped; never raises a provider error
        (it is in ``error``, with ``stop`` ``provider_error``).
    """
    out = AttemptStream()
    started = time.monotonic()
    buffer: list[str | StreamToolDelta] = []
    pending = anyio.Event()
    last_flush = [0.0]

    async def flush() -> None:
        if not buffer:
            return
        text = "".join(item for item in buffer if isinstance(item, str))
        tools = merged_tool_deltas([item for item in buffer if isinstance(item, StreamToolDelta)])
        buffer.clear()
        chunk = run.chunk(text, provider, model, attempt, now(), tools)
        out.chunks += 1
        last_flush[0] = time.monotonic()
        with anyio.move_on_after(CHUNK_PUBLISH_SHIELD_S, shield=True):
            await publish(chunk)

    async def flusher() -> None:
        nonlocal pending
        while True:
            await pending.wait()
            pending = anyio.Event()
            await anyio.sleep(max(0.0, last_flush[0] + run.flush_s - time.monotonic()))
            await flush()

    iterator = events.__aiter__()
    try:
        async with anyio.create_task_group() as tg:
            reading = anyio.CancelScope()

            async def watch_cancel() -> None:
                await run.cancelled.wait()
                reading.cancel()

            tg.start_soon(flusher)
            tg.start_soon(watch_cancel)
            with reading:
                await _read(run, iterator, out, started, first_chunk_timeout_s, buffer, flush, lambda: pending.set())
            if run.cancelled.is_set():
                out.stop = "cancelled"
            tg.cancel_scope.cancel()
        await flush()
    finally:
        with anyio.move_on_after(CHUNK_PUBLISH_SHIELD_S, shield=True):
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass
    return out


async def _read(
    run: StreamRun,
    iterator: AsyncIterator[StreamEvent],
    out: AttemptStream,
    started: float,
    first_chunk_timeout_s: float,
    buffer: list[str | StreamToolDelta],
    flush: Callable[[], Awaitable[None]],
    wake: Callable[[], None],
) -> None:
    """The read loop of ``read_stream``: one event at a time, each under the limit that applies now."""
    while True:
        left = run.ends_at - time.monotonic()
        gap = first_chunk_timeout_s if out.first_chunk_ms is None else run.idle_timeout_s
        limit = min(gap, left)
        if limit <= 0:
            out.stop = run.ends_by
            return
        with anyio.move_on_after(limit) as waited:
            try:
                item = await iterator.__anext__()
            except StopAsyncIteration:
                out.stop, out.error = "provider_error", None
                return
            except AIProviderError as exc:
                out.stop, out.error = "provider_error", exc
                return
        if waited.cancelled_caught:
            if gap <= left:
                out.stop = "first_chunk_timeout" if out.first_chunk_ms is None else "idle_timeout"
            else:
                out.stop = run.ends_by
            return
        if isinstance(item, StreamEnd):
            out.end = item
            out.stop = "complete"
            return
        if isinstance(item, StreamToolDelta):
            run.add_tool_delta(item)
            out.tool_deltas += 1
            buffer.append(item)
        elif not isinstance(item, StreamDelta) or not item.text:
            continue
        else:
            out.text += item.text
            run.text += item.text
            buffer.append(item.text)
        if out.first_chunk_ms is None:
            out.first_chunk_ms = round((time.monotonic() - started) * 1000, 3)
        if run.seq == 0:
            await flush()  # the generation's first delta: at once
        else:
            wake()


def merged_tool_deltas(deltas: list[StreamToolDelta]) -> list[ToolCallDelta]:
    """Provider tool-call pieces as chunk deltas, consecutive argument fragments of one call joined."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is not None and last.index == d.index and d.id is None and d.name is None:
            last.function = FunctionDelta(name=last.function.name, arguments=last.function.arguments + d.arguments)
            continue
        out.append(
            ToolCallDelta(
                index=d.index,
                id=d.id,
                type="function" if d.id else None,
                function=FunctionDelta(name=d.name, arguments=d.arguments),
            )
        )
    return out


def timeout_error(provider: str, stop: StopReason, limit_s: float) -> ProviderTimeoutError:
    """The error that stands for a stream time limit (a first chunk that never came, a stall)."""
    what = "no first chunk" if stop == "first_chunk_timeout" else f"no stream activity ({stop})"
    return ProviderTimeoutError(f"{provider}: {what} within {limit_s:g} s", provider=provider)


def part_usage(end: StreamEnd | None, prompt_tokens: Callable[[], int], text: str) -> tuple[Usage, bool]:
    """The usage (tokens) of one attempt's part and whether it was estimated.

    The provider's own usage when its stream reported one; otherwise the
    prompt estimate (``prompt_tokens()``, called only then) plus the counted
    tokens of the text it generated (``stages.rules.tokens``), flagged estimated.
    """
    if end is not None and end.usage is not None:
        return end.usage, False
    completion = estimate_tokens(text) if text else 0
    prompt = prompt_tokens()
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion), True


def total_usage(parts: list[OutcomePart]) -> Usage:
    """The sum of every part's usage (tokens)."""
    return Usage(
        prompt_tokens=sum(p.usage.prompt_tokens for p in parts),
        completion_tokens=sum(p.usage.completion_tokens for p in parts),
        total_tokens=sum(p.usage.total_tokens for p in parts),
        cached_prompt_tokens=sum(p.usage.cached_prompt_tokens for p in parts),
        cache_creation_prompt_tokens=sum(p.usage.cache_creation_prompt_tokens for p in parts),
    )
