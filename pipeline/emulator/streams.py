"""Streamed answers in each provider's server-sent-events wire format, with stream faults (DESIGN A9).

Formats, as documented by each provider (read 2026-12):
- OpenAI chat completions, ``stream: true``
  (https://platform.openai.com/docs/api-reference/chat-streaming): ``data:``
  lines of ``chat.completion.chunk`` objects, a first delta with the
  ``role``, content deltas, a last delta with ``finish_reason``; with
  ``stream_options.include_usage`` every chunk carries ``usage: null`` and one
  more chunk with empty ``choices`` carries the usage; then ``data: [DONE]``.
- Anthropic Messages, ``stream: true``
  (https://docs.anthropic.com/en/docs/build-with-claude/streaming):
  ``message_start`` (usage with the input tokens), ``content_block_start``,
  ``ping``, ``content_block_delta`` (``text_delta``), ``content_block_stop``,
  ``message_delta`` (``stop_reason``, cumulative ``output_tokens``),
  ``message_stop``; each as ``event:`` + ``data:``.
- Workers AI, ``stream: true``
  (https://developers.cloudflare.com/workers-ai/features/streaming/): ``data:``
  lines of ``{"response": "..."}``, a last event with ``usage``, then
  ``data: [DONE]``.

A tool call answer (DESIGN A4) streams its arguments JSON in pieces of
``TOOL_ARGUMENT_PIECE`` characters, each piece a content delta (counted by the
stream faults): OpenAI opens with a delta carrying the role and
``tool_calls: [{index, id, type: "function", function: {name, arguments: ""}}]``,
then deltas ``tool_calls: [{index, function: {arguments: "<piece>"}}]``, and
ends with ``finish_reason: "tool_calls"``; Anthropic sends
``content_block_start`` with ``{type: "tool_use", id, name, input: {}}``,
``content_block_delta`` events with ``{type: "input_json_delta",
partial_json}``, ``content_block_stop`` and ``stop_reason: "tool_use"``;
Workers AI (no documented stream shape; the emulator's own) sends one event
``{"response": "", "tool_calls": [{name, arguments}]}``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from pipeline.emulator.spec import FaultStep, Wire

_ENCODER = msgspec.json.Encoder()
#: What a malformed event looks like on the wire: a ``data:`` line that is not JSON.
MALFORMED_EVENT = b'data: {"choices": [{"delta": {"content": \n\n'


class StreamCut(Exception):
    """Raised inside a stream body to cut the connection without ending the HTTP message."""


#: Characters of tool call arguments (or of a JSON answer) per streamed delta.
TOOL_ARGUMENT_PIECE = 8


def split_deltas(text: str) -> list[str]:
    """``text`` as the content deltas the emulator sends: one word with its following spaces each."""
    return re.findall(r"\S+\s*|\s+", text)


def split_pieces(text: str, size: int = TOOL_ARGUMENT_PIECE) -> list[str]:
    """``text`` in pieces of ``size`` characters (JSON text has no spaces to split at)."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _ENCODER.encode(data) + b"\n\n"


class StreamToolCall(msgspec.Struct, kw_only=True, frozen=True):
    """One tool call of a streamed answer: ``id`` (empty at Workers AI), ``name``, ``arguments`` (JSON text)."""

    id: str
    name: str
    arguments: str
    input: dict[str, Any]


class StreamPlan(msgspec.Struct, kw_only=True):
    """One streamed answer: the text or tool calls, usage (tokens) and the fault step that shapes it.

    ``pieces`` replaces the word split of ``text`` (a JSON answer is sent in
    fixed-size pieces).
    """

    wire: Wire
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    truncated: bool
    include_usage: bool
    omit_usage: bool
    step: FaultStep
    tool_calls: list[StreamToolCall] = []
    pieces: list[str] | None = None

    def text_pieces(self) -> list[str]:
        """The content deltas of a text answer."""
        return self.pieces if self.pieces is not None else split_deltas(self.text)

    def call_pieces(self) -> list[tuple[int, str, bool, bool]]:
        """``(call index, argument piece, first of its call, last of its call)`` of a tool call answer."""
        out: list[tuple[int, str, bool, bool]] = []
        for index, call in enumerate(self.tool_calls):
            pieces = split_pieces(call.arguments) or [""]
            out.extend((index, p, k == 0, k == len(pieces) - 1) for k, p in enumerate(pieces))
        return out


_Events = tuple[list[bytes], list[bytes], list[bytes]]


