"""The request applications publish to ``ai.requests`` (DESIGN A4).

JSON field names are the contract. Constraints live in the types, so a bad
request fails at decode time with a path in the error message
(msgspec constraints: https://jcristharif.com/msgspec/constraints.html).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Role = Literal["system", "user", "assistant"]

#: Longest request id accepted (characters).
MAX_ID_CHARS = 256
#: Default overall deadline of a request (ms), DESIGN A8.
DEFAULT_TIMEOUT_MS = 60_000
#: ``max_tokens`` used when a request leaves it out (tokens).
DEFAULT_MAX_TOKENS = 1024
#: ``temperature`` used when a request leaves it out (OpenAI's documented default).
DEFAULT_TEMPERATURE = 1.0
#: Largest encoded request accepted on ``ai.requests`` (bytes); larger ones get ``invalid_request``.
MAX_REQUEST_BYTES = 1_048_576
#: Most characters in ``prompt`` or in one message's ``content`` (characters).
MAX_TEXT_CHARS = 800_000
#: Most chat turns in ``messages``.
MAX_MESSAGES = 1_000

RequestId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]


class Message(Struct, forbid_unknown_fields=True, frozen=True):
    """One chat turn: ``{"role": "system"|"user"|"assistant", "content": str}``."""

    role: Role
    content: Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


class CacheOptions(Struct, forbid_unknown_fields=True, frozen=True):
    """Per-request cache control: ``ttl_s`` overrides the default TTL (s); ``bypass`` skips the cache."""

    ttl_s: Annotated[int, Meta(ge=0)] | None = None
    bypass: bool = False


class AIRequest(Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A generation request (DESIGN A4).

    Exactly one of ``prompt`` or ``messages`` is set. ``max_tokens`` > 0,
    ``temperature`` in [0, 2], ``top_p`` in (0, 1], ``timeout_ms`` > 0 is the
    deadline of the whole request (ms, all providers and waits included).
    ``providers`` is an ordered allow-list (first = preferred). ``stream``
    asks for the answer as ``StreamChunk`` events (DESIGN A9) on ``ai.stream``
    or on ``stream_topic`` (a Kafka topic name); ``stream_resume`` (``None``:
    the ``[stream] resume`` setting) lets the next candidate continue an
    answer interrupted after its first chunk. Unknown fields
    are rejected so that a misspelt parameter is an error, not a silent default.

    Raises:
        msgspec.ValidationError: on decode, when a constraint does not hold.
    """

    id: RequestId
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    messages: Annotated[list[Message], Meta(max_length=MAX_MESSAGES)] | None = None
    max_tokens: Annotated[int, Meta(gt=0)] = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Meta(ge=0, le=2)] = DEFAULT_TEMPERATURE
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    metadata: dict[str, Any] | None = None
    cache: CacheOptions | None = None
    timeout_ms: Annotated[int, Meta(gt=0, le=3_600_000)] = DEFAULT_TIMEOUT_MS
    providers: list[str] | None = None
    stream: bool = False
    stream_resume: bool | None = None
    stream_topic: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,249}$")] | None = None

    def __post_init__(self) -> None:
        """Check the rules a single field cannot express.

        Raises:
            ValueError: when not exactly one of prompt/messages is given, the
                messages hold no user or assistant turn, or a stream field is
                set without ``stream: true`` (msgspec reports it as
                a ``ValidationError``).
        """
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` or `messages` is required")
        if self.messages is not None and not any(m.role != "system" for m in self.messages):
            raise ValueError("`messages` needs at least one user or assistant message")
        if not self.stream and self.stream_resume:
            raise ValueError("`stream_resume` needs `stream: true`")
        if not self.stream and self.stream_topic is not None:
            raise ValueError("`stream_topic` needs `stream: true`")

    def chat_messages(self) -> list[Message]:
        """The request as chat turns: a ``prompt`` becomes one user message."""
        if self.messages is not None:
            return list(self.messages)
        return [Message(role="user", content=self.prompt or "")]


def request_from_dict(data: dict[str, Any]) -> AIRequest:
    """Build an ``AIRequest`` from a dict with its JSON field names, validating it.

    Raises:
        msgspec.ValidationError: when a field is missing, unknown or out of range.
    """
    return msgspec.convert(data, AIRequest)
