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


def split_deltas(text: str) -> list[str]:
    """``text`` as the content deltas the emulator sends: one word with its following spaces each."""
    return re.findall(r"\S+\s*|\s+", text)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _ENCODER.encode(data) + b"\n\n"


class StreamPlan(msgspec.Struct, kw_only=True):
    """One streamed answer: the text, its usage (tokens) and the fault step that shapes it."""

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


def _openai_events(plan: StreamPlan) -> tuple[list[bytes], Callable[[str], bytes], list[bytes]]:
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

    opening = [_sse(chunk({"role": "assistant", "content": "", "refusal": None}))]
    closing = [_sse(chunk({}, "length" if plan.truncated else "stop"))]
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
    return opening, lambda d: _sse(chunk({"content": d})), closing


def _anthropic_events(plan: StreamPlan) -> tuple[list[bytes], Callable[[str], bytes], list[bytes]]:
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
    opening = [
        _sse(start, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]

    def delta(d: str) -> bytes:
        return _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}},
            "content_block_delta",
        )

    closing = [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens" if plan.truncated else "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": plan.completion_tokens},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return opening, delta, closing


def _cloudflare_events(plan: StreamPlan) -> tuple[list[bytes], Callable[[str], bytes], list[bytes]]:
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
    return [], lambda d: _sse({"response": d, "p": "abcdef"}), closing


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
    opening, delta, closing = builders[plan.wire](plan)
    step = plan.step

    async def body() -> AsyncIterator[bytes]:
        for event in opening:
            yield event
        for i, piece in enumerate(split_deltas(plan.text)):
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
            yield delta(piece)
            on_chunk()
        for event in closing:
            yield event

    return body()