def _openai_events(plan: StreamPlan) -> _Events:
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": plan.model,
            "service_tier": "default",
            "system_fingerprint": "fp_emulator",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if plan.include_usage:
            body["usage"] = None
        return body

    def header(index: int, call: StreamToolCall) -> dict[str, Any]:
        function = {"name": call.name, "arguments": ""}
        return {"index": index, "id": call.id, "type": "function", "function": function}

    if plan.tool_calls:
        first = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [header(0, plan.tool_calls[0])]}
        opening = [_sse(chunk(first))]
        content = []
        for index, piece, starts, _ in plan.call_pieces():
            head = _sse(chunk({"tool_calls": [header(index, plan.tool_calls[index])]})) if starts and index else b""
            content.append(head + _sse(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})))
        finish = "tool_calls"
    else:
        opening = [_sse(chunk({"role": "assistant", "content": "", "refusal": None}))]
        content = [_sse(chunk({"content": d})) for d in plan.text_pieces()]
        finish = "length" if plan.truncated else "stop"
    closing = [_sse(chunk({}, finish))]
    if plan.include_usage and not plan.omit_usage:
        usage = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": plan.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        last = chunk({})
        last["choices"] = []
        last["usage"] = usage
        closing.append(_sse(last))
    closing.append(b"data: [DONE]\n\n")
    return opening, content, closing


def _anthropic_events(plan: StreamPlan) -> _Events:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_01" + secrets.token_hex(11),
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": plan.prompt_tokens - plan.cached_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": plan.cached_tokens,
                "output_tokens": 1,
                "service_tier": "standard",
            },
        },
    }

    def block_start(index: int, block: dict[str, Any]) -> bytes:
        return _sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")

    def block_stop(index: int) -> bytes:
        return _sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    def block_delta(index: int, delta: dict[str, Any]) -> bytes:
        return _sse({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")

    opening = [_sse(start, "message_start")]
    content: list[bytes] = []
    closing: list[bytes] = []
    if plan.tool_calls:

        def tool_block(index: int) -> dict[str, Any]:
            call = plan.tool_calls[index]
            return {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}

        opening += [block_start(0, tool_block(0)), _sse({"type": "ping"}, "ping")]
        for index, piece, starts, ends in plan.call_pieces():
            head = block_start(index, tool_block(index)) if starts and index else b""
            tail = block_stop(index) if ends and index < len(plan.tool_calls) - 1 else b""
            content.append(head + block_delta(index, {"type": "input_json_delta", "partial_json": piece}) + tail)
        closing.append(block_stop(len(plan.tool_calls) - 1))
        stop = "tool_use"
    else:
        opening += [block_start(0, {"type": "text", "text": ""}), _sse({"type": "ping"}, "ping")]
        content = [block_delta(0, {"type": "text_delta", "text": d}) for d in plan.text_pieces()]
        closing.append(block_stop(0))
        stop = "max_tokens" if plan.truncated else "end_turn"
    closing += [
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": plan.completion_tokens},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return opening, content, closing


def _cloudflare_events(plan: StreamPlan) -> _Events:
    closing = []
    last: dict[str, Any] = {"response": "", "p": "abcdef"}
    if not plan.omit_usage:
        last["usage"] = {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens,
        }
    closing.append(_sse(last))
    closing.append(b"data: [DONE]\n\n")
    if plan.tool_calls:
        calls = [{"name": c.name, "arguments": c.input} for c in plan.tool_calls]
        return [], [_sse({"response": "", "tool_calls": calls, "p": "abcdef"})], closing
    return [], [_sse({"response": d, "p": "abcdef"}) for d in plan.text_pieces()], closing


def stream_body(
    plan: StreamPlan,
    *,
    on_chunk: Callable[[], None],
    stalled: Callable[[float], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """The bytes of ``plan``'s stream, with its faults.

    ``on_chunk`` is called after each content delta is yielded; ``stalled(s)``
    waits out a stall (returns early when the client leaves or the emulator stops).

    Raises (while iterating):
        StreamCut: for ``stream_cut_after`` and after a stall, so that the
            server ends the connection without finishing the HTTP message.
    """
    builders = {"openai": _openai_events, "anthropic": _anthropic_events, "cloudflare": _cloudflare_events}
    opening, content, closing = builders[plan.wire](plan)
    step = plan.step

    async def body() -> AsyncIterator[bytes]:
        for event in opening:
            yield event
        for i, event in enumerate(content):
            if step.stream_cut_after is not None and i >= step.stream_cut_after:
                raise StreamCut(f"cut after {i} chunks")
            if step.stream_stall_after is not None and i >= step.stream_stall_after:
                await stalled(step.hang_s)
                raise StreamCut(f"stalled after {i} chunks")
            if step.stream_malformed_after is not None and i >= step.stream_malformed_after:
                yield MALFORMED_EVENT
                return
            wait_ms = step.first_chunk_delay_ms if i == 0 else step.chunk_interval_ms
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
            yield event
            on_chunk()
        for event in closing:
            yield event

    return body()
