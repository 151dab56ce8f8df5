"""Stateless tool-call ids (DESIGN A4): one shape every provider accepts, computed, never remembered.

Every tool-call id a caller sees, and every id aipipe sends to a provider
(in an assistant turn's ``tool_calls`` and in a ``tool`` turn's
``tool_call_id``), goes through ``sanitize_tool_call_id``. The function is
deterministic and idempotent, so an id survives any number of replicas,
restarts and fallbacks between wire formats without a per-process map:
OpenAI's ``call_...`` and Anthropic's ``toolu_...`` ids already have the
shape and pass unchanged; any other id is rewritten the same way on every
machine, on the way out and on the way back.

The shape, ``^[A-Za-z0-9_-]{1,40}$``, is the intersection of what the
providers document or enforce (read 2026-12-06): Anthropic's ``tool_use.id``
pattern ``^[a-zA-Z0-9_-]+$``
(https://docs.anthropic.com/en/api/messages), OpenAI's refusal of tool-call
ids longer than 40 characters in a chat history (its 400 "string too long.
Expected a string with maximum length 40"), and DESIGN A4's
``^[A-Za-z0-9_-]{1,64}$``.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from schemas.request import Message, ToolCall
from schemas.stream import FunctionDelta, ToolCallDelta

#: Longest id produced (characters); see the module docstring for why 40.
MAX_TOOL_CALL_ID_CHARS = 40
TOOL_CALL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_HASH_CHARS = 16


def sanitize_tool_call_id(raw: str) -> str:
    """``raw`` in the shape ``^[A-Za-z0-9_-]{1,40}$``: unchanged when it has it, else a stable rewrite.

    The rewrite keeps the safe characters of the first 23 (others become
    ``_``) and appends ``_`` plus 16 hex digits of the SHA-256 of ``raw``, so
    two different ids never collide in practice and the same id always maps
    to the same result. ``sanitize_tool_call_id(sanitize_tool_call_id(x)) ==
    sanitize_tool_call_id(x)``.

    Example: ``"call 1/ä"`` -> ``"call_1__" + "_" + 16 hex``.
    """
    if TOOL_CALL_ID_PATTERN.match(raw):
        return raw
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    head = _UNSAFE.sub("_", raw)[: MAX_TOOL_CALL_ID_CHARS - _HASH_CHARS - 1] or "call"
    return f"{head}_{digest}"


def synthesized_tool_call_id(name: str, arguments: str, index: int, context: str = "") -> str:
    """An id for a tool call its provider sent without one (Workers AI): ``call_`` + 24 hex of its content.

    Deterministic in the call's function ``name``, ``arguments``, 0-based
    ``index`` in the answer and ``context`` (``conversation_digest`` of the
    turns it answers), so a repeated answer (a cache hit, a redelivery) carries
    the same id, while the same call made again in a later turn gets a new one
    (two equal ids in one history would make its tool results ambiguous).
    """
    digest = hashlib.sha256(f"{context}\x00{index}\x00{name}\x00{arguments}".encode()).hexdigest()[:24]
    return f"call_{digest}"


def conversation_digest(messages: list[Message]) -> str:
    """16 hex of the SHA-256 of a conversation's turns (the ``context`` of ``synthesized_tool_call_id``)."""
    return hashlib.sha256(msgspec.json.encode(messages)).hexdigest()[:16]


def whole_call_deltas(tool_calls: list[ToolCall] | None) -> list[ToolCallDelta]:
    """Complete tool calls as one delta each (a cache hit replayed as one chunk): ``[]`` for ``None``."""
    return [
        ToolCallDelta(
            index=i,
            id=call.id,
            type="function",
            function=FunctionDelta(name=call.function.name, arguments=call.function.arguments),
        )
        for i, call in enumerate(tool_calls or ())
    ]
